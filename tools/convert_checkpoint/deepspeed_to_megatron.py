"""Convert a DeepSpeed GPT checkpoint to a Megatron checkpoint that pretrain_gpt.py
(without --deepspeed) loads.

    python tools/convert_checkpoint/deepspeed_to_megatron.py \
        --input_folder checkpoints/gpt_ds/global_step1000 \
        --output_folder checkpoints/gpt_megatron --target_tp 2 --target_pp 2

The input is a checkpoint folder (global_stepN/) or the save folder (its `latest` file
names the tag), written by the engine for GPTModel (ZeRO 0-3) or by DeepSpeed's pipeline
engine for GPTModelPipe, at any tensor-parallel size. The weights are merged to one model
and split to --target_tp x --target_pp through megatron/checkpoint_reshape.py's tables;
the output is {output_folder}/iter_{N:07d}/mp_rank_TT[_PPP]/model_optim_rng.pt (or
release/ with --for_release) and latest_checkpointed_iteration.txt. Optimizer and RNG
states are not converted: resume with --no-load-optim --no-load-rng (or --finetune).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.checkpoint_reshape import (  # noqa: E402
    CHECKPOINT_VERSION,
    ModelOptions,
    ReshapeError,
    _true_vocab_from_args,
    _write_files,
    from_canonical,
    padded_vocab_size,
)
from tools.convert_checkpoint.deepspeed_checkpoint import read_deepspeed_checkpoint  # noqa: E402

_WORD = ("language_model", "embedding", "word_embeddings", "weight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="DeepSpeed to Megatron checkpoint converter", allow_abbrev=False
    )
    parser.add_argument(
        "--input_folder",
        required=True,
        help="DeepSpeed checkpoint folder (global_stepN) or its save folder.",
    )
    parser.add_argument("--output_folder", required=True, help="Megatron checkpoint folder.")
    parser.add_argument("--target_tp", type=int, default=1, help="Target tensor-parallel size.")
    parser.add_argument("--target_pp", type=int, default=1, help="Target pipeline size.")
    parser.add_argument(
        "--for_release",
        action="store_true",
        help="Write release/ (loads as iteration 0, weights only).",
    )
    parser.add_argument(
        "--true_vocab_size",
        type=int,
        default=None,
        help="Unpadded vocabulary size, needed when the padding must change (else the "
        "tokenizer's, when the files the checkpoint's args name exist).",
    )
    return parser


def _target_padded_vocab(full, args, target_tp: int, true_vocab: int | None) -> int:
    rows = full[_WORD].size(0)
    divisible_by = getattr(args, "make_vocab_size_divisible_by", 128)
    if true_vocab is not None:
        return padded_vocab_size(true_vocab, divisible_by, target_tp)
    if rows % (divisible_by * target_tp) != 0:
        raise ReshapeError(
            f"the padded vocab ({rows}) must be re-padded for --target_tp "
            f"{target_tp}: give --true_vocab_size"
        )
    return rows


def _target_args(args, tp: int, pp: int, padded_vocab: int):
    args = copy.copy(args)
    args.tensor_model_parallel_size = tp
    args.pipeline_model_parallel_size = pp
    args.virtual_pipeline_model_parallel_size = None
    args.num_layers_per_virtual_pipeline_stage = None
    args.padded_vocab_size = padded_vocab
    args.deepspeed = False
    return args


def convert(
    input_folder: str,
    output_folder: str,
    target_tp: int = 1,
    target_pp: int = 1,
    for_release: bool = False,
    true_vocab_size: int | None = None,
) -> dict:
    """Write the Megatron checkpoint; returns {'iteration', 'files'}."""
    if target_tp < 1 or target_pp < 1:
        raise ReshapeError(f"--target_tp ({target_tp}) and --target_pp ({target_pp}) must be >= 1")
    full, client = read_deepspeed_checkpoint(input_folder)
    args = client.get("args")
    if args is None:
        raise ReshapeError(
            f"{input_folder}: no Megatron 'args' in the client state; was it "
            "written by pretrain_gpt.py --deepspeed?"
        )
    if args.num_layers % target_pp != 0:
        raise ReshapeError(
            f"--num-layers {args.num_layers} is not divisible by --target_pp {target_pp}"
        )
    if true_vocab_size is None:  # the tokenizer's, when the files its args name exist
        true_vocab_size = _true_vocab_from_args(args)
    padded = _target_padded_vocab(full, args, target_tp, true_vocab_size)
    grid = from_canonical(
        full, target_tp, target_pp, padded, true_vocab_size, ModelOptions.from_args(args)
    )
    iteration = 0 if for_release else int(client.get("iteration", 0))
    folder = os.path.join(output_folder, "release" if for_release else f"iter_{iteration:07d}")
    out_args = _target_args(args, target_tp, target_pp, padded)
    files = {}
    for (t, p), model in sorted(grid.items()):
        sub = f"mp_rank_{t:02d}_{p:03d}" if target_pp > 1 else f"mp_rank_{t:02d}"
        state = {
            "args": out_args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "model": model,
        }
        if not for_release:
            for key in ("consumed_train_samples", "consumed_valid_samples"):
                state[key] = client.get(key, 0)
        files[os.path.join(os.path.basename(folder), sub, "model_optim_rng.pt")] = state
    # every file under a temporary name first; on a failure what was created is removed
    _write_files(output_folder, files, "release" if for_release else str(iteration))
    files = [os.path.join(output_folder, rel) for rel in files]
    return {"iteration": iteration, "files": files}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        summary = convert(
            args.input_folder,
            args.output_folder,
            args.target_tp,
            args.target_pp,
            args.for_release,
            args.true_vocab_size,
        )
    except ReshapeError as e:
        sys.exit(f"deepspeed_to_megatron.py: {e}")
    print(
        f"wrote {len(summary['files'])} files for iteration {summary['iteration']} to "
        f"{args.output_folder}"
    )


if __name__ == "__main__":
    main()
