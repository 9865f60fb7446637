"""Megatron checkpoints: save, load, and the safety rules around them.

Layout (as Megatron writes it):

    {save}/latest_checkpointed_iteration.txt         "100" or "release"
    {save}/iter_0000100/run_id.txt                               the run that wrote it
    {save}/iter_0000100/mp_rank_00/model_optim_rng.pt           (PP = 1)
    {save}/iter_0000100/mp_rank_01_003/model_optim_rng.pt       (TP rank 1, PP rank 3)

Nothing is lost:

* every file is written under a temporary name (`NAME.tmp.PID`), flushed and renamed; the
  tracker is written last, by rank 0, once every rank reports its file in place. A save that
  fails (disk full: one CheckpointSpaceError line) or is killed leaves the tracker pointing
  at the previous complete checkpoint; every save removes the `.tmp.PID` files of processes
  that no longer exist.
* no checkpoint holds NaN or inf weights: the save stops first (NonFiniteLossError).
* a run never overwrites another run's checkpoint: each checkpoint folder names the run
  lineage that wrote it (run_id.txt, a random id carried on by every resume). A run stops
  before its first step when --save holds another run's checkpoints newer than its start
  iteration, and a save stops rather than overwrite a folder of another run.
* a --load folder with checkpoints but no tracker is refused (never "start from random"
  over them); the message names the newest complete iteration and --load-tag.
* --keep-last-checkpoints K deletes this run's oldest checkpoint folders beyond K after
  each successful save (never the tracked one, never release).
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import uuid
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch

from . import mpu, print_rank_0
from .accelerator import current_device, get_accelerator, is_gpu
from .errors import NonFiniteLossError
from .global_vars import get_args, update_num_microbatches
from .train_state import TrainState
from .utils import first_non_finite, unwrap_model

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
RUN_ID_FILENAME = "run_id.txt"
CHECKPOINT_VERSION = 3.0
_CHECKPOINT_VERSION = None

ITER_RE = re.compile(r"iter_(\d+)")
DS_STEP_RE = re.compile(r"global_step(\d+)")
_RANK_DIR_RE = re.compile(r"mp_rank_(\d+)(?:_(\d+))?")
_TMP_RE = re.compile(r"\.tmp\.(\d+)$")
_RANK_FILE = "model_optim_rng.pt"
_RESHAPE_TOOL = "tools/checkpoint_util.py"

# Flags that fix the shapes of the weights: a checkpoint made with other values cannot load.
MODEL_ARGS_TO_CHECK = (
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("num_attention_heads", "--num-attention-heads"),
    ("max_position_embeddings", "--max-position-embeddings"),
    ("padded_vocab_size", "padded vocab size"),
    ("ffn_hidden_size", "--ffn-hidden-size"),
    ("num_key_value_heads", "--num-key-value-heads"),
    ("swiglu", "--swiglu"),
    ("normalization", "--normalization"),
    ("use_rotary_position_embeddings", "--use-rotary-position-embeddings"),
    ("add_position_embedding", "--no-position-embedding (add_position_embedding)"),
    ("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights"),
    ("add_bias_linear", "--disable-bias-linear (add_bias_linear)"),
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file or flag."""


class CheckpointSpaceError(CheckpointError):
    """The disk filled up while a checkpoint file was written."""


def set_checkpoint_version(value) -> None:
    global _CHECKPOINT_VERSION
    _CHECKPOINT_VERSION = value


def get_checkpoint_version():
    return _CHECKPOINT_VERSION


# ----------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------


def get_checkpoint_name(checkpoints_path: str, iteration: int, release: bool = False,
                        tensor_rank: int | None = None, pipeline_rank: int | None = None,
                        pipeline_parallel: bool | None = None) -> str:
    """Path of this rank's model_optim_rng.pt."""
    if tensor_rank is None:
        tensor_rank = mpu.get_tensor_model_parallel_rank()
    if pipeline_rank is None:
        pipeline_rank = mpu.get_pipeline_model_parallel_rank()
    if pipeline_parallel is None:
        pipeline_parallel = mpu.get_pipeline_model_parallel_world_size() > 1
    if pipeline_parallel:
        sub = f"mp_rank_{tensor_rank:02d}_{pipeline_rank:03d}"
    else:
        sub = f"mp_rank_{tensor_rank:02d}"
    return os.path.join(checkpoints_path, _folder_name(iteration, release), sub, _RANK_FILE)


def _folder_name(iteration: int, release: bool = False) -> str:
    return "release" if release else f"iter_{iteration:07d}"


def get_checkpoint_tracker_filename(checkpoints_path: str) -> str:
    return os.path.join(checkpoints_path, TRACKER_FILENAME)


def inference_checkpoint_problem(args, purpose: str) -> str | None:
    """Why `args` cannot load a checkpoint for `purpose` (generation, evaluation), as one
    line naming the flag, or None: Megatron checkpoints at pipeline parallel 1 only."""
    if args.pipeline_model_parallel_size > 1:
        return (
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size} is not "
            f"supported for {purpose}; reshape the checkpoint to pipeline parallel 1 "
            "with tools/checkpoint_util.py"
        )
    if args.deepspeed:
        return (
            f"--deepspeed checkpoints are not read by {purpose}; convert with "
            "tools/convert_checkpoint/deepspeed_to_megatron.py and drop --deepspeed"
        )
    if args.load is None:
        return "--load (the checkpoint folder) is required"
    tracker = get_checkpoint_tracker_filename(args.load)
    if not os.path.isfile(tracker):
        return f"--load {args.load}: no checkpoint there ({tracker} not found)"
    return None


def read_metadata(tracker_filename: str) -> tuple[int, bool]:
    """(iteration, release) from the tracker; a corrupt tracker is an error naming it."""
    with open(tracker_filename) as f:
        text = f.read().strip()
    if text == "release":
        return 0, True
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(
            f"corrupt checkpoint tracker {tracker_filename}: expected an iteration number or "
            f"'release', found {text[:40]!r}; fix or remove the file (refusing to start "
            "from scratch over an existing checkpoint)"
        ) from None
    if iteration < 0:
        raise CheckpointError(f"corrupt checkpoint tracker {tracker_filename}: "
                              f"negative iteration {iteration}")
    return iteration, False


# ----------------------------------------------------------------------------------------
# What a checkpoint folder holds (plain file system, no process group)
# ----------------------------------------------------------------------------------------


def iteration_folders(root: str, pattern: re.Pattern = ITER_RE) -> dict[int, str]:
    """{iteration: folder name} of root's iter_* folders (global_step* with DS_STEP_RE)."""
    if not os.path.isdir(root):
        return {}
    found = {}
    for name in os.listdir(root):
        match = pattern.fullmatch(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found[int(match.group(1))] = name
    return found


def holds_checkpoint_data(folder: str) -> bool:
    """Whether folder (or a rank folder in it) holds a finished *.pt file: anything less
    is the debris of a save that died before writing a file."""
    if not os.path.isdir(folder):
        return False
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".pt") and os.path.isfile(path):
            return True
        if os.path.isdir(path) and any(n.endswith(".pt") for n in os.listdir(path)):
            return True
    return False


class Layout(NamedTuple):
    """The parallel layout an iter_* folder's mp_rank_* folders describe."""

    tp: int
    pp: int
    complete: bool  # every rank folder of the TP x PP grid holds its model_optim_rng.pt


def checkpoint_layout(folder: str) -> Layout | None:
    """TP x PP of folder's mp_rank_TT (PP = 1) or mp_rank_TT_PPP folders; None if none."""
    ranks = {}
    names = os.listdir(folder) if os.path.isdir(folder) else []
    for name in names:
        match = _RANK_DIR_RE.fullmatch(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            stage = None if match.group(2) is None else int(match.group(2))
            ranks[(int(match.group(1)), stage)] = os.path.isfile(
                os.path.join(folder, name, _RANK_FILE))
    if not ranks:
        return None
    staged = {stage is not None for _, stage in ranks}
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(stage or 0 for _, stage in ranks)
    grid = [(t, p if True in staged else None) for t in range(tp) for p in range(pp)]
    complete = len(staged) == 1 and all(ranks.get(key, False) for key in grid)
    return Layout(tp, pp, complete)


def newest_complete_iteration(load_dir: str) -> int | None:
    complete = [it for it, name in iteration_folders(load_dir).items()
                if (layout := checkpoint_layout(os.path.join(load_dir, name)))
                and layout.complete]
    return max(complete) if complete else None


def list_names(names: list[str], limit: int = 6) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def checkpoint_tags(load_dir: str) -> list[str]:
    """The checkpoint folders of load_dir (iter_*, global_step*, release), oldest first."""
    tags = [name for _, name in sorted(iteration_folders(load_dir).items())]
    tags += [name for _, name in sorted(iteration_folders(load_dir, DS_STEP_RE).items())]
    if os.path.isdir(os.path.join(load_dir, "release")):
        tags.append("release")
    return tags


# ----------------------------------------------------------------------------------------
# Which checkpoint to load
# ----------------------------------------------------------------------------------------


def resolve_checkpoint(load_dir: str, load_tag: str | None = None) -> tuple[int, bool] | None:
    """(iteration, release) to load from load_dir: --load-tag, else the tracker; None when
    load_dir holds no checkpoint (a fresh start)."""
    if load_tag is not None:
        return _resolve_load_tag(load_dir, load_tag)
    tracker = get_checkpoint_tracker_filename(load_dir)
    if os.path.isfile(tracker):
        iteration, release = read_metadata(tracker)
        _require_tracked_folder(load_dir, tracker, iteration, release)
        return iteration, release
    _refuse_untracked_checkpoints(load_dir)
    return None


def _resolve_load_tag(load_dir: str, tag: str) -> tuple[int, bool]:
    text = tag.strip()
    match = ITER_RE.fullmatch(text)
    if text == "release":
        iteration, release = 0, True
    elif text.isdigit() or match:
        iteration, release = int(match.group(1) if match else text), False
    else:
        raise CheckpointError(f"--load-tag {tag!r}: expected an iteration (4), its folder "
                              "(iter_0000004) or release")
    name = _folder_name(iteration, release)
    if not os.path.isdir(os.path.join(load_dir, name)):
        raise CheckpointError(f"--load-tag {tag}: {load_dir} has no {name}; checkpoints "
                              f"there: {list_names(checkpoint_tags(load_dir))}")
    return iteration, release


def _require_tracked_folder(load_dir: str, tracker: str, iteration: int, release: bool):
    folder = os.path.join(load_dir, _folder_name(iteration, release))
    if os.path.isdir(folder):
        return
    named = "release" if release else f"iteration {iteration}"
    present = [str(it) for it in sorted(iteration_folders(load_dir))]
    raise CheckpointError(
        f"{tracker} names {named} but {folder} is missing; iterations present in "
        f"{load_dir}: {list_names(present, 12)} (fix the tracker or pass --load-tag)"
    )


def _refuse_untracked_checkpoints(load_dir: str) -> None:
    """A folder with checkpoints but no tracker: never start from random over them."""
    names = [name for name in checkpoint_tags(load_dir)
             if holds_checkpoint_data(os.path.join(load_dir, name))]
    if not names:
        return
    tracker = get_checkpoint_tracker_filename(load_dir)
    start = (f"{load_dir} holds checkpoints ({list_names(names)}) but no {TRACKER_FILENAME}: "
             "refusing to start from random over them")
    newest = newest_complete_iteration(load_dir)
    if newest is not None:
        raise CheckpointError(
            f"{start}; the newest complete one is iteration {newest}: resume from it with "
            f"`echo {newest} > {tracker}` or --load-tag {_folder_name(newest)}")
    steps = iteration_folders(load_dir, DS_STEP_RE)
    if steps:
        tag = steps[max(steps)]
        raise CheckpointError(f"{start}; resume from the newest with --deepspeed --load-tag "
                              f"{tag}, or write {tracker}")
    if "release" in names:
        raise CheckpointError(f"{start}; load it with `echo release > {tracker}` or "
                              "--load-tag release")
    raise CheckpointError(f"{start}; none of them is complete (a rank file is missing in "
                          "each): move them away or use another --load/--save folder")


def _resolve_ds_tag(load_dir: str, load_tag: str) -> str:
    """--load-tag as given (global_step4), or global_step{N} for a bare iteration."""
    text = load_tag.strip()
    for tag in (text, f"global_step{text}" if text.isdigit() else None):
        if tag and os.path.isdir(os.path.join(load_dir, tag)):
            return tag
    raise CheckpointError(
        f"--load-tag {load_tag}: {load_dir} has no {text}; checkpoints there: "
        f"{list_names(checkpoint_tags(load_dir))}"
    )


def deepspeed_load_tag(load_dir: str, universal: bool, load_tag: str | None = None) -> str | None:
    """The tag to load: --load-tag, else Megatron's tracker's, else DeepSpeed's latest
    file (None)."""
    if load_tag is not None:
        return _resolve_ds_tag(load_dir, load_tag)
    tracker = get_checkpoint_tracker_filename(load_dir)
    if universal or not os.path.isfile(tracker):
        return None
    iteration, release = read_metadata(tracker)
    if release:
        return None
    tag = f"global_step{iteration}"
    if not os.path.isdir(os.path.join(load_dir, tag)):
        present = [str(it) for it in sorted(iteration_folders(load_dir, DS_STEP_RE))]
        raise CheckpointError(
            f"{tracker} names iteration {iteration} but {os.path.join(load_dir, tag)} is "
            f"missing; iterations present in {load_dir}: {list_names(present, 12)} (fix the "
            "tracker or pass --load-tag)"
        )
    return tag


def refuse_untracked_deepspeed(load_dir: str) -> None:
    """global_step* folders but neither tracker nor latest file: no start from random."""
    steps = {
        it: name
        for it, name in iteration_folders(load_dir, DS_STEP_RE).items()
        if holds_checkpoint_data(os.path.join(load_dir, name))
    }
    if not steps:
        return
    newest = max(steps)
    raise CheckpointError(
        f"{load_dir} holds DeepSpeed checkpoints ({list_names([steps[i] for i in sorted(steps)])})"
        " but neither latest nor latest_checkpointed_iteration.txt: refusing to start from "
        f"random over them; resume from the newest with `echo {newest} > "
        f"{get_checkpoint_tracker_filename(load_dir)}` or --load-tag {steps[newest]}"
    )


# ----------------------------------------------------------------------------------------
# Parallel layout
# ----------------------------------------------------------------------------------------


def layout_mismatch_error(load_dir: str, ckpt_tp: int, ckpt_pp: int, tp: int,
                          pp: int) -> CheckpointError:
    """'checkpoint is TP=a x PP=b, this run is ...' with the reshape command to run."""
    src = os.path.normpath(load_dir)
    dst = f"{src}_tp{tp}_pp{pp}"
    return CheckpointError(
        f"checkpoint {load_dir} is TP={ckpt_tp} x PP={ckpt_pp}, this run is TP={tp} x PP={pp}: "
        f"reshape it with `python {_RESHAPE_TOOL} --load-dir {src} --save-dir {dst} "
        f"--target-tensor-parallel-size {tp} --target-pipeline-parallel-size {pp}` "
        f"and load {dst} with --no-load-optim --no-load-rng"
    )


def _this_layout() -> tuple[int, int]:
    return (mpu.get_tensor_model_parallel_world_size(),
            mpu.get_pipeline_model_parallel_world_size())


def _check_layout_before_reading(load_dir: str, path: str) -> None:
    """The mp_rank_* folders present must be this run's TP x PP; then this rank's file."""
    folder = os.path.dirname(os.path.dirname(path))
    found = checkpoint_layout(folder)
    tp, pp = _this_layout()
    if found is not None and (found.tp, found.pp) != (tp, pp):
        raise layout_mismatch_error(load_dir, found.tp, found.pp, tp, pp)
    if not os.path.isfile(path):
        raise _missing_rank_file_error(path, load_dir)


def _saved_layout(checkpoint_args) -> tuple[int, int] | None:
    tp = getattr(checkpoint_args, "tensor_model_parallel_size", None)
    pp = getattr(checkpoint_args, "pipeline_model_parallel_size", None)
    return None if tp is None or pp is None else (tp, pp)


def _missing_rank_file_error(path: str, load_dir: str) -> CheckpointError:
    parent = os.path.dirname(os.path.dirname(path))
    found = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
    return CheckpointError(
        f"checkpoint file {path} not found ({parent} holds {found}): that checkpoint is "
        f"incomplete; load another with --load-tag (checkpoints in {load_dir}: "
        f"{list_names(checkpoint_tags(load_dir))})"
    )


def check_checkpoint_args(checkpoint_args, args=None, load_dir: str | None = None) -> None:
    """Stop, naming every mismatch, when the checkpoint's model shape differs from ours;
    a different tensor/pipeline layout is named first, with the reshape command."""
    args = args or get_args()
    load_dir = load_dir if load_dir is not None else args.load
    problems = []
    for name, flag in MODEL_ARGS_TO_CHECK:
        if (name == "max_position_embeddings"
                and getattr(checkpoint_args, "add_position_embedding", True) is False):
            continue  # no position-embedding table (RoPE): any length loads the weights
        ours = getattr(args, name, None)
        theirs = getattr(checkpoint_args, name, None)
        if theirs is not None and ours is not None and ours != theirs:
            problems.append(f"{flag}: checkpoint has {theirs}, this run has {ours}")
    if not problems:
        return
    saved = _saved_layout(checkpoint_args)
    ours = (getattr(args, "tensor_model_parallel_size", 1),
            getattr(args, "pipeline_model_parallel_size", 1))
    if saved is not None and saved != ours:
        raise layout_mismatch_error(load_dir, *saved, *ours)
    raise CheckpointError(
        f"checkpoint in {load_dir} does not match this model: " + "; ".join(problems)
    )


# ----------------------------------------------------------------------------------------
# --use-checkpoint-args
# ----------------------------------------------------------------------------------------

# (dest, flag) that fix the shapes of the weights: given on the command line as well, they
# must agree with the checkpoint.
CHECKPOINT_SHAPE_ARGS = (
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("ffn_hidden_size", "--ffn-hidden-size"),
    ("num_attention_heads", "--num-attention-heads"),
    ("num_key_value_heads", "--num-key-value-heads"),
    ("kv_channels", "--kv-channels"),
    ("max_position_embeddings", "--max-position-embeddings"),
    ("swiglu", "--swiglu"),
    ("normalization", "--normalization"),
    ("use_rotary_position_embeddings", "--use-rotary-position-embeddings"),
    ("add_position_embedding", "--no-position-embedding"),
    ("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights"),
    ("add_bias_linear", "--disable-bias-linear"),
    ("num_experts", "--num-experts"),
    ("expert_interval", "--expert-interval"),
    ("mlp_type", "--mlp-type"),
)
# Further dests taken from the checkpoint unless given on the command line (which wins):
# the model's numerics, its tokenizer and the parallel layout it was saved in.
CHECKPOINT_RUN_ARGS = (
    "seq_length", "decoder_seq_length", "rope_theta", "rotary_percent", "layernorm_epsilon",
    "apply_residual_connection_post_layernorm", "openai_gelu", "onnx_safe", "bias_gelu_fusion",
    "topk", "tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size",
    "vocab_extra_ids", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
)  # fmt: skip
# The dests above whose flag has no default: without a record of the command line, one of
# them that holds a value was given (Megatron's rule); every other dest is taken.
_NO_DEFAULT = {
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_key_value_heads", "kv_channels", "max_position_embeddings", "seq_length",
    "decoder_seq_length", "tokenizer_type", "vocab_file", "merge_file", "tokenizer_model",
    "vocab_size", "num_layers_per_virtual_pipeline_stage",
}  # fmt: skip


def _deepspeed_rank0_file(load_dir: str, tag: str | None, universal: bool) -> str:
    """The first model-states file of a DeepSpeed checkpoint: it holds the client state."""
    if tag is None:
        latest = os.path.join(load_dir, "latest_universal" if universal else "latest")
        if not os.path.isfile(latest):
            raise CheckpointError(f"no checkpoint in --load {load_dir} ({latest} not found)")
        with open(latest) as f:
            tag = f.read().strip()
    folder = os.path.join(load_dir, tag)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    states = [n for n in names if n.endswith("mp_rank_00_model_states.pt")]
    if not states:
        raise CheckpointError(f"DeepSpeed checkpoint {folder} holds no mp_rank_00 model states "
                              f"file (found: {list_names(names)})")
    return os.path.join(folder, "mp_rank_00_model_states.pt"
                        if "mp_rank_00_model_states.pt" in states else states[0])


def checkpoint_rank0_file(args, load_arg: str = "load") -> str:
    """The file with the saved args of the checkpoint a run with `args` loads: the
    --load-tag's, else the tracker's; tensor and pipeline rank 0 (DeepSpeed: the first
    model-states file). A folder without a checkpoint is a CheckpointError."""
    load_dir = getattr(args, load_arg)
    load_tag = getattr(args, "load_tag", None) if load_arg == "load" else None
    if getattr(args, "deepspeed", False):
        universal = bool(getattr(args, "universal_checkpoint", False))
        return _deepspeed_rank0_file(load_dir, deepspeed_load_tag(load_dir, universal, load_tag),
                                     universal)
    resolved = resolve_checkpoint(load_dir, load_tag)
    if resolved is None:
        raise CheckpointError(f"no checkpoint in --load {load_dir} "
                              f"({get_checkpoint_tracker_filename(load_dir)} not found)")
    folder = os.path.join(load_dir, _folder_name(*resolved))
    for pipeline_parallel in (False, True):
        path = get_checkpoint_name(load_dir, resolved[0], resolved[1], 0, 0, pipeline_parallel)
        if os.path.isfile(path):
            return path
    names = sorted(os.listdir(folder))
    raise CheckpointError(f"checkpoint {folder} has no rank-0 file (mp_rank_00 or "
                          f"mp_rank_00_000 with {_RANK_FILE}; found: {list_names(names)})")


def _read_saved_args(path: str):
    """(saved args, checkpoint version) of a checkpoint file; its tensors are mapped, not
    read (every rank of a large run reads this file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not the zip format: no mmap
        state = _read_state(path)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"could not read checkpoint file {path}: {e}") from e
    saved = state.get("args") if isinstance(state, dict) else None
    if saved is None:
        raise CheckpointError(f"checkpoint file {path} holds no saved args to take the model "
                              "flags from; give them on the command line")
    return saved, state.get("checkpoint_version", 0)


def _saved_value(saved, dest: str, version):
    """One saved arg, with the spellings of older checkpoints."""
    if dest == "add_bias_linear" and hasattr(saved, "disable_bias_linear"):
        return not saved.disable_bias_linear
    if dest == "tensor_model_parallel_size" and version < 3.0:
        return getattr(saved, "model_parallel_size", None)
    return getattr(saved, dest, None)


def load_args_from_checkpoint(args, load_arg: str = "load", given: Iterable[str] | None = None):
    """Take the model flags of `args` from the saved args of the checkpoint it loads
    (--use-checkpoint-args), before the args are validated and the model is built.

    Every dest of CHECKPOINT_SHAPE_ARGS and CHECKPOINT_RUN_ARGS that the checkpoint records
    and that is not in `given` (the dests set on the command line) is set from it. A shape
    flag given with another value than the checkpoint's is a CheckpointError naming the flag
    and both values; other given flags win. With given None, Megatron's rule: a dest without
    a flag default counts as given when it holds a value, every other dest is taken.
    Returns (args, the checkpoint's args)."""
    load_dir = getattr(args, load_arg, None)
    if load_dir is None:
        raise CheckpointError(f"--use-checkpoint-args needs --{load_arg.replace('_', '-')}")
    path = checkpoint_rank0_file(args, load_arg)
    saved, version = _read_saved_args(path)
    dests = [dest for dest, _ in CHECKPOINT_SHAPE_ARGS] + list(CHECKPOINT_RUN_ARGS)
    if given is None:
        given = {d for d in _NO_DEFAULT if getattr(args, d, None) is not None}
    given = set(given)
    conflicts = []
    for dest, flag in CHECKPOINT_SHAPE_ARGS:
        theirs = _saved_value(saved, dest, version)
        if dest in given and theirs is not None and getattr(args, dest, None) != theirs:
            conflicts.append(f"{flag} ({dest}) is {getattr(args, dest, None)} on the command "
                             f"line but {theirs} in the checkpoint")
    if conflicts:
        raise CheckpointError(f"{path}: " + "; ".join(conflicts)
                              + " (drop the flag to take the checkpoint's)")
    taken = []
    for dest in dests:
        value = _saved_value(saved, dest, version)
        if dest not in given and value is not None:
            setattr(args, dest, value)
            taken.append(f"{dest}={value}")
    if int(os.getenv("RANK", "0")) == 0:
        print(f"> --use-checkpoint-args: from {path}: {', '.join(taken) or 'nothing'}",
              flush=True)
    return args, saved


# ----------------------------------------------------------------------------------------
# Writing files
# ----------------------------------------------------------------------------------------


def _is_out_of_space(exc: BaseException) -> bool:
    """Whether exc, or an exception it was raised from or during, is ENOSPC / EDQUOT."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        todo += [e.__cause__, e.__context__]
    return False


def out_of_space_error(exc: BaseException, what: str) -> BaseException:
    """A one-line CheckpointSpaceError for a disk-full exc, else exc itself."""
    if _is_out_of_space(exc):
        return CheckpointSpaceError(f"no space left on device while writing {what}")
    return exc


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path: str, write: Callable, mode: str = "wb") -> None:
    """write(f) into path.tmp.PID, flush, fsync, rename to path. On any failure the
    partial file is removed and path is untouched; a full disk is a CheckpointSpaceError."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        error = out_of_space_error(e, path)
        if error is e:
            raise
        raise error from None


def _atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temp_files(save_dir: str) -> list[str]:
    """Delete the NAME.tmp.PID files under save_dir whose process is gone (a save killed
    midway); returns their paths. Called while no rank of this run is writing."""
    removed = []
    for root, _, files in os.walk(save_dir):
        for name in files:
            match = _TMP_RE.search(name)
            if match and not _pid_alive(int(match.group(1))):
                path = os.path.join(root, name)
                _remove_quietly(path)
                removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------
# Agreement between ranks
# ----------------------------------------------------------------------------------------


def _is_rank_0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def agree(error: BaseException | None) -> None:
    """Every rank calls this with its own error or None; if any rank has one, every rank
    raises (its own, else the first rank's message), so that no rank waits on the others."""
    if not torch.distributed.is_initialized():
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], device=current_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if not flag.item():
        return
    messages = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, None if error is None else str(error))
    if error is not None:
        raise error
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    raise CheckpointError(f"(rank {rank}) {message}")


# ----------------------------------------------------------------------------------------
# Finite weights
# ----------------------------------------------------------------------------------------


def check_weights_finite(models, iteration: int) -> None:
    """All ranks: NonFiniteLossError naming the iteration and the first bad parameter
    when any rank's weights hold NaN or inf."""
    bad = first_non_finite(models)
    error = None
    if bad is not None:
        error = NonFiniteLossError(
            f"iteration {iteration}: parameter {bad} holds NaN or inf; not saving the "
            "checkpoint (the run diverged: resume from the previous checkpoint, e.g. with "
            "a lower --lr)")
    try:
        agree(error)
    except CheckpointError as e:
        raise NonFiniteLossError(str(e)) from None


# ----------------------------------------------------------------------------------------
# Run lineage
# ----------------------------------------------------------------------------------------


def _run_id(args, train_state: TrainState | None = None) -> str:
    """This run's lineage id: the loaded checkpoint's, else a fresh random one; kept in
    train_state (a caller without one keeps it on args.checkpoint_run_id)."""
    if train_state is not None:
        if not train_state.run_id:
            train_state.run_id = uuid.uuid4().hex
        return train_state.run_id
    run_id = getattr(args, "checkpoint_run_id", None)
    if not run_id:
        run_id = uuid.uuid4().hex
        args.checkpoint_run_id = run_id
    return run_id


def read_run_id(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, RUN_ID_FILENAME)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def written_by_other_run(folder: str, run_id: str) -> bool:
    """Whether folder holds checkpoint files of a run other than run_id (a folder without
    run_id.txt counts as another run's)."""
    return holds_checkpoint_data(folder) and read_run_id(folder) != run_id


def foreign_checkpoints(save_dir: str, after_iteration: int, run_id: str) -> list[str]:
    """Checkpoint folders of save_dir newer than after_iteration from another run."""
    names = []
    for pattern in (ITER_RE, DS_STEP_RE):
        for it, name in sorted(iteration_folders(save_dir, pattern).items()):
            if it > after_iteration and written_by_other_run(
                    os.path.join(save_dir, name), run_id):
                names.append(name)
    return names


def _foreign_error(args, after: int, where: str,
                   train_state: TrainState | None = None) -> CheckpointError | None:
    found = foreign_checkpoints(args.save, after, _run_id(args, train_state))
    if not found:
        return None
    return CheckpointError(
        f"--save {args.save} holds checkpoints of another run {where} "
        f"({list_names(found, 3)}): refusing to overwrite them; resume that run with "
        f"--load {args.save}, or save to another folder")


def check_save_folder(start_iteration: int | None = None,
                      train_state: TrainState | None = None) -> None:
    """Before the first step: stop when --save holds checkpoints of another run (than
    train_state's lineage) newer than start_iteration (where this run starts), which it
    would overwrite. All ranks."""
    args = get_args()
    if not getattr(args, "save", None):
        return
    start = getattr(args, "iteration", 0) if start_iteration is None else start_iteration
    error = None
    if _is_rank_0():
        error = _foreign_error(args, start, f"newer than iteration {start}, where this run "
                               "starts", train_state)
    agree(error)


def adopt_lineage(args, folder: str, new_lineage: bool,
                  train_state: TrainState | None = None) -> None:
    """A resume carries on the loaded checkpoint's run id (into train_state, else onto
    args for a caller without one); --finetune and release start a new one."""
    run_id = None if new_lineage else read_run_id(folder)
    if train_state is not None:
        train_state.run_id = run_id
    else:
        args.checkpoint_run_id = run_id


def prepare_save_folder(args, folder: str, iteration: int,
                        train_state: TrainState | None = None) -> None:
    """Rank 0, before `iteration` is saved into folder: drop stale temporary files, refuse
    when another run's checkpoints are at `iteration` or later, write run_id.txt."""
    error = None
    if _is_rank_0():
        try:
            for path in remove_stale_temp_files(args.save):
                print(f"removed {path}: left by a save that was killed", flush=True)
            foreign = _foreign_error(args, iteration - 1, f"at iteration {iteration} or later",
                                     train_state)
            if foreign is not None:
                raise foreign
            _atomic_write_text(os.path.join(folder, RUN_ID_FILENAME),
                               _run_id(args, train_state) + "\n")
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            error = e
    agree(error)


# ----------------------------------------------------------------------------------------
# --keep-last-checkpoints
# ----------------------------------------------------------------------------------------


def checkpoints_to_delete(iterations: Iterable[int], keep: int | None,
                          tracked: int) -> list[int]:
    """The iterations to delete so that `keep` remain up to the tracked one (which always
    stays); newer folders (a run resumed from an earlier checkpoint) are left alone."""
    if not keep or keep < 1:
        return []
    eligible = sorted({it for it in iterations if it <= tracked})
    kept = set(eligible[-keep:]) | {tracked}
    return [it for it in eligible if it not in kept]


def prune_checkpoints(save_dir: str, tracked: int, keep: int | None, run_id: str,
                      pattern: re.Pattern = ITER_RE) -> list[str]:
    """Rank 0, after the tracker names `tracked`: delete this run's oldest checkpoint
    folders beyond `keep` (never another run's, never release); returns their names."""
    ours = {it: name for it, name in iteration_folders(save_dir, pattern).items()
            if read_run_id(os.path.join(save_dir, name)) == run_id}
    removed = []
    for it in checkpoints_to_delete(ours, keep, tracked):
        try:
            shutil.rmtree(os.path.join(save_dir, ours[it]))
            removed.append(ours[it])
        except OSError as e:
            print(f"WARNING: could not remove old checkpoint {ours[it]}: {e}", flush=True)
    return removed


def finish_save(args, iteration: int, pattern: re.Pattern = ITER_RE,
                train_state: TrainState | None = None) -> None:
    """All ranks, once every rank file is in place: rank 0 points the tracker at
    `iteration`, then applies --keep-last-checkpoints."""
    error = None
    if _is_rank_0():
        try:
            _atomic_write_text(get_checkpoint_tracker_filename(args.save), str(iteration))
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            error = e
    agree(error)
    keep = getattr(args, "keep_last_checkpoints", None)
    if keep and _is_rank_0():
        run_id = _run_id(args, train_state)
        for name in prune_checkpoints(args.save, iteration, keep, run_id, pattern):
            print(f"removed old checkpoint {name} (--keep-last-checkpoints {keep})", flush=True)


# ----------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------


def get_rng_state() -> dict:
    """Python, numpy, torch, device and tracker RNG states of this rank."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": mpu.get_cuda_rng_tracker().get_states(),
    }
    if is_gpu():
        state["cuda_rng_state"] = get_accelerator().get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if is_gpu() and "cuda_rng_state" in state:
        get_accelerator().set_rng_state(state["cuda_rng_state"])
    if not state.get("rng_tracker_states"):
        raise KeyError("rng_tracker_states")
    mpu.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


# ----------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------


def _model_state(model) -> dict:
    models = unwrap_model(model if isinstance(model, list) else [model])
    if len(models) == 1:
        return {"model": models[0].state_dict_for_save_checkpoint()}
    state = {}
    for i, m in enumerate(models):
        mpu.set_virtual_pipeline_model_parallel_rank(i)
        state[f"model{i}"] = m.state_dict_for_save_checkpoint()
    return state


def checkpoint_header(args, iteration: int, train_state: TrainState | None = None) -> dict:
    """The entries every checkpoint (Megatron's or DeepSpeed's client state) starts with:
    the args, the version and the run state (train_state at `iteration`; without one, the
    counters a caller keeps on args)."""
    state = train_state.copy() if train_state is not None else TrainState.from_args(args)
    state.iteration = iteration
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
            **state.checkpoint_entries()}


def _checkpoint_state(args, iteration: int, model, optimizer, lr_scheduler,
                      train_state: TrainState | None) -> dict:
    state = checkpoint_header(args, iteration, train_state)
    state.update(_model_state(model))
    if not args.no_save_optim:
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if lr_scheduler is not None:
            state["lr_scheduler"] = lr_scheduler.state_dict()
    if not args.no_save_rng:
        state.update(get_rng_state())
    return state


def save_checkpoint(iteration: int, model, optimizer, lr_scheduler,
                    train_state: TrainState | None = None) -> None:
    """Save this rank's model (and optimizer, scheduler, RNG unless --no-save-*) and the
    run state (train_state: consumed samples, ...) at `iteration`, then, after every rank
    is done, point the tracker at it. Nothing is written when a weight is NaN or inf or
    when --save's folder for `iteration` belongs to another run. (DeepSpeed engines save
    through deepspeed_engine.DeepSpeedBackend.)"""
    args = get_args()
    check_weights_finite(unwrap_model(model if isinstance(model, list) else [model]),
                         iteration)
    print_rank_0(f"saving checkpoint at iteration {iteration:7d} to {args.save}")
    prepare_save_folder(args, os.path.join(args.save, _folder_name(iteration)), iteration,
                        train_state)
    error = None
    distrib_state = _distributed_optimizer_state(args, optimizer)  # every DP rank joins
    if mpu.get_data_parallel_rank() == 0:
        try:
            state = _checkpoint_state(args, iteration, model, optimizer, lr_scheduler,
                                      train_state)
            path = get_checkpoint_name(args.save, iteration)
            _atomic_torch_save(state, path)
            if distrib_state is not None:
                _atomic_torch_save(distrib_state, distributed_optimizer_checkpoint_name(path))
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            error = e
    agree(error)
    finish_save(args, iteration, train_state=train_state)
    print_rank_0(f"  successfully saved checkpoint at iteration {iteration:7d} to {args.save}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------
# Distributed optimizer (--use-distributed-optimizer): distrib_optim.pt beside
# model_optim_rng.pt, written by data-parallel rank 0 with every rank's shards gathered
# ----------------------------------------------------------------------------------------


def distributed_optimizer_checkpoint_name(model_checkpoint_name: str) -> str:
    """distrib_optim.pt in the folder of this model-parallel rank's model_optim_rng.pt."""
    return os.path.join(os.path.dirname(model_checkpoint_name), "distrib_optim.pt")


def _distributed_optimizer_state(args, optimizer) -> dict | None:
    """The gathered optimizer shards on data-parallel rank 0 (a collective), else None."""
    if not getattr(args, "use_distributed_optimizer", False) or optimizer is None:
        return None
    if args.no_save_optim:
        return None
    return optimizer.parameter_state()


def _check_optimizer_sharding(args, state: dict, path: str) -> bool:
    """Whether model_optim_rng.pt's optimizer state is sharded (distrib_optim.pt beside
    it); a sharded state needs --use-distributed-optimizer. (An unsharded state loads
    into the distributed optimizer, which takes its shard of it.)"""
    saved_sharded = "distributed_optimizer" in (state.get("optimizer") or {})
    if saved_sharded and not getattr(args, "use_distributed_optimizer", False):
        raise CheckpointError(
            f"{path} was saved with --use-distributed-optimizer (its optimizer state is in "
            f"{distributed_optimizer_checkpoint_name(path)}); pass --use-distributed-optimizer "
            "to resume it (at any data-parallel size), or --no-load-optim to load only the model"
        )
    return saved_sharded


def _load_distributed_optimizer_state(optimizer, path: str) -> None:
    """Read distrib_optim.pt beside `path` (saved at any data-parallel size)."""
    optim_path = distributed_optimizer_checkpoint_name(path)
    if not os.path.isfile(optim_path):
        raise CheckpointError(
            f"{optim_path} is missing: a --use-distributed-optimizer checkpoint keeps its "
            "optimizer shards there; pass --no-load-optim to load only the model"
        )
    try:
        # memory-mapped: each rank reads only the elements of its own shard
        shards = torch.load(optim_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"could not read checkpoint file {optim_path}: {e}") from e
    try:
        optimizer.load_parameter_state(shards, optim_path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


# ----------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------


def _read_state(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"could not read checkpoint file {path}: {e}") from e


def _load_model_state(models, state: dict, strict: bool) -> None:
    if len(models) == 1:
        models[0].load_state_dict(state["model"], strict=strict)
        return
    for i, m in enumerate(models):
        mpu.set_virtual_pipeline_model_parallel_rank(i)
        m.load_state_dict(state[f"model{i}"], strict=strict)


def _load_optimizer_state(optimizer, lr_scheduler, state: dict, path: str,
                          load_lr: bool = True) -> None:
    try:
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if lr_scheduler is not None and load_lr:
            lr_scheduler.load_state_dict(state["lr_scheduler"])
    except KeyError as e:
        raise CheckpointError(
            f"unable to load optimizer state from {path} (missing {e}); use "
            "--no-load-optim or --finetune to load only the model"
        ) from e


def _load_rng_state(state: dict, path: str) -> None:
    try:
        set_rng_state(state)
    except KeyError as e:
        raise CheckpointError(
            f"unable to load RNG state from {path} (missing {e}); use --no-load-rng or "
            "--finetune to load only the model"
        ) from e


class LoadOptions(NamedTuple):
    """What a load restores besides the weights (from the flags, or weights only)."""

    finetune: bool = False  # weights only, iteration 0, a new run lineage (--finetune)
    load_optim: bool = True  # optimizer and lr scheduler (not --no-load-optim)
    load_rng: bool = True  # RNG states (not --no-load-rng)
    weights_only: bool = False  # the weights and nothing else: no counters, no lineage
    load_lr: bool = True  # the lr scheduler's state (not --no-load-lr-state)
    # --reset-iteration: everything loads but the counters (iteration, consumed samples
    # and tokens) start at 0, as a new run lineage
    reset_iteration: bool = False
    # --exit-on-missing-checkpoint: a --load folder without a checkpoint is an error
    require_checkpoint: bool = False

    @classmethod
    def from_args(cls, args) -> LoadOptions:
        return cls(finetune=bool(getattr(args, "finetune", False)),
                   load_optim=not getattr(args, "no_load_optim", False),
                   load_rng=not getattr(args, "no_load_rng", False),
                   load_lr=not getattr(args, "no_load_lr_state", False),
                   reset_iteration=bool(getattr(args, "reset_iteration", False)),
                   require_checkpoint=bool(getattr(args, "exit_on_missing_checkpoint", False)))

    @classmethod
    def weights(cls) -> LoadOptions:
        return cls(load_optim=False, load_rng=False, weights_only=True)

    @property
    def restores_run(self) -> bool:
        """Whether the iteration, consumed samples and lineage come from the checkpoint."""
        return not (self.finetune or self.weights_only)

    @property
    def restores_counters(self) -> bool:
        """Whether the iteration and consumed samples/tokens come from the checkpoint."""
        return self.restores_run and not self.reset_iteration


def missing_checkpoint_error(load_dir: str, what: str) -> CheckpointError:
    """--exit-on-missing-checkpoint with nothing to load in load_dir."""
    where = load_dir if os.path.isdir(load_dir) else f"{load_dir} (no such folder)"
    return CheckpointError(
        f"--load {where}: {what}; --exit-on-missing-checkpoint is set, so the run stops "
        "instead of starting from random (check the path, or drop the flag)")


# QKV row order of the self-attention's query_key_value, by checkpoint version: versions
# before 2.0 grouped the rows differently (Megatron's 0: [3, np, hn], 1.0: [np, hn, 3]);
# 2.0 and later (and this code) use [np, 3, hn].
_QKV_LAYOUTS = {0: "[3, np, hn]", 1: "[np, hn, 3]"}
_QKV_KEYS = ("query_key_value.weight", "query_key_value.bias")


def _qkv_to_current(t: torch.Tensor, version: float, heads: int, head_dim: int) -> torch.Tensor:
    """One query_key_value shard ([3 * heads * head_dim, ...]) in version 2.0's row order."""
    rest = t.shape[1:]
    if version < 1.0:
        t = t.view(3, heads, head_dim, *rest).transpose(0, 1)  # [np, 3, hn, ...]
    else:
        t = t.view(heads, head_dim, 3, *rest).transpose(1, 2)  # [np, 3, hn, ...]
    return t.contiguous().view(3 * heads * head_dim, *rest)


def convert_qkv_layout(model_state: dict, version: float, checkpoint_args, tp: int,
                       path: str) -> int:
    """Rewrite in place the query_key_value weights and biases of a checkpoint older than
    version 2.0 into the current row order; returns how many tensors changed. Grouped-query
    attention had no such versions: a checkpoint that says otherwise is refused."""
    heads = getattr(checkpoint_args, "num_attention_heads", None)
    hidden = getattr(checkpoint_args, "hidden_size", None)
    kv_heads = getattr(checkpoint_args, "num_key_value_heads", None)
    layout = _QKV_LAYOUTS[0 if version < 1.0 else 1]
    if heads is None or hidden is None or (kv_heads not in (None, heads)):
        raise CheckpointError(
            f"{path}: checkpoint_version {version} stores the query_key_value rows as "
            f"{layout}, and its saved args do not give the plain multi-head shape needed to "
            "reorder them (num_attention_heads, hidden_size, no grouped-query attention); "
            "only version >= 2.0 ([np, 3, hn]) loads as it is")
    head_dim = getattr(checkpoint_args, "kv_channels", None) or hidden // heads
    local_heads = heads // tp
    changed = 0

    def walk(d: dict) -> None:
        nonlocal changed
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            elif torch.is_tensor(value) and key.endswith(_QKV_KEYS):
                if value.shape[0] != 3 * local_heads * head_dim:
                    raise CheckpointError(
                        f"{path}: {key} has {value.shape[0]} rows, not 3 x {local_heads} "
                        f"heads x {head_dim} channels (checkpoint_version {version})")
                d[key] = _qkv_to_current(value, version, local_heads, head_dim)
                changed += 1

    walk(model_state)
    return changed


def check_checkpoint_version(state: dict, path: str, tp: int | None = None) -> float:
    """The checkpoint's version; one older than 2.0 has its QKV rows reordered (plain
    multi-head attention) or is refused, naming the version and the file. A version newer
    than this code writes is refused too."""
    version = state.get("checkpoint_version", 0)
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint_version {version} is newer than this code reads "
            f"({CHECKPOINT_VERSION})")
    if version >= 2.0:
        return version
    model_keys = [k for k in state if k == "model" or re.fullmatch(r"model\d+", k)]
    if model_keys:
        tp = tp if tp is not None else mpu.get_tensor_model_parallel_world_size()
        saved = state.get("args")
        n = sum(convert_qkv_layout(state[k], version, saved, tp, path) for k in model_keys)
        print_rank_0(f" > {path}: checkpoint_version {version}: {n} query_key_value "
                     f"tensors reordered from {_QKV_LAYOUTS[0 if version < 1.0 else 1]} "
                     "to [np, 3, hn]")
    return version


def _load_megatron_checkpoint(model, optimizer, lr_scheduler, load_dir: str, load_tag,
                              strict: bool, options: LoadOptions,
                              train_state: TrainState | None = None, model_args=None) -> int:
    args = get_args()
    resolved = resolve_checkpoint(load_dir, load_tag)
    if resolved is None:
        if options.require_checkpoint:
            raise missing_checkpoint_error(
                load_dir, f"no checkpoint there ({TRACKER_FILENAME} not found)")
        print_rank_0(f"WARNING: could not find the metadata file "
                     f"{get_checkpoint_tracker_filename(load_dir)}\n"
                     "    will not load any checkpoints and will start from random")
        return 0
    iteration, release = resolved
    path = get_checkpoint_name(load_dir, iteration, release)
    _check_layout_before_reading(load_dir, path)
    print_rank_0(f" loading checkpoint from {load_dir} at iteration {iteration}")
    state = _read_state(path)
    set_checkpoint_version(check_checkpoint_version(state, path))
    restore = options.restores_run and not release
    counters = options.restores_counters and not release
    if "args" in state:
        check_checkpoint_args(state["args"], model_args or args, load_dir)
        if counters and train_state is not None:
            train_state.restore(state, iteration=iteration)
            update_num_microbatches(train_state.consumed_train_samples,
                                    consistency_check=False)
    _load_model_state(unwrap_model(model if isinstance(model, list) else [model]), state,
                      strict)
    if not options.weights_only:
        adopt_lineage(args, os.path.dirname(os.path.dirname(path)), not counters, train_state)
    if options.finetune or release:
        iteration = 0
    elif restore and not counters:
        iteration = 0
        print_rank_0(" > --reset-iteration: the iteration and consumed samples start at 0")
    if restore and options.load_optim:
        sharded = optimizer is not None and _check_optimizer_sharding(args, state, path)
        _load_optimizer_state(optimizer, lr_scheduler, state, path, options.load_lr)
        if sharded:
            _load_distributed_optimizer_state(optimizer, path)
    elif optimizer is not None:
        optimizer.reload_model_params()  # the master weights follow the loaded model
    if restore and options.load_rng:
        _load_rng_state(state, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    print_rank_0(f"  successfully loaded checkpoint from {load_dir} at iteration {iteration}")
    return iteration


def load_checkpoint(model, optimizer, lr_scheduler, load_arg: str = "load",
                    strict: bool = True, train_state: TrainState | None = None) -> int:
    """Load --load-tag's, else the tracker's (or release) checkpoint from args.<load_arg>
    into the model (and optimizer, scheduler, RNG as the flags say) and its run state into
    train_state; return the iteration to resume from (0 for a fresh start or --finetune).
    A training load (with an optimizer) then checks that --save holds no other run's
    newer checkpoints. (DeepSpeed engines load through deepspeed_engine.DeepSpeedBackend.)"""
    args = get_args()
    load_dir = getattr(args, load_arg)
    load_tag = getattr(args, "load_tag", None) if load_arg == "load" else None
    iteration = _load_megatron_checkpoint(model, optimizer, lr_scheduler, load_dir, load_tag,
                                          strict, LoadOptions.from_args(args), train_state)
    if optimizer is not None:
        check_save_folder(iteration, train_state)
    return iteration


def load_model_weights_only(model, load_dir: str, strict: bool = True,
                            model_args=None) -> int:
    """Load just the weights of load_dir's tracked checkpoint (for generation and
    evaluation): no optimizer, RNG, consumed samples or run lineage; returns the
    checkpoint's iteration. model_args (default: the run's args) holds the shape the
    checkpoint must have (a distillation teacher has its own)."""
    return _load_megatron_checkpoint(model, None, None, load_dir, None, strict,
                                     LoadOptions.weights(), model_args=model_args)
