"""--kd / --mos: the distillation loss under tensor parallelism, and the argument errors."""

from __future__ import annotations

import shlex

import pytest
import torch
import torch.nn.functional as F

from megatron.arguments import ArgumentError, build_parser, validate_args
from tests.dist_utils import run_distributed

B, S, V = 2, 5, 12
TEMP, BETA = 2.0, 0.7


def _logits(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, V, generator=gen, dtype=torch.float64) * 3  # [b, s, V]


def _reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Megatron-DeepSpeed's formula on whole logits: KLDivLoss(batchmean) / s x T^2 x beta."""
    kl = F.kl_div(F.log_softmax(student / TEMP, dim=2), F.softmax(teacher / TEMP, dim=2),
                  reduction="batchmean")
    return kl / S * TEMP * TEMP * BETA


def _check_tp_equals_serial(rank, world_size):
    from megatron import mpu
    from megatron.distillation import distillation_loss, vocab_parallel_kl_div

    student, teacher = _logits(1), _logits(2)
    # TP=1 (two data-parallel ranks): against torch's own KL on the whole vocabulary
    mpu.initialize_model_parallel(1, 1)
    s1 = student.clone().requires_grad_(True)
    loss1 = distillation_loss(s1, teacher, TEMP, BETA)
    loss1.backward()
    ref = student.clone().requires_grad_(True)
    expected = _reference(ref, teacher)
    expected.backward()
    torch.testing.assert_close(loss1, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(s1.grad, ref.grad, rtol=1e-10, atol=1e-14)
    # identical distributions: zero KL
    same = vocab_parallel_kl_div(student, student, TEMP)
    torch.testing.assert_close(same, torch.zeros(B, S, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    mpu.destroy_model_parallel()

    # TP=2: each rank holds its half of the vocabulary
    mpu.initialize_model_parallel(2, 1)
    part = V // 2
    cols = slice(rank * part, (rank + 1) * part)
    s2 = student[:, :, cols].clone().requires_grad_(True)  # [b, s, V/2]
    loss2 = distillation_loss(s2, teacher[:, :, cols].clone(), TEMP, BETA)
    loss2.backward()
    # same loss on both ranks, equal to TP=1's; each rank's gradient is its slice of TP=1's
    torch.testing.assert_close(loss2, loss1.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s2.grad, s1.grad[:, :, cols], rtol=1e-10, atol=1e-14)
    per_token = vocab_parallel_kl_div(student[:, :, cols], teacher[:, :, cols], TEMP)
    assert per_token.shape == (B, S) and bool((per_token > 0).all())
    # float32 logits (the model's) keep their dtype in the gradient
    s3 = student[:, :, cols].float().requires_grad_(True)
    distillation_loss(s3, teacher[:, :, cols].float(), TEMP, BETA).backward()
    assert s3.grad.dtype == torch.float32
    torch.testing.assert_close(s3.grad.double(), s1.grad[:, :, cols], rtol=1e-4, atol=1e-7)
    mpu.destroy_model_parallel()


def test_kd_loss_tp2_equals_tp1_and_megatron_deepspeed_formula():
    run_distributed(_check_tp_equals_serial, world_size=2)


BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 "
        "--train-iters 10 --lr 1e-3")
TEACHER = ("--load-teacher T --num-layers-teacher 4 --hidden-size-teacher 128 "
           "--num-attention-heads-teacher 8")


def _validate(flags: str, world_size: int = 1):
    args = build_parser().parse_args(shlex.split(flags))
    return validate_args(args, world_size=world_size, rank=0)


def test_distillation_flags_validate():
    args = _validate(f"{BASE} --kd {TEACHER} --kd-alpha-ce 0.5 --kd-beta-ce 2 --kd-temp 3")
    assert (args.kd, args.kd_alpha_ce, args.kd_beta_ce, args.kd_temp) == (True, 0.5, 2.0, 3.0)
    assert args.num_experts_teacher == [1]
    args = _validate(f"{BASE} --mos {TEACHER} --num-experts-teacher 4 4 "
                     "--tensor-model-parallel-size 2", world_size=2)
    assert args.mos and args.num_experts_teacher == [4, 4]
    from megatron.distillation import kd_log_key, teacher_args

    assert kd_log_key(args) == "mos loss"
    t = teacher_args(args)
    assert (t.num_layers, t.hidden_size, t.num_attention_heads) == (4, 128, 8)
    assert (t.ffn_hidden_size, t.kv_channels, t.num_key_value_heads) == (512, 16, 8)
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size) == (2, 64, 256)


@pytest.mark.parametrize("flags,message", [
    ("--kd --num-layers-teacher 4 --hidden-size-teacher 128 --num-attention-heads-teacher 8",
     "--kd needs --load-teacher"),
    ("--kd --load-teacher T --hidden-size-teacher 128",
     "--kd needs the teacher's shape: give --num-layers-teacher, "
     "--num-attention-heads-teacher"),
    ("--mos --load-teacher T", "--mos needs the teacher's shape: give --num-layers-teacher, "
     "--hidden-size-teacher, --num-attention-heads-teacher"),
    (f"--kd {TEACHER.replace('128', '100')}", "--hidden-size-teacher (100) is not a multiple"),
    (f"--kd {TEACHER} --kd-temp 0", "--kd-temp must be > 0"),
    (f"--kd {TEACHER} --num-experts-teacher 2 2 2", "--num-experts-teacher has 3 values"),
])
def test_distillation_argument_errors(flags, message):
    with pytest.raises(ArgumentError) as err:
        _validate(f"{BASE} {flags}")
    assert str(err.value).startswith(message), str(err.value)


def test_distillation_refuses_pipeline_parallelism():
    with pytest.raises(ArgumentError, match="--kd with --pipeline-model-parallel-size > 1"):
        _validate(f"{BASE} --kd {TEACHER} --pipeline-model-parallel-size 2", world_size=2)
