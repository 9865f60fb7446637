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

Hugging Face models in and out (megatron/hf_interop.py holds the key tables):

    # a GPT2LMHeadModel / LlamaForCausalLM folder -> a Megatron checkpoint at TP x PP
    python tools/checkpoint_util.py --loader hf --saver megatron --load-dir llama-hf \
        --save-dir ckpt/llama_tp2_pp2 --target-tensor-parallel-size 2 \
        --target-pipeline-parallel-size 2

    # a Megatron (any TP x PP) or DeepSpeed checkpoint -> a Hugging Face folder
    python tools/checkpoint_util.py --loader megatron --saver hf --load-dir ckpt/run \
        --save-dir llama-hf-out --max-shard-size 2GB

An imported model is written as a `release` checkpoint (iteration 0, weights only) whose
saved args hold the model and tokenizer flags, so `pretrain_gpt.py --load DIR --finetune`
and `--use-checkpoint-args` start from it; the command that trains from it is printed.
An exported model is written to a temporary folder beside --save-dir and moved in when
complete. A DeepSpeed checkpoint (a `latest` file naming global_stepN/ with
mp_rank_XX_model_states.pt, or that folder itself) is read with
tools/convert_checkpoint/deepspeed_checkpoint.py: ZeRO 1-3 engine states (ZeRO-3 from its
fp32 partitions) and pipeline-engine layer files; with --saver megatron it is converted
to a Megatron checkpoint at the target layout (tools/convert_checkpoint/deepspeed_to_megatron.py).
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
        "--loader",
        default="megatron",
        choices=["megatron", "hf"],
        help="Format of --load-dir: a Megatron (or DeepSpeed) checkpoint, or a Hugging Face "
        "model folder.",
    )
    parser.add_argument(
        "--saver",
        default="megatron",
        choices=["megatron", "hf"],
        help="Format of --save-dir: a Megatron checkpoint or a Hugging Face model folder.",
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
        help="Vocab padding multiple (else the checkpoint's; 128 for --loader hf).",
    )
    hf = parser.add_argument_group("Hugging Face")
    hf.add_argument(
        "--max-shard-size",
        default="5GB",
        help="--saver hf: largest safetensors file (e.g. 2GB, 500MB); larger models are "
        "sharded with model.safetensors.index.json.",
    )
    hf.add_argument(
        "--model-class",
        default="auto",
        choices=["auto", "gpt2", "llama"],
        help="--saver hf: GPT2LMHeadModel or LlamaForCausalLM (auto: Llama for a model with "
        "SwiGLU, RMSNorm or RoPE).",
    )
    hf.add_argument(
        "--hf-dtype",
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="--saver hf: dtype of the written weights (else the checkpoint's).",
    )
    hf.add_argument(
        "--tokenizer",
        default="auto",
        choices=["auto", "HFTokenizer", "GPTSentencePieceTokenizer", "GPT2BPETokenizer"],
        help="--loader hf: which tokenizer files of the folder to use when it holds several.",
    )
    hf.add_argument(
        "--no-tokenizer-files",
        action="store_true",
        help="--saver hf: write no tokenizer files (e.g. for a --tokenizer-type that has no "
        "Hugging Face form); the vocabulary is then cut to --true-vocab-size if given.",
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


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def is_deepspeed_checkpoint(load_dir: str) -> bool:
    """A DeepSpeed checkpoint: a global_stepN folder (mp_rank_XX_model_states.pt), or a save
    folder whose `latest` file names one (it may hold Megatron's tracker as well)."""
    from tools.convert_checkpoint.deepspeed_checkpoint import _MODEL_STATES_RE

    def holds_states(folder: str) -> bool:
        return os.path.isdir(folder) and any(_MODEL_STATES_RE.match(n) for n in os.listdir(folder))

    if holds_states(load_dir):
        return True
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        return False
    with open(latest) as f:
        return holds_states(os.path.join(load_dir, f.read().strip()))


def _check_layout_flags(args) -> None:
    for flag, value in (
        ("--target-tensor-parallel-size", args.target_tensor_parallel_size),
        ("--target-pipeline-parallel-size", args.target_pipeline_parallel_size),
    ):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")


def hf_to_megatron(args) -> dict:
    """--loader hf --saver megatron: a `release` checkpoint at the target layout."""
    from megatron.checkpoint_reshape import (
        CHECKPOINT_VERSION,
        RANK_FILENAME,
        ModelOptions,
        ReshapeError,
        _write_files,
        from_canonical,
        rank_folder_name,
    )
    from megatron.hf_interop import read_hf_model, train_command

    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    imp = read_hf_model(
        args.load_dir,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by or 128,
        tensor_model_parallel_size=tp,
        tokenizer=args.tokenizer,
        weights=getattr(args, "hf_weights", None),  # read by the caller (finetune_llama.py)
    )
    if imp.tokenizer is None:
        # no tokenizer files beside the model: ids in, ids out (NullTokenizer's last id is eod)
        imp.args.update(tokenizer_type="NullTokenizer", vocab_size=imp.true_vocab_size - 1)
    options = ModelOptions.from_args(imp.namespace())
    try:
        options.check_target(tp)
    except ReshapeError as e:
        raise ReshapeError(
            f"--target-tensor-parallel-size {tp}: {str(e).split(': ', 1)[1]}"
        ) from None
    layers = imp.args["num_layers"]
    if layers % pp != 0:
        raise ReshapeError(
            f"--target-pipeline-parallel-size {pp} does not divide the model's {layers} layers"
        )
    saved_args = imp.checkpoint_args(tp, pp)
    grid = from_canonical(imp.state, tp, pp, options=options)
    files = {
        os.path.join("release", rank_folder_name(t, p, pp > 1), RANK_FILENAME): {
            "args": saved_args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": 0,
            "model": model,
        }
        for (t, p), model in sorted(grid.items())
    }
    _write_files(args.save_dir, files, "release")
    command = train_command(imp, args.save_dir, tensor_model_parallel_size=tp,
                            pipeline_model_parallel_size=pp)  # fmt: skip
    return {"imp": imp, "command": command, "padded": saved_args.padded_vocab_size}


def read_megatron_or_deepspeed(load_dir: str):
    """(canonical state, saved args, description) of a Megatron or DeepSpeed checkpoint."""
    from megatron.checkpoint_reshape import (
        ModelOptions,
        ReshapeError,
        _check_output_layer,
        load_source,
        model_chunks,
        to_canonical,
    )

    if is_deepspeed_checkpoint(load_dir):
        from tools.convert_checkpoint.deepspeed_checkpoint import read_deepspeed_checkpoint

        full, client = read_deepspeed_checkpoint(load_dir)
        saved = client.get("args")
        what = f"DeepSpeed checkpoint, iteration {client.get('iteration', '?')}"
    else:
        source = load_source(load_dir)
        saved = source.args
        full = to_canonical(
            {k: model_chunks(v) for k, v in source.grid.items()}, ModelOptions.from_args(saved)
        )
        what = f"{source.describe()}, iteration {source.iteration}"
    if saved is None:
        raise ReshapeError(
            f"{load_dir}: the checkpoint holds no saved Megatron args; the model flags are "
            "needed to write a Hugging Face config"
        )
    _check_output_layer(load_dir, full, saved)
    return full, saved, what


def megatron_to_hf(args) -> dict:
    """--loader megatron --saver hf: written to a folder beside --save-dir, then moved in."""
    import shutil
    import tempfile

    import torch

    from megatron.hf_interop import HFInteropError, _existing_model_files, write_hf_model

    save_dir = os.path.abspath(args.save_dir)
    existing = _existing_model_files(save_dir)
    if existing:
        raise HFInteropError(
            f"--save-dir {args.save_dir} already holds a model ({', '.join(existing[:3])}); "
            "choose an empty folder"
        )
    full, saved, what = read_megatron_or_deepspeed(args.load_dir)
    tokenizer_info, vocab = (False if args.no_tokenizer_files else None), true_vocab_size(args)
    if getattr(saved, "tokenizer_type", None) == "NullTokenizer":
        tokenizer_info = False  # ids only: no tokenizer files to write
        if vocab is None and getattr(saved, "vocab_size", None):
            vocab = int(saved.vocab_size) + 1
    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_dir)}.tmp-", dir=parent)
    try:
        summary = write_hf_model(
            full,
            saved,
            tmp,
            tokenizer_info=tokenizer_info,
            max_shard_size=args.max_shard_size,
            model_class=None if args.model_class == "auto" else args.model_class,
            true_vocab_size=vocab,
            dtype=getattr(torch, _DTYPES[args.hf_dtype]) if args.hf_dtype else None,
        )
        if not os.path.isdir(save_dir):
            os.rename(tmp, save_dir)
        else:
            names = sorted(os.listdir(tmp))
            clash = [n for n in names if os.path.exists(os.path.join(save_dir, n))]
            if clash:
                raise HFInteropError(
                    f"--save-dir {args.save_dir} already holds {', '.join(clash[:3])}; "
                    "choose an empty folder"
                )
            # config.json last: the folder is a model once it is there
            for name in sorted(names, key=lambda n: n == "config.json"):
                os.replace(os.path.join(tmp, name), os.path.join(save_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["source"] = what
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron.checkpoint_reshape import ReshapeError, reshape_checkpoint
    from megatron.hf_interop import HFInteropError

    errors = (ReshapeError, HFInteropError, OSError, ValueError)
    if args.loader == "hf" and args.saver == "hf":
        return fail(ValueError("--loader hf --saver hf: nothing to convert; choose "
                               "--saver megatron (or --loader megatron)"))  # fmt: skip
    try:
        _check_layout_flags(args)
        if args.loader == "hf":
            result = hf_to_megatron(args)
        elif args.saver == "hf":
            result = megatron_to_hf(args)
        elif is_deepspeed_checkpoint(args.load_dir):
            from tools.convert_checkpoint.deepspeed_to_megatron import convert

            summary = convert(
                args.load_dir,
                args.save_dir,
                args.target_tensor_parallel_size,
                args.target_pipeline_parallel_size,
                true_vocab_size=true_vocab_size(args),
            )
            print(
                f"converted DeepSpeed checkpoint {args.load_dir} (iteration "
                f"{summary['iteration']}) to {args.save_dir} "
                f"(TP={args.target_tensor_parallel_size}, "
                f"PP={args.target_pipeline_parallel_size})",
                flush=True,
            )
            return 0
        else:
            result = reshape_checkpoint(
                args.load_dir,
                args.save_dir,
                args.target_tensor_parallel_size,
                args.target_pipeline_parallel_size,
                true_vocab_size=true_vocab_size(args),
                divisible_by=args.make_vocab_size_divisible_by,
            )
    except errors as e:
        return fail(e)
    if args.loader == "hf":
        import shlex

        imp = result["imp"]
        print(
            f"converted {imp.hf_config.get('architectures', [imp.arch])[0]} {args.load_dir} to "
            f"{args.save_dir} (release, TP={args.target_tensor_parallel_size}, "
            f"PP={args.target_pipeline_parallel_size}, padded vocab {result['padded']}, "
            f"tokenizer {imp.args['tokenizer_type']})",
            flush=True,
        )
        print("train from it with (add the data, batch and schedule flags):", flush=True)
        print(shlex.join(result["command"]), flush=True)
    elif args.saver == "hf":
        print(
            f"converted {args.load_dir} ({result['source']}) to {result['model_class']} "
            f"{args.save_dir} (vocab {result['vocab_size']}, {result['shards']} weight "
            f"file(s))",
            flush=True,
        )
    else:
        summary = result
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
