"""The GPT of an inference entry point (generation, the text generation server)."""

from __future__ import annotations

import argparse

import torch

from megatron import get_args, print_rank_0
from megatron.accelerator import current_device
from megatron.checkpointing import load_checkpoint
from megatron.model import GPTModel
from megatron.model.config import config_from_args


def model_provider(pre_process: bool = True, post_process: bool = True) -> GPTModel:
    """GPT whose logits are gathered over the tensor-parallel ranks (full vocabulary)."""
    print_rank_0("building GPT model ...")
    return GPTModel(
        config_from_args(get_args()),
        num_tokentypes=0,
        parallel_output=False,
        pre_process=pre_process,
        post_process=post_process,
    )


def build_inference_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model on this rank's device in fp16/bf16 as the flags say, weights loaded from
    --load, in eval mode. No data-parallel wrapper (nothing is trained) and no
    Float16Module: the inputs are integer ids and a boolean mask, and its fp32 copy of
    every output would copy the whole key/value cache at each step; the sampler takes
    half-precision logits as they are."""
    # The key/value cache and activation recompute (a training-time memory saver) exclude
    # each other in the transformer; generation has no backward pass to save memory for.
    args.checkpoint_activations = False
    args.recompute_granularity = None
    # Sequence parallelism splits the sequence over the tensor-parallel ranks; a cached
    # step feeds one token. It changes no weight, so a checkpoint trained with it loads.
    args.sequence_parallel = False
    model = model_provider().to(current_device())
    if args.fp16:
        model = model.half()
    elif args.bf16:
        model = model.bfloat16()
    load_checkpoint(model, None, None)
    return model.eval()
