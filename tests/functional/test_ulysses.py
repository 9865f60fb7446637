"""DeepSpeed-Ulysses sequence parallelism (--ds-sequence-parallel-size) equals serial:
pretrain_gpt.py on CPU gloo ranks gives the single-process per-iteration losses.

The tiny GPT of tests/functional/gpt_runs.tiny_gpt_args (2 layers, 4 heads, seq 32,
learned absolute positions, whose ids each rank slices with its tokens) in fp32 with
dropout 0, global batch 8 (2 micro-batches of 4 in the serial run), 10 iterations and
one validation pass. Launches: the serial run, SP=2 under torchrun, and one spawned world
of 4 ranks that runs pretrain() of pretrain_gpt.py four times: SP=4 (with --use-flash-attn:
SDPA's is_causal, no mask tensor), SP=2 x TP=2, SP=2 x DP=2 (local DDP), and SP=2 x DP=2
under --deepspeed with ZeRO stage 2 and full activation recompute through DeepSpeed's
checkpointing (as Megatron-DeepSpeed's 32k-token sequence-parallel script runs). Splitting the sequence changes only the order of
floating-point sums (gradient sums over the sequence ranks, the all-reduced loss), so the
printed 7-digit losses must agree within REL_TOL relative, as for TP/PP/DP
(tests/functional/test_distributed_gpt.py). Bad flag combinations are one-line errors.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from megatron.arguments import ArgumentError, build_parser, validate_args

from ..dist_utils import run_distributed
from .gpt_runs import launch, parse_log, preprocess, pretrain_in_process, tiny_gpt_args

ITERS = 10
REL_TOL = 2e-5
VALID_RE = re.compile(r" validation loss at [^|]*\| lm loss value: ([0-9.E+-]+) \|")


def _flags(data_path: str, vocab_dir: str, sp: int = 1, tp: int = 1,
           extra: list[str] | None = None) -> list[str]:
    args = tiny_gpt_args(data_path, vocab_dir, ITERS)
    args[args.index("--hidden-dropout") + 1] = "0"
    args[args.index("--attention-dropout") + 1] = "0"
    args[args.index("--eval-interval") + 1] = str(ITERS)
    args[args.index("--eval-iters") + 1] = "1"
    args += ["--tensor-model-parallel-size", str(tp), "--ds-sequence-parallel-size", str(sp),
             "--make-vocab-size-divisible-by", str(128 // tp)]  # the same padded vocabulary
    return args + (extra or [])


def _losses(stdout: str) -> list[float]:
    """Training losses of iterations 1..ITERS, then the validation losses."""
    rows = parse_log(stdout)
    assert sorted(rows) == list(range(1, ITERS + 1)), stdout[-3000:]
    valid = [float(v) for v in VALID_RE.findall(stdout)]
    assert valid, stdout[-3000:]
    return [float(rows[i]["loss"]) for i in range(1, ITERS + 1)] + valid


def _assert_close(name: str, got: list[float], ref: list[float]) -> None:
    diffs = [abs(g - r) / abs(r) for g, r in zip(got, ref)]
    print(f"{name}: max relative loss difference {max(diffs):.2e}")
    assert len(got) == len(ref) and max(diffs) <= REL_TOL, (name, got, ref, diffs)


def _four_rank_runs(tmp: str, data_path: str, vocab_dir: str) -> list[tuple[str, list[str]]]:
    zero2 = os.path.join(tmp, "ds_config_zero2.json")
    return [
        ("SP=4 flash", _flags(data_path, vocab_dir, sp=4, extra=["--use-flash-attn"])),
        ("SP=2 x TP=2", _flags(data_path, vocab_dir, sp=2, tp=2)),
        ("SP=2 x DP=2", _flags(data_path, vocab_dir, sp=2, extra=["--DDP-impl", "local"])),
        ("SP=2 x DP=2 ZeRO-2 recompute", _flags(data_path, vocab_dir, sp=2, extra=[
            "--deepspeed", "--no-pipeline-parallel", "--deepspeed_config", zero2,
            "--checkpoint-activations", "--deepspeed-activation-checkpointing"])),
    ]


def _world(rank, world_size, tmp, data_path, vocab_dir):
    """The 4-rank runs one after the other in one world; {name: last rank's stdout}."""
    import torch

    if rank == 0:
        with open(os.path.join(tmp, "ds_config_zero2.json"), "w") as f:
            json.dump({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 8,
                       "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                       "zero_optimization": {"stage": 2, "contiguous_gradients": True},
                       "fp16": {"enabled": False}}, f)
    torch.distributed.barrier()
    logs = {}
    for name, flags in _four_rank_runs(tmp, data_path, vocab_dir):
        logs[name] = pretrain_in_process(flags, "GPT2BPETokenizer")
        torch.distributed.barrier()
    return logs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sequence_parallel_equals_serial(tmp_path, vocab_dir):
    data_path = preprocess(str(tmp_path), vocab_dir)
    serial = _losses(launch(1, _flags(data_path, vocab_dir), timeout=240))
    assert serial[ITERS - 1] < serial[0] - 0.3, serial  # it trains
    out = launch(2, _flags(data_path, vocab_dir, sp=2), timeout=240)
    assert "sequence parallel with size 2" in out, out[-3000:]
    _assert_close("SP=2", _losses(out), serial)
    logs = run_distributed(_world, 4, args=(str(tmp_path), data_path, vocab_dir), timeout=600)
    for name, _ in _four_rank_runs(str(tmp_path), data_path, vocab_dir):
        _assert_close(name, _losses(logs[3][name]), serial)


# The flags of Megatron-DeepSpeed's examples_deepspeed/sequence_parallel/
# ds_pretrain_gpt_1.3B_seq_parallel_32k.sh (SP=4, ZeRO-1), here on 8 ranks.
SCRIPT_32K = (
    "--override-opt_param-scheduler --adam-beta1 0.9 --adam-beta2 0.95 "
    "--tensor-model-parallel-size 1 --ds-sequence-parallel-size 4 --init-method-std 0.013 "
    "--lr-decay-tokens 300000000000 --lr-warmup-tokens 3000000000 --micro-batch-size 1 "
    "--exit-duration-in-mins 30000000 --global-batch-size 2 --num-layers 24 "
    "--hidden-size 2048 --num-attention-heads 16 --seq-length 32768 "
    "--max-position-embeddings 32768 --train-tokens 300000000000 --train-samples 18310546 "
    "--lr 2.0e-4 --min-lr 1.0e-6 --lr-decay-style cosine --split 949,50,1 --log-interval 10 "
    "--eval-interval 100 --eval-iters 10 --save-interval 100 --weight-decay 0.1 "
    "--clip-grad 1.0 --hysteresis 2 --num-workers 0 --fp16 --seed 1234 --load ckpt "
    "--save ckpt --no-async-tensor-model-parallel-allreduce --use-flash-attn-triton "
    "--tensorboard-queue-size 1 --log-timers-to-tensorboard --log-batch-size-to-tensorboard "
    "--log-validation-ppl-to-tensorboard --tensorboard-dir tb --checkpoint-activations "
    "--log-optimizer-states-to-tensorboard --vocab-file gpt2-vocab.json "
    "--merge-file gpt2-merges.txt --data-path BookCorpusDataset_text_document "
    "--data-impl mmap --deepspeed --deepspeed_config ds_config.json --zero-stage 1 "
    "--pipeline-model-parallel-size 1 --no-pipeline-parallel "
    "--deepspeed-activation-checkpointing"
)


def _validate(flags: str, world_size: int):
    args = build_parser().parse_args(
        ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
         "--max-position-embeddings 32 --micro-batch-size 2 " + flags).split())
    return validate_args(args, world_size=world_size, rank=1)


def test_sequence_parallel_layout_and_errors(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    args = _validate("--ds-sequence-parallel-size 2 --tensor-model-parallel-size 2", 8)
    assert args.data_parallel_size == 2  # 8 = TP 2 x SP 2 x DP 2; SP ranks share samples
    assert args.global_batch_size == 4  # micro-batch 2 x DP 2
    args = validate_args(build_parser().parse_args(SCRIPT_32K.split()), world_size=8, rank=1)
    assert (args.data_parallel_size, args.ds_sequence_parallel_size) == (2, 4)
    assert args.use_flash_attn  # its causal attention then builds no [s, s] mask
    bad = [
        ("--ds-sequence-parallel-size 3", 3, r"--seq-length \(32\) .* --ds-sequence-parallel"),
        ("--ds-sequence-parallel-size 8", 8, r"--num-attention-heads \(4\) is not divisible"),
        ("--ds-sequence-parallel-size 2 --tensor-model-parallel-size 4", 8,
         r"--num-attention-heads \(4\) / --tensor-model-parallel-size \(4\)"),
        ("--ds-sequence-parallel-size 2 --num-key-value-heads 1", 2,
         r"--num-key-value-heads \(1\) is not divisible by --ds-sequence-parallel-size"),
        ("--ds-sequence-parallel-size 2", 3, r"world size \(3\) .* --ds-sequence-parallel-size"),
        ("--ds-sequence-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel", 4,
         r"--ds-sequence-parallel-size \(2\) cannot be combined with --sequence-parallel"),
        ("--ds-sequence-parallel-size 2 --pipeline-model-parallel-size 2", 4,
         r"cannot be combined with --pipeline-model-parallel-size"),
        ("--ds-sequence-parallel-size 2 --DDP-impl torch", 2, r"combined with --DDP-impl torch"),
        ("--ds-sequence-parallel-size 2 --use-distributed-optimizer", 2,
         r"combined with --use-distributed-optimizer"),
        ("--ds-sequence-parallel-size 0", 1, r"--ds-sequence-parallel-size must be >= 1"),
    ]
    for flags, world, message in bad:
        with pytest.raises(ArgumentError, match=message):
            _validate(flags, world)
