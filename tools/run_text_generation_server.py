"""Serve a GPT checkpoint over Megatron's REST interface.

    python tools/run_text_generation_server.py <model flags> --load CKPT [--port 5000]
    torchrun --nproc_per_node 2 tools/run_text_generation_server.py \
        --tensor-model-parallel-size 2 --use-checkpoint-args --load CKPT

`PUT http://HOST:PORT/api` with a JSON object {"prompts": [...], "tokens_to_generate": N,
"temperature", "top_k", "top_p", "logprobs", "add_BOS", "stop_on_eol", "random_seed"}
returns {"text": [...], "segments": [...], "logprobs": [...]} (megatron/text_generation/
api.py says what each means); a bad request gets HTTP 400 {"message": ...}. Rank 0
serves, the other ranks follow its requests; generations run one at a time, the others
wait. tools/text_generation_cli.py URL sends prompts from stdin.

Takes the GPT model flags of pretraining (LLaMA-family ones included) or
--use-checkpoint-args with --load; --host (default 127.0.0.1; 0.0.0.0 to listen on every
interface), --port (default 5000; 0 picks a free one, printed when bound). Prompt plus
generated tokens may not exceed --max-position-embeddings. Pipeline parallelism is not
supported.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

import torch  # noqa: E402

from megatron import get_args, get_tokenizer  # noqa: E402
from megatron.accelerator import current_device  # noqa: E402
from megatron.checkpointing import inference_checkpoint_problem  # noqa: E402
from megatron.initialize import initialize_megatron  # noqa: E402
from megatron.text_generation.model import build_inference_model  # noqa: E402
from megatron.text_generation.server import TextGenerationServer, follow_requests  # noqa: E402

SCRIPT = "tools/run_text_generation_server.py"


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="text generation server")
    group.add_argument("--host", type=str, default="127.0.0.1",
                       help="Address to listen on (0.0.0.0: every interface).")
    group.add_argument("--port", type=int, default=5000,
                       help="Port to listen on (0: a free one, printed when bound).")
    group.add_argument("--max-tokens-to-oom", type=int, default=12000,
                       help="Refuse requests of more than this many prompts x positions.")
    return parser


def check_server_args(args: argparse.Namespace) -> None:
    """Exit with one line naming the flag of an unusable setting."""
    problem = inference_checkpoint_problem(args, "the text generation server")
    if problem is None and not 0 <= args.port <= 65535:
        problem = f"--port must be in [0, 65535], got {args.port}"
    if problem is None and args.max_tokens_to_oom < 1:
        problem = f"--max-tokens-to-oom must be >= 1, got {args.max_tokens_to_oom}"
    if problem is not None:
        sys.exit(f"{SCRIPT}: error: {problem}")


def main() -> None:
    initialize_megatron(
        extra_args_provider=add_server_args,
        args_defaults={
            "tokenizer_type": "GPT2BPETokenizer",
            "no_load_rng": True,
            "no_load_optim": True,
        },
    )
    args = get_args()
    check_server_args(args)
    tokenizer = get_tokenizer()
    model = build_inference_model(args)
    device = torch.device(current_device())
    if torch.distributed.get_rank() == 0:
        server = TextGenerationServer(model, tokenizer, args.max_position_embeddings or args.seq_length,
                                      device,
                                      max_tokens=args.max_tokens_to_oom)
        server.serve(args.host, args.port)
    else:
        follow_requests(model, tokenizer, device)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
