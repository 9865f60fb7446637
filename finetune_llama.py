"""Fine-tune a LLaMA-family model from Hugging Face weights (Megatron-DeepSpeed's
finetune_llama.py and examples_deepspeed/finetune_hf_llama/finetune_llama.sh).

Three uses, told apart by --hf-ckpt-dir and --to-hf-ckpt:

    # a LlamaForCausalLM folder -> a Megatron checkpoint at TP x PP (written as `release`)
    python finetune_llama.py --hf-ckpt-dir llama-7b-hf --hf-ckpt-num-shards 2 \
        --load-mode auto --save llama-7b-mega-ds-T2P2 \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 [model flags]

    # that checkpoint (or one fine-tuned from it) -> a Hugging Face folder
    python finetune_llama.py --hf-ckpt-dir llama-7b-hf --to-hf-ckpt \
        --load llama-7b-mega-ds-T2P2 --save llama-7b-hf-out

    # fine-tune (no --hf-ckpt-dir): pretrain_gpt.py's model, data and loss
    python finetune_llama.py --load llama-7b-mega-ds-T2P2 --finetune [model, data flags]

--load-mode says how the weights of --hf-ckpt-dir are read: `torchbin` the
pytorch_model-0000i-of-0000N.bin shards (N = --hf-ckpt-num-shards; pytorch_model.bin for
one), `safetensor` the model-0000i-of-0000N.safetensors shards (model.safetensors for
one), `auto` (the default) whatever the folder holds (an .index.json names the shards).
The model's sizes come from its config.json; model flags given on the command line must
agree with it. The conversions are megatron/hf_interop.py's, as
tools/checkpoint_util.py --loader hf / --saver hf run them; one line on stderr and exit
status 1 for anything that cannot be converted, nothing written.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

LOAD_MODES = ("torchbin", "safetensor", "auto")


def add_hf_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Hugging Face conversion flags of Megatron-DeepSpeed's finetune_hf_llama scripts."""
    group = parser.add_argument_group(title="Hugging Face weights")
    group.add_argument("--hf-ckpt-dir", type=str, default=None,
                       help="A LlamaForCausalLM folder (config.json and weights): convert it "
                       "to a Megatron checkpoint in --save, or with --to-hf-ckpt convert "
                       "--load into a Hugging Face folder in --save.")
    group.add_argument("--hf-ckpt-num-shards", type=int, default=-1,
                       help="Weight files of --hf-ckpt-dir for --load-mode torchbin / "
                       "safetensor (-1: as many as the folder holds).")
    group.add_argument("--load-mode", type=str, default=None, choices=LOAD_MODES,
                       help="How to read --hf-ckpt-dir's weights: pytorch_model-*.bin "
                       "shards, model-*.safetensors shards, or auto (what the folder holds).")
    group.add_argument("--to-hf-ckpt", action="store_true",
                       help="Convert the Megatron checkpoint --load to a Hugging Face folder "
                       "--save instead (the default direction is Hugging Face -> Megatron).")
    return parser


class ConversionError(ValueError):
    """A flag or file that stops a conversion."""


def _shard_files(hf_dir: str, mode: str, num_shards: int) -> list[str]:
    """The weight files --load-mode torchbin / safetensor reads, in order."""
    if mode == "torchbin":
        single, pattern = "pytorch_model.bin", "pytorch_model-{:05d}-of-{:05d}.bin"
    else:
        single, pattern = "model.safetensors", "model-{:05d}-of-{:05d}.safetensors"
    if num_shards == -1:
        found = sorted(glob.glob(os.path.join(hf_dir, pattern.split("-{")[0] + "-*-of-*"
                                              + os.path.splitext(single)[1])))
        num_shards = len(found) or 1
    if num_shards < 1:
        raise ConversionError(f"--hf-ckpt-num-shards {num_shards}: give the number of weight "
                              "files (>= 1), or -1 for as many as the folder holds")
    names = [pattern.format(i, num_shards) for i in range(1, num_shards + 1)]
    if num_shards == 1 and not os.path.isfile(os.path.join(hf_dir, names[0])):
        names = [single]
    missing = [n for n in names if not os.path.isfile(os.path.join(hf_dir, n))]
    if missing:
        raise ConversionError(
            f"--load-mode {mode} --hf-ckpt-num-shards {num_shards}: {hf_dir} has no "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return [os.path.join(hf_dir, n) for n in names]


def read_hf_shards(hf_dir: str, mode: str | None, num_shards: int) -> dict | None:
    """{HF key: tensor} of --load-mode torchbin / safetensor; None for auto (the
    importer then reads whatever the folder holds)."""
    if mode in (None, "auto"):
        return None
    from megatron.hf_interop import _load_file

    weights: dict = {}
    for path in _shard_files(hf_dir, mode, num_shards):
        for key, tensor in _load_file(path).items():
            if key in weights:
                raise ConversionError(f"{path}: tensor {key} is also in an earlier shard")
            weights[key] = tensor
    return weights


# model flags (by dest) that a Hugging Face config fixes
_MODEL_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_key_value_heads": "--num-key-value-heads",
}  # (--max-position-embeddings may be shorter than the model's: the scripts train at 512)


def check_model_flags(args: argparse.Namespace, hf_dir: str) -> None:
    """Model flags given on the command line must be the model's (config.json)."""
    from megatron import hf_interop

    path = os.path.join(hf_dir, "config.json")
    config = hf_interop._read_json(path, "model config")
    arch = hf_interop._arch_of(config, path)
    if arch is not hf_interop.LLAMA:
        raise ConversionError(f"{path}: finetune_llama.py converts LlamaForCausalLM models, "
                              f"not {(config.get('architectures') or ['?'])[0]}")
    model_args, _ = hf_interop._llama_args(config, path)
    for dest, flag in _MODEL_FLAGS.items():
        given, actual = getattr(args, dest, None), model_args.get(dest)
        if given is not None and actual is not None and int(given) != int(actual):
            raise ConversionError(f"{flag} {given} does not match {path} ({actual}); the "
                                  "model flags must align with the weights")


def hf_to_megatron(args: argparse.Namespace) -> dict:
    """--hf-ckpt-dir -> a Megatron `release` checkpoint in --save at the given TP x PP."""
    if not args.save:
        raise ConversionError("--hf-ckpt-dir: give --save, the folder of the Megatron "
                              "checkpoint to write")
    check_model_flags(args, args.hf_ckpt_dir)
    from tools.checkpoint_util import hf_to_megatron as convert

    return convert(argparse.Namespace(
        load_dir=args.hf_ckpt_dir, save_dir=args.save,
        target_tensor_parallel_size=args.tensor_model_parallel_size,
        target_pipeline_parallel_size=args.pipeline_model_parallel_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, tokenizer="auto",
        hf_weights=read_hf_shards(args.hf_ckpt_dir, args.load_mode, args.hf_ckpt_num_shards),
    ))


def megatron_to_hf(args: argparse.Namespace) -> dict:
    """--to-hf-ckpt: the Megatron (or DeepSpeed) checkpoint --load -> LlamaForCausalLM in
    --save."""
    if not args.load or not args.save:
        raise ConversionError("--to-hf-ckpt: give --load (the Megatron checkpoint) and "
                              "--save (the Hugging Face folder to write)")
    from tools.checkpoint_util import megatron_to_hf as convert

    return convert(argparse.Namespace(
        load_dir=args.load, save_dir=args.save, no_tokenizer_files=False,
        true_vocab_size=None, vocab_file=None, merge_file=None, max_shard_size="5GB",
        model_class="llama", hf_dtype=None,
    ))


def convert(argv: list[str]) -> int:
    """The conversion uses (--hf-ckpt-dir given); returns the exit status."""
    from megatron.arguments import build_parser
    from megatron.checkpoint_reshape import ReshapeError
    from megatron.hf_interop import HFInteropError

    args = build_parser(add_hf_args).parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # a launcher's other ranks: rank 0 converts
    try:
        if args.to_hf_ckpt:
            summary = megatron_to_hf(args)
            print(f"converted {args.load} ({summary['source']}) to {summary['model_class']} "
                  f"{args.save}", flush=True)
        else:
            summary = hf_to_megatron(args)
            print(f"converted {args.hf_ckpt_dir} to the Megatron checkpoint {args.save} "
                  f"(release, TP={args.tensor_model_parallel_size}, "
                  f"PP={args.pipeline_model_parallel_size}, padded vocab "
                  f"{summary['padded']})", flush=True)
    except (ConversionError, ReshapeError, HFInteropError, OSError) as e:
        print(f"finetune_llama.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


def _converting(argv: list[str]) -> bool:
    return any(a == "--hf-ckpt-dir" or a.startswith("--hf-ckpt-dir=") for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _converting(argv):
        return convert(argv)
    import pretrain_gpt
    from megatron.training import pretrain

    pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
             pretrain_gpt.forward_step, extra_args_provider=add_hf_args,
             args_defaults={"tokenizer_type": "HFTokenizer"}, args_list=argv)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
