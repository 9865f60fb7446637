"""Base classes of Megatron models: MegatronModule (tied word embeddings across the
pipeline) and Float16Module (fp16/bf16 wrapper)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch
from torch.nn.parameter import Parameter

from megatron import mpu

from .config import TransformerConfig


def param_is_not_shared(param: Parameter) -> bool:
    """False for the last stage's copy of the tied word embeddings (counted once, on the
    first stage, in grad norms and parameter counts)."""
    return not getattr(param, "shared", False)


class MegatronModule(torch.nn.Module):
    """torch.nn.Module with Megatron's checkpoint hook and tied word embeddings.

    With pipelining, the input embedding lives on the first stage and the output head
    (logits = h E^T) on the last. The last stage holds its own copy `word_embeddings`
    (a VocabParallelEmbedding whose weight is zero-initialised and then all-reduced from
    the first stage over the embedding group, so both start equal); the training loop
    all-reduces their gradients over the same group so they stay equal.
    """

    def __init__(self, share_word_embeddings: bool = True) -> None:
        super().__init__()
        self.share_word_embeddings = share_word_embeddings

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """What goes into the checkpoint; by default the plain state dict."""
        return self.state_dict(prefix=prefix, keep_vars=keep_vars)

    def word_embeddings_weight(self) -> Parameter:
        """The weight E [v/tp, h] of the (tied) word embeddings held on this stage."""
        if getattr(self, "pre_process", True):
            return self.language_model.embedding.word_embeddings.weight
        if not self.share_word_embeddings:
            raise RuntimeError(
                "megatron/model/module.py: word_embeddings_weight() called on a stage "
                "without embeddings while share_word_embeddings is False"
            )
        return self.word_embeddings.weight

    def initialize_word_embeddings(self, config: TransformerConfig) -> None:
        """Create the last stage's copy of the word embeddings and sync it (PP > 1)."""
        if not self.share_word_embeddings:
            raise RuntimeError(
                "megatron/model/module.py: initialize_word_embeddings() needs "
                "share_word_embeddings=True"
            )
        if mpu.get_pipeline_model_parallel_world_size() == 1:
            return
        pre_process = getattr(self, "pre_process", True)
        post_process = getattr(self, "post_process", True)
        if post_process and not pre_process:
            # zeros here; the first stage's weights arrive through the all-reduce below
            self.word_embeddings = mpu.VocabParallelEmbedding(
                config.padded_vocab_size,
                config.hidden_size,
                config=dataclasses.replace(config.parallel_config, perform_initialization=False),
                init_method=torch.nn.init.zeros_,
            )
            with torch.no_grad():
                self.word_embeddings.weight.zero_()
            self.word_embeddings.weight.shared = True
        if not (pre_process or post_process):
            return
        if self.word_embeddings_weight().is_meta:
            return  # built on the meta device: nothing to synchronise
        if not torch.distributed.is_initialized():
            print(
                "WARNING: torch.distributed is not initialised, so the last stage's word "
                "embeddings stay zero; initialise them before training",
                flush=True,
            )
            return
        if mpu.is_rank_in_embedding_group():
            weight = self.word_embeddings_weight()
            group = mpu.get_embedding_group()
            if weight.is_cuda or torch.distributed.get_backend(group) != "nccl":
                torch.distributed.all_reduce(weight.data, group=group)
            else:  # modules are built on CPU before .cuda(): NCCL needs a device copy
                from megatron.accelerator import current_device

                data = weight.data.to(current_device())
                torch.distributed.all_reduce(data, group=group)
                weight.data.copy_(data.cpu())


def conversion_helper(val: Any, conversion) -> Any:
    """Apply `conversion` to every element of a possibly nested tuple/list."""
    if not isinstance(val, (tuple, list)):
        return conversion(val)
    rtn = [conversion_helper(v, conversion) for v in val]
    if isinstance(val, tuple):
        rtn = tuple(rtn)
    return rtn


def fp32_to_float16(val: Any, float16_convertor) -> Any:
    """Convert fp32 tensors (possibly nested in tuples/lists) with `float16_convertor`."""

    def half_conversion(val):
        val_typecheck = val
        if isinstance(val_typecheck, (Parameter, torch.autograd.Variable)):
            val_typecheck = val.data
        if isinstance(val_typecheck, torch.Tensor) and val_typecheck.dtype == torch.float32:
            val = float16_convertor(val)
        return val

    return conversion_helper(val, half_conversion)


def float16_to_fp32(val: Any) -> Any:
    """Convert fp16/bf16 tensors (possibly nested in tuples/lists) to fp32."""

    def float_conversion(val):
        val_typecheck = val
        if isinstance(val_typecheck, (Parameter, torch.autograd.Variable)):
            val_typecheck = val.data
        if isinstance(val_typecheck, torch.Tensor) and val_typecheck.dtype in (
            torch.float16,
            torch.bfloat16,
        ):
            val = val.float()
        return val

    return conversion_helper(val, float_conversion)


class Float16Module(MegatronModule):
    """Run `module` in `dtype` (torch.float16 or torch.bfloat16): its parameters are
    converted once; fp32 inputs are converted on the first pipeline stage and outputs
    returned as fp32 on the last."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype == torch.float16:
            self.add_module("module", module.half())
            self.float16_convertor = _to_half
        elif dtype == torch.bfloat16:
            self.add_module("module", module.bfloat16())
            self.float16_convertor = _to_bf16
        else:
            raise ValueError(
                f"Float16Module: dtype must be torch.float16 or torch.bfloat16 (--fp16 or "
                f"--bf16), got {dtype}"
            )

    def set_input_tensor(self, input_tensor) -> None:
        return self.module.set_input_tensor(input_tensor)

    def forward(self, *inputs, **kwargs):
        if mpu.is_pipeline_first_stage():
            inputs = fp32_to_float16(inputs, self.float16_convertor)
        outputs = self.module(*inputs, **kwargs)
        if mpu.is_pipeline_last_stage():
            outputs = float16_to_fp32(outputs)
        return outputs

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict_for_save_checkpoint(prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)


def _to_half(val: torch.Tensor) -> torch.Tensor:
    return val.half()


def _to_bf16(val: torch.Tensor) -> torch.Tensor:
    return val.bfloat16()
