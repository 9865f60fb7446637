"""examples/pretrain_gpt3_175B.sh: its flags validate for the 1024 ranks it asks slurm for."""

from __future__ import annotations

import os
import re
import shlex

import pytest

from megatron.arguments import build_parser, validate_args
from megatron.microbatches import build_num_microbatches_calculator

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt3_175B.sh")


def _script_text() -> str:
    with open(SCRIPT) as f:
        return f.read()


def _sbatch(text: str, name: str) -> int:
    m = re.search(rf"^#SBATCH --{name}=(\d+)$", text, re.M)
    assert m, f"#SBATCH --{name} missing from {SCRIPT}"
    return int(m.group(1))


def _script_flags(text: str) -> list[str]:
    """The `options="..."` block, with the script's variables given placeholder values."""
    m = re.search(r'^options="(.*?)"$', text, re.M | re.S)
    assert m, f'no options="..." block in {SCRIPT}'
    block = m.group(1).replace("\\\n", " ")
    values = {
        "DATASET": "0.2 d1 0.3 d2 0.5 d3",
        "VOCAB_FILE": "gpt2-vocab.json",
        "MERGE_FILE": "gpt2-merges.txt",
        "CHECKPOINT_PATH": "ckpt",
        "TENSORBOARD_DIR": "tb",
    }
    block = re.sub(r"\$\{(\w+)\}", lambda v: values[v.group(1)], block)
    return shlex.split(block)


@pytest.fixture(scope="module")
def args():
    text = _script_text()
    world_size = _sbatch(text, "nodes") * _sbatch(text, "ntasks-per-node")
    assert world_size == 1024
    parsed = build_parser().parse_args(_script_flags(text))
    return validate_args(
        parsed, {"tokenizer_type": "GPT2BPETokenizer"}, world_size=world_size, rank=0
    )


def test_layout_is_8_tp_16_pp_8_dp(args):
    assert (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.data_parallel_size,
    ) == (8, 16, 8)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (96, 12288, 96)
    assert args.seq_length == args.max_position_embeddings == 2048
    assert args.num_layers % args.pipeline_model_parallel_size == 0


def test_schedule_and_batch_ramp(args):
    assert args.global_batch_size == 1536 and args.micro_batch_size == 1
    assert args.rampup_batch_size == [16, 16, 5859375]
    assert args.train_samples == 146484375 and args.train_iters is None
    assert args.lr_decay_samples == 126953125 and args.lr_warmup_samples == 183105
    assert (args.lr, args.min_lr, args.lr_decay_style) == (6.0e-5, 6.0e-6, "cosine")
    assert args.checkpoint_activations and args.fp16
    assert args.data_path == ["0.2", "d1", "0.3", "d2", "0.5", "d3"]
    assert args.split == "98,2,0"
    calc = build_num_microbatches_calculator(args)
    # starts at 16 samples = 2 micro-batches per data-parallel rank, ends at 1536 = 192
    assert calc.get_current_global_batch_size() == 16 and calc.get() == 2
    calc.update(5859375, consistency_check=True)
    assert calc.get_current_global_batch_size() == 1536 and calc.get() == 192


def test_launch_is_srun_of_pretrain_gpt():
    text = _script_text()
    assert re.search(r"^srun .*sh -c \"\$\{run_cmd\}\"", text, re.M)
    assert "pretrain_gpt.py" in text and "WORLD_SIZE=\\$SLURM_NTASKS" in text
