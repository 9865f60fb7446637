"""Merge a tensor-parallel checkpoint to one partition, optionally splitting it into
pipeline stages (the seed README's command):

    WORLD_SIZE=$TENSOR_MODEL_PARALLEL_SIZE python tools/merge_mp_partitions.py \
        --model-type BERT --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 1 --target-pipeline-model-parallel-size 2 \
        --tokenizer-type BertWordPieceLowerCase --vocab-file bert-vocab.txt \
        --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 512 \
        --max-position-embeddings 512 --load checkpoints/bert_345m \
        --save checkpoints/bert_345m/merged

The model flags are Megatron's own and are checked against the checkpoint (the shape
flags of megatron/checkpointing.py, LLaMA-family options included: --swiglu,
--num-key-value-heads, --normalization, --untie-embeddings-and-output-weights, ...), whose
layout is the one its saved args record: a missing, unreadable or unexpected rank file, or a
shard whose shape the saved args contradict, stops the merge before anything is written
(one line on stderr naming the file(s), exit status 1). The vocabulary is re-padded for
TP = 1 from the tokenizer named by the flags. Only the model weights (with args,
iteration and consumed samples) are written: resume with --no-load-optim --no-load-rng,
or use the result with --finetune.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))


def get_mp_merge_args(parser):
    """The merge flags, added to Megatron's parser."""
    group = parser.add_argument_group(title="mp merge")
    group.add_argument(
        "--model-type", type=str, required=True, choices=["BERT", "GPT"], help="Type of the model."
    )
    group.add_argument(
        "--target-pipeline-model-parallel-size",
        type=int,
        default=1,
        help="Pipeline stages of the merged checkpoint.",
    )
    return parser


def parse_merge_args(argv: list[str] | None = None):
    """Megatron's flags plus the merge flags, validated for the source layout."""
    from megatron.arguments import ArgumentError, build_parser, validate_args

    parser = build_parser(get_mp_merge_args)
    args = parser.parse_args(argv)
    world = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and int(env_world) != args.tensor_model_parallel_size:
        parser.error(
            f"WORLD_SIZE={env_world} must equal --tensor-model-parallel-size "
            f"({args.tensor_model_parallel_size})"
        )
    if args.load is None or args.save is None:
        parser.error("--load and --save are required")
    try:
        validate_args(args, {"micro_batch_size": 1}, world_size=world, rank=0)
    except ArgumentError as e:
        parser.error(str(e))
    return args


def _check_model_flags(source, args) -> None:
    """The checkpoint's layout (from its saved args) and model shape must be the ones the
    flags describe."""
    from megatron.checkpoint_reshape import ReshapeError

    flags = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    if (source.tp, source.pp) != flags:
        raise ReshapeError(
            f"{args.load} holds TP={source.tp} x PP={source.pp} partitions "
            f"({source.describe()}) but the flags say --tensor-model-parallel-size "
            f"{flags[0]} --pipeline-model-parallel-size {flags[1]}"
        )
    from megatron.checkpointing import MODEL_ARGS_TO_CHECK

    for name, flag in MODEL_ARGS_TO_CHECK:
        theirs = getattr(source.args, name, None)
        if name == "padded_vocab_size" or theirs is None:
            continue  # the padded vocab follows the source TP; the merge re-pads it
        if theirs != getattr(args, name, None):
            raise ReshapeError(
                f"{flag}: checkpoint {args.load} has {theirs}, the flags say {getattr(args, name)}"
            )


def fail(error: BaseException) -> int:
    """Report a checkpoint that cannot be merged: one line on stderr, exit status 1."""
    print(f"merge_mp_partitions.py: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_merge_args(argv)
    from megatron.checkpoint_reshape import ReshapeError, load_source, reshape_checkpoint
    from megatron.tokenizer.tokenizer import build_tokenizer

    args.rank = 1  # keep the tokenizer quiet; this tool prints its own summary
    true_vocab = build_tokenizer(args).vocab_size if args.vocab_file else None
    try:
        source = load_source(args.load)
        _check_model_flags(source, args)
        summary = reshape_checkpoint(
            args.load,
            args.save,
            1,
            args.target_pipeline_model_parallel_size,
            true_vocab_size=true_vocab,
            divisible_by=args.make_vocab_size_divisible_by,
            source=source,
        )
    except (ReshapeError, OSError) as e:
        return fail(e)
    print(
        f"merged {args.model_type} checkpoint {args.load} "
        f"(TP={summary['source_tp']}, PP={summary['source_pp']}, iteration "
        f"{summary['iteration']}) into {args.save} (TP=1, "
        f"PP={args.target_pipeline_model_parallel_size})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
