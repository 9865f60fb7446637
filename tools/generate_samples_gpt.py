"""Sample text from a trained GPT checkpoint.

Unconditional (--num-samples N --genfile FILE): N samples, each started from the
end-of-document token, written as JSON lines {"text", "length", "finished"}.
Conditional (--sample-input-file FILE): one prompt per line; continuations go to
--sample-output-file (default FILE.out): JSON lines {"prompt", "text", "length",
"finished"} when its name ends in .json or .jsonl, else Megatron's
"Context: ... / Megatron-LM: ..." text blocks.

With --log-probs every JSON line also has "tokens" (the generated ids) and "log_probs"
(the log-probability of each under the model, before temperature, top-k or top-p).

Takes the GPT model flags used for pretraining plus --load (the LLaMA-family flags and
tokenizers included: --use-rotary-position-embeddings, --num-key-value-heads, ...,
--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model FILE, whose eos id ends a
sample). Sampling: --temperature,
--top_k, --top_p, --greedy; --recompute runs the whole sequence every step instead of
using the key/value cache. Works under tensor parallelism (torchrun); pipeline
parallelism is not supported.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

from megatron import get_args, get_tokenizer, print_rank_0  # noqa: E402
from megatron.accelerator import current_device  # noqa: E402
from megatron.checkpointing import inference_checkpoint_problem  # noqa: E402
from megatron.initialize import initialize_megatron  # noqa: E402
from megatron.text_generation.model import build_inference_model, model_provider  # noqa: E402,F401
from megatron.text_generation_utils import (  # noqa: E402
    GenerationSettings,
    SamplingParams,
    generate_samples_conditional,
    generate_samples_unconditional,
    read_prompts,
    write_context_blocks,
    write_json_lines,
)

SCRIPT = "tools/generate_samples_gpt.py"


def add_text_generate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The text generation flags (Megatron's spellings)."""
    group = parser.add_argument_group(title="text generation")
    group.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    group.add_argument(
        "--greedy",
        action="store_true",
        default=False,
        help="Take the most likely token (no sampling).",
    )
    group.add_argument(
        "--top_p",
        type=float,
        default=0.0,
        help="Nucleus sampling: keep this much probability mass (0: off).",
    )
    group.add_argument(
        "--top_k", type=int, default=0, help="Keep the k most likely tokens (0: off)."
    )
    group.add_argument(
        "--out-seq-length", type=int, default=1024, help="Most tokens to generate per sample."
    )
    group.add_argument(
        "--sample-input-file",
        type=str,
        default=None,
        help="Prompts, one per line (conditional generation).",
    )
    group.add_argument(
        "--sample-output-file",
        type=str,
        default=None,
        help="Where continuations go (default: <sample-input-file>.out).",
    )
    group.add_argument(
        "--num-samples",
        type=int,
        default=0,
        help="Unconditional samples to generate (written to --genfile).",
    )
    group.add_argument(
        "--genfile",
        type=str,
        default=None,
        help="Output file of the unconditional samples (JSON lines).",
    )
    group.add_argument(
        "--log-probs",
        action="store_true",
        help='Also write the generated token ids ("tokens") and their log-probabilities '
        '("log_probs", under the model before temperature/top-k/top-p) into the JSON lines.',
    )
    group.add_argument(
        "--recompute",
        action="store_true",
        help="Run the whole sequence every step instead of caching keys/values.",
    )
    return parser


def check_generation_args(args: argparse.Namespace) -> None:
    """Exit with one line naming the flag of an unusable setting."""
    problem = None
    if args.sample_input_file is None and args.num_samples <= 0:
        problem = "give --num-samples N (with --genfile) or --sample-input-file FILE"
    elif args.sample_input_file is None and args.genfile is None:
        problem = "--num-samples needs --genfile FILE for the samples"
    elif args.out_seq_length < 1:
        problem = f"--out-seq-length must be >= 1, got {args.out_seq_length}"
    elif args.log_probs and not writes_json_lines(args):
        problem = (
            f"--log-probs needs JSON lines output: a --sample-output-file ending in .json "
            f"or .jsonl (got {output_path(args)})"
        )
    else:
        problem = inference_checkpoint_problem(args, "generation")
    if problem is None:
        try:
            sampling_params(args).validate()
        except ValueError as e:
            problem = str(e)
    if problem is not None:
        sys.exit(f"{SCRIPT}: error: {problem}")


def output_path(args: argparse.Namespace) -> str:
    """Where the samples go: --genfile, or --sample-output-file (default FILE.out)."""
    if args.sample_input_file is None:
        return args.genfile
    return args.sample_output_file or args.sample_input_file + ".out"


def writes_json_lines(args: argparse.Namespace) -> bool:
    """Unconditional samples and .json/.jsonl outputs are JSON lines, the rest text blocks."""
    return args.sample_input_file is None or output_path(args).endswith((".json", ".jsonl"))


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy
    )


def _open_output(path: str):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return open(path, "w", encoding="utf-8")


def main() -> None:
    initialize_megatron(
        extra_args_provider=add_text_generate_args,
        args_defaults={
            "tokenizer_type": "GPT2BPETokenizer",
            "no_load_rng": True,
            "no_load_optim": True,
        },
    )
    args = get_args()
    check_generation_args(args)
    tokenizer = get_tokenizer()
    prompts = None
    if args.sample_input_file is not None:  # read before the model is built and loaded
        try:
            prompts = read_prompts(args.sample_input_file, tokenizer, args.seq_length)
        except ValueError as e:
            sys.exit(f"{SCRIPT}: error: {e}")
    model = build_inference_model(args)
    settings = GenerationSettings(
        batch_size=args.micro_batch_size,
        max_length=args.seq_length,
        out_seq_length=args.out_seq_length,
        params=sampling_params(args),
        recompute=args.recompute,
        log_interval=args.log_interval,
        log_probs=args.log_probs,
    )
    if args.out_seq_length >= args.seq_length:
        print_rank_0(
            f" note: samples stop at --seq-length {args.seq_length} tokens, prompt "
            f"included (--out-seq-length {args.out_seq_length} asks for more)"
        )
    device = torch.device(current_device())
    writes = torch.distributed.get_rank() == 0  # every rank generates, rank 0 writes

    out_path = output_path(args)
    writer = write_json_lines if writes_json_lines(args) else write_context_blocks
    if prompts is not None:
        samples = generate_samples_conditional(model, tokenizer, prompts, settings, device)
    else:
        samples = generate_samples_unconditional(
            model, tokenizer, args.num_samples, settings, device
        )
    if writes:
        with _open_output(out_path) as out:
            count = writer(samples, out)
        print(f" wrote {count} samples to {out_path}", flush=True)
    else:
        for _ in samples:  # the same forward passes as rank 0, which writes
            pass
    torch.distributed.barrier()
    # Leave the process group here: a gloo group left to interpreter shutdown can abort a
    # rank after its work is done ("terminate called without an active exception").
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
