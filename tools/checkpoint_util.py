"""Reshape a Megatron checkpoint to another tensor- and pipeline-parallel layout.

    python tools/checkpoint_util.py --model-type GPT --load-dir ckpt/tp2_pp2 \
        --save-dir ckpt/tp1_pp4 --target-tensor-parallel-size 1 \
        --target-pipeline-parallel-size 4

The latest checkpoint of --load-dir (any TP x PP, interleaved chunks included) is merged
to one model through the key tables of megatron/checkpoint_reshape.py and split again to
the target layout, re-padding the vocabulary for the target TP. Model weights, args,
iteration and consumed samples are written; optimizer and RNG states are not, so resume
with --no-load-optim --no-load-rng. No process group is needed.

LLaMA-family checkpoints reshape the same way: the saved args say that SwiGLU's fused
gate/up weight splits in two halves (each rank holds its gate rows, then its up rows),
the untied output layer splits over the vocabulary like the word embeddings, and a
target TP size that does not divide the attention heads, the key/value heads
(--num-key-value-heads) or the FFN width is refused before anything is written.

The source layout is the one the checkpoint's saved args record (the rank folders' when
there are no args). A missing, unreadable or unexpected rank file, or a shard whose shape
the saved args contradict, stops the conversion before anything is written: one line on
stderr naming the file(s), exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Megatron checkpoint layout converter", allow_abbrev=False
    )
    parser.add_argument(
        "--model-type",
        default="GPT",
        choices=["GPT", "BERT"],
        help="Model whose checkpoint is converted.",
    )
    parser.add_argument(
        "--loader", default="megatron", choices=["megatron"], help="Format of --load-dir."
    )
    parser.add_argument(
        "--saver", default="megatron", choices=["megatron"], help="Format of --save-dir."
    )
    parser.add_argument("--load-dir", required=True, help="Checkpoint folder to read.")
    parser.add_argument("--save-dir", required=True, help="Checkpoint folder to write.")
    parser.add_argument(
        "--target-tensor-parallel-size",
        type=int,
        default=1,
        help="Tensor-parallel size of the written checkpoint.",
    )
    parser.add_argument(
        "--target-pipeline-parallel-size",
        type=int,
        default=1,
        help="Pipeline-parallel size of the written checkpoint.",
    )
    parser.add_argument(
        "--true-vocab-size",
        type=int,
        default=None,
        help="Unpadded vocabulary size (else read from the tokenizer files "
        "named in the checkpoint's args or --vocab-file).",
    )
    parser.add_argument(
        "--vocab-file", default=None, help="Vocabulary file giving the true vocab size."
    )
    parser.add_argument("--merge-file", default=None, help="GPT-2 merges (with --vocab-file).")
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=None,
        help="Vocab padding multiple (else the checkpoint's).",
    )
    return parser


def true_vocab_size(args) -> int | None:
    """--true-vocab-size, or the size of the tokenizer built from --vocab-file."""
    if args.true_vocab_size is not None:
        return args.true_vocab_size
    if args.vocab_file is None:
        return None
    from megatron.tokenizer.tokenizer import build_tokenizer

    tokenizer_type = "GPT2BPETokenizer" if args.merge_file else "BertWordPieceLowerCase"
    probe = argparse.Namespace(
        tokenizer_type=tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        rank=1,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
    )
    return build_tokenizer(probe).vocab_size


def fail(error: BaseException) -> int:
    """Report a checkpoint that cannot be converted: one line on stderr, exit status 1."""
    print(f"checkpoint_util.py: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.checkpoint_reshape import ReshapeError, reshape_checkpoint

    try:
        summary = reshape_checkpoint(
            args.load_dir,
            args.save_dir,
            args.target_tensor_parallel_size,
            args.target_pipeline_parallel_size,
            true_vocab_size=true_vocab_size(args),
            divisible_by=args.make_vocab_size_divisible_by,
        )
    except (ReshapeError, OSError) as e:
        return fail(e)
    print(
        f"converted {args.load_dir} (TP={summary['source_tp']}, PP={summary['source_pp']}, "
        f"virtual PP={summary['source_vp']}, iteration {summary['iteration']}) to "
        f"{args.save_dir} (TP={args.target_tensor_parallel_size}, "
        f"PP={args.target_pipeline_parallel_size}, "
        f"padded vocab {summary['padded_vocab_size']})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
