"""Read a DeepSpeed checkpoint of GPT (GPTModel through the engine, or GPTModelPipe) into
the canonical model state of megatron/checkpoint_reshape.py: the TP = 1, PP = 1 weights
as {path tuple: tensor}, e.g. ('language_model', 'transformer', 'layers.0.mlp...weight').

Files of one checkpoint folder (global_stepN/):

    mp_rank_TT_model_states.pt            engine state: 'module' (GPTModel's flat state
                                          dict, TP rank TT), Megatron's client state
                                          ('args', 'iteration', consumed samples, ...);
                                          ZeRO-3 writes one per data-parallel rank D,
                                          zero_pp_rank_D_mp_rank_TT_model_states.pt
    layer_II-model_TT-model_states.pt     GPTModelPipe: layer II of TP rank TT
                                          (00 embedding, 01..L transformer layers,
                                          L+1 final layer norm, L+2 the head:
                                          output_layer.weight when untied)
    zero_pp_rank_D_mp_rank_TT_optim_states.pt   ZeRO partitions; under ZeRO-3 the
                                          'module' tensors are empty and the fp32
                                          weights are gathered from these files, as
                                          they are for ZeRO-1/2 in fp16 / bf16 at TP=1
                                          (at TP > 1 the half-precision module
                                          weights are read)
"""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Tuple

import torch

from megatron.checkpoint_reshape import FlatState, ReshapeError, merge_tensor_parallel

# mp_rank_TT_model_states.pt; under ZeRO-3 one per data-parallel rank D:
# zero_pp_rank_D_mp_rank_TT_model_states.pt
_MODEL_STATES_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d{2})_model_states\.pt$")
_LAYER_RE = re.compile(r"^layer_(\d{2})-model_(\d{2})-model_states\.pt$")
_LM = "language_model"


def resolve_checkpoint_folder(input_folder: str) -> Tuple[str, str]:
    """(folder holding the files, tag): input_folder is global_stepN/ itself or the save
    folder whose `latest` file names the tag."""
    if any(_MODEL_STATES_RE.match(n) for n in os.listdir(input_folder)):
        return input_folder, os.path.basename(os.path.normpath(input_folder))
    latest = os.path.join(input_folder, "latest")
    if not os.path.isfile(latest):
        raise ReshapeError(
            f"{input_folder}: neither a DeepSpeed checkpoint folder "
            "(mp_rank_XX_model_states.pt) nor a save folder with a 'latest' file"
        )
    with open(latest) as f:
        tag = f.read().strip()
    folder = os.path.join(input_folder, tag)
    if not os.path.isdir(folder):
        raise ReshapeError(f"{latest} names {tag!r}, but {folder} does not exist")
    return folder, tag


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise ReshapeError(f"could not read {path}: {e}") from e


def module_key_to_path(key: str) -> Tuple[str, ...] | None:
    """GPTModel flat key -> canonical path (None for the last stage's head copy)."""
    if key.startswith(f"{_LM}.embedding."):
        return (_LM, "embedding") + tuple(key[len(f"{_LM}.embedding.") :].split("."))
    for stack in ("transformer", "encoder"):
        prefix = f"{_LM}.{stack}."
        if key.startswith(prefix):
            return (_LM, "transformer", key[len(prefix) :])
    if key.startswith(f"{_LM}.output_layer."):  # --untie-embeddings-and-output-weights
        return (_LM, "output_layer") + tuple(key[len(f"{_LM}.output_layer.") :].split("."))
    if key.startswith("word_embeddings."):
        return None
    raise ReshapeError(f"unexpected GPT parameter {key!r} in the DeepSpeed checkpoint")


def _check_dense(module: dict, path: str) -> None:
    moe = [k for k in module if ".deepspeed_moe." in k]
    if moe:
        raise ReshapeError(
            f"{path} holds Mixture-of-Experts weights ({moe[0]}, ...): "
            "Megatron checkpoints have no experts; MoE stays a DeepSpeed model"
        )


def _engine_shards(folder: str, files: Dict[int, str]) -> List[FlatState]:
    shards = []
    for tp in sorted(files):
        state = _load(files[tp])
        module = state.get("module")
        if module is None:
            raise ReshapeError(f"{files[tp]} has no 'module' weights")
        _check_dense(module, files[tp])
        if any(torch.is_tensor(v) and v.numel() == 0 for v in module.values()):
            module = _zero3_weights(folder, len(files))
        elif len(files) == 1 and _half(module) and _optimizer_files(folder):
            # ZeRO-1/2 in fp16 / bf16: the fp32 master weights of the optimizer partitions
            module = _fp32_weights(folder)
        shard = {}
        for key, value in module.items():
            path = module_key_to_path(key)
            if path is not None:
                shard[path] = value.detach().clone()
        shards.append(shard)
    return shards


def _half(module: dict) -> bool:
    return any(
        torch.is_tensor(v) and v.dtype in (torch.float16, torch.bfloat16) for v in module.values()
    )


def _optimizer_files(folder: str) -> List[str]:
    return sorted(glob.glob(os.path.join(folder, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def _fp32_weights(folder: str) -> dict:
    """The fp32 weights consolidated from the ZeRO optimizer partitions (DeepSpeed's
    zero_to_fp32), named as the module's."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    parent, tag = os.path.split(os.path.normpath(folder))
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
    except Exception as e:  # noqa: BLE001 - name the folder whatever went wrong
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ReshapeError(
            f"could not consolidate the ZeRO fp32 states of {folder}: {reason}"
        ) from None


def _zero3_weights(folder: str, tp: int) -> dict:
    """ZeRO-3: the fp32 weights gathered from the optimizer partitions."""
    if tp != 1:
        raise ReshapeError(
            f"{folder}: ZeRO-3 checkpoints with tensor parallelism {tp} are "
            "not supported; convert a ZeRO-1/2 checkpoint"
        )
    return _fp32_weights(folder)


def _pipe_shards(layer_files: Dict[Tuple[int, int], str], num_layers: int) -> List[FlatState]:
    """GPTModelPipe layer files -> one canonical shard per TP rank."""
    tps = sorted({tp for _, tp in layer_files})
    shards = []
    for tp in tps:
        shard: FlatState = {}
        for (idx, t), path in sorted(layer_files.items()):
            if t != tp or idx > num_layers + 2:
                continue
            state = _load(path)
            for key, value in state.items():
                if idx == num_layers + 2:
                    # the head: OutputLayerPipe's own weight when untied (a second copy
                    # of the word embeddings when tied, not kept)
                    if key.startswith("output_layer."):
                        shard[(_LM,) + tuple(key.split("."))] = value
                elif idx == 0:
                    shard[(_LM, "embedding") + tuple(key.split("."))] = value
                elif idx <= num_layers:
                    shard[(_LM, "transformer", f"layers.{idx - 1}.{key}")] = value
                else:
                    shard[(_LM, "transformer", f"final_layernorm.{key}")] = value
        shards.append(shard)
    return shards


def _dp_rank_of(name: str) -> int:
    m = _MODEL_STATES_RE.match(name)
    return int(m.group(1) or 0) if m else -1


def read_deepspeed_checkpoint(input_folder: str) -> Tuple[FlatState, dict]:
    """(canonical full model state, client state of TP rank 0: args, iteration, ...)."""
    folder, _ = resolve_checkpoint_folder(input_folder)
    names = os.listdir(folder)
    engine_files: Dict[int, str] = {}
    for name in sorted(names, key=_dp_rank_of, reverse=True):  # data-parallel rank 0 last
        m = _MODEL_STATES_RE.match(name)
        if m:
            engine_files[int(m.group(2))] = os.path.join(folder, name)
    if not engine_files:
        raise ReshapeError(f"no mp_rank_XX_model_states.pt in {folder}")
    client = _load(engine_files[min(engine_files)])
    layer_files = {
        (int(m.group(1)), int(m.group(2))): os.path.join(folder, n)
        for n in names
        if (m := _LAYER_RE.match(n))
    }
    if layer_files:
        args = client.get("args")
        if args is None:
            raise ReshapeError(f"{engine_files[min(engine_files)]} has no Megatron 'args'")
        shards = _pipe_shards(layer_files, args.num_layers)
    else:
        shards = _engine_shards(folder, engine_files)
    full = merge_tensor_parallel(shards) if len(shards) > 1 else shards[0]
    client = {k: v for k, v in client.items() if k not in ("module", "optimizer", "lr_scheduler")}
    return full, client


def list_checkpoint_files(folder: str) -> List[str]:
    """The model-state files of a checkpoint folder (for messages and tests)."""
    return sorted(glob.glob(os.path.join(folder, "*model_states.pt")))
