"""The distributed optimizer on 4 gloo ranks equals the local DDP with the unsharded
optimizer, and its sharded state moves between data-parallel sizes.

One 4-rank world runs every check:

1. DP=4 (TP=1), for fp32, bf16 and fp16 params: a tiny model under the local DDP with
   FP32Optimizer / Float16OptimizerWithFloat16Params and a copy under the DDP with
   ``use_distributed_optimizer`` and DistributedOptimizer take the same 4 AdamW steps on
   the same global batch (8 samples, 2 micro-batches per rank), with clipping (the clip
   value is below the norm, so every step clips). The returned grad norms, zero counts and
   skip flags match; the params match to fp32 rounding (REL_TOL) in fp32, within one unit
   in the last place in bf16/fp16, and the gathered fp32 master weights match the
   unsharded masters to REL_TOL. fp16 starts at a loss scale that overflows: both skip the
   same steps and back the scale off alike.
2. The fp32 run's sharded state (parameter_state(), the distrib_optim.pt dict) is written
   at DP=4; the process groups are rebuilt as TP=2 x DP=2 (data-parallel groups {0, 2},
   {1, 3}; the tiny model is replicated over TP) and a fresh optimizer loads it: the next
   step equals the step the DP=4 run took from the same state.
3. A distributed optimizer loading the unsharded optimizer's state dict (a checkpoint saved
   without the flag) takes the same next step as the unsharded one, in every dtype.

Only the order of floating-point sums differs (all-reduce versus reduce-scatter, shard
norms summed), so fp32 results agree to REL_TOL relative.
"""

import io
import os

import pytest
import torch

from megatron import mpu
from megatron.accelerator import current_device
from megatron.model.distributed import DistributedDataParallel, padded_buffer_numel
from megatron.model.module import MegatronModule
from megatron.optimizer import (
    DistributedOptimizer,
    DynamicGradScaler,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    get_param_groups,
)
from tests.dist_utils import run_distributed

REL_TOL = 2e-5
STEPS = 4
CLIP = 0.05
MICRO_BATCHES = 2
GLOBAL_BATCH = 8
INITIAL_SCALE = 2.0**20


def _close(actual, expected, rtol=REL_TOL, atol=1e-7, what=""):
    # torch.testing.assert_close imports torch.distributed.tensor: seconds per spawned rank.
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = (actual.double().cpu() - expected.double().cpu()).abs()
    bound = atol + rtol * expected.double().cpu().abs()
    assert bool((diff <= bound).all()), (what, diff.max().item())


class _Tiny(MegatronModule):
    """2072 params, a buffer of 2560 at DP=4 (2304 at DP=2): the shard boundaries cut
    through the weights, and the last shard is mostly padding."""

    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(32, 48)
        self.layernorm = torch.nn.LayerNorm(48)
        self.head = torch.nn.Linear(48, 8)

    def forward(self, x):  # x: [b, 32]
        return self.head(self.layernorm(torch.tanh(self.dense(x))))


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return _Tiny().to(dtype).to(current_device())


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 32, generator=gen)
    return x.to(current_device()), torch.randn(GLOBAL_BATCH, 8, generator=gen).to(x.device)


def _backward(ddp, optimizer, step, dtype):
    """This rank's share of the global batch, in micro-batches; returns the mean loss."""
    dp, rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    x, y = _batch(step)
    per_rank = GLOBAL_BATCH // dp
    xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    total = 0.0
    for xm, ym in zip(xs.chunk(MICRO_BATCHES), ys.chunk(MICRO_BATCHES)):
        loss = (ddp(xm.to(dtype)).float() - ym).pow(2).mean() / MICRO_BATCHES
        optimizer.scale_loss(loss).backward()
        total += loss.item()
    return total


def _adam(module, weight_decay=0.1):
    groups = get_param_groups(module, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=0.02, betas=(0.9, 0.95), eps=1e-8)


def _scaler(dtype):
    if dtype != torch.float16:
        return None
    # INITIAL_SCALE overflows the fp16 grads: the first steps are skipped, halving it
    return DynamicGradScaler(INITIAL_SCALE, 1.0, 2.0, 0.5, growth_interval=1000, hysteresis=1)


def _pair(dtype):
    """(reference DDP, its optimizer, sharded DDP, DistributedOptimizer) on equal models."""
    half = dtype != torch.float32
    ref = DistributedDataParallel(_model(dtype), half, True, False)
    if half:
        ref_opt = Float16OptimizerWithFloat16Params(
            _adam(ref.module), CLIP, True, True, dtype == torch.bfloat16, _scaler(dtype))
    else:
        ref_opt = FP32Optimizer(_adam(ref.module), CLIP, True, True)
    ddp = DistributedDataParallel(_model(dtype), half, True, False, use_distributed_optimizer=True)
    opt = DistributedOptimizer(_adam(ddp.module), CLIP, True, _scaler(dtype), [ddp])
    return ref, ref_opt, ddp, opt


def _full_masters(opt, ddp):
    """The unsharded fp32 master weights by param, rebuilt from parameter_state() on DP
    rank 0 (None elsewhere)."""
    state = opt.parameter_state()
    if state is None:
        return None
    (dtype, world), = state[0].items()
    return [world["param"][s:e].view(p.shape) for p, s, e in ddp.grad_buffer_param_ranges[
        (dtype, None)]], state


def check_equals_ddp(dtype):
    """Steps of the distributed optimizer equal the unsharded ones (any DP size; also
    run on GPUs by tests/gpu/test_distrib_optimizer_nccl.py)."""
    ref, ref_opt, ddp, opt = _pair(dtype)
    # buffer layout: padded to 128 * DP, each rank owns 1/DP of it (DP=4: 2560, 640 each)
    dp = mpu.get_data_parallel_world_size()
    numel = sum(p.numel() for p in ddp.module.parameters())
    (buffer,) = ddp.grad_buffers.values()
    assert numel == 2072 and buffer.numel == padded_buffer_numel(numel, dp)
    size = buffer.numel // dp
    owned = min(size, max(0, numel - size * mpu.get_data_parallel_rank()))
    assert sum(s.end - s.start for s in opt.shards) == owned
    skipped = 0
    for step in range(STEPS if dtype != torch.float16 else 2 * STEPS):
        ref_loss = _backward(ref, ref_opt, step, dtype)
        loss = _backward(ddp, opt, step, dtype)
        assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss), (step, loss, ref_loss)
        ref.allreduce_gradients()
        ref_ok, ref_norm, ref_zeros = ref_opt.step()
        ok, norm, zeros = opt.step()
        assert ok == ref_ok, (dtype, step)
        assert float(opt.get_loss_scale()) == float(ref_opt.get_loss_scale())
        if not ok:
            skipped += 1
            assert norm is None and ref_norm is None
            continue
        assert abs(norm - ref_norm) <= REL_TOL * ref_norm, (dtype, step, norm, ref_norm)
        assert norm > CLIP  # clipping was active
        assert zeros == ref_zeros
        for p_ref, p in zip(ref.module.parameters(), ddp.module.parameters()):
            if dtype == torch.float32:
                _close(p.data, p_ref.data, what=(step, "param"))
            else:  # at most one unit in the last place of the half-precision dtype
                ulp = torch.finfo(dtype).eps * p_ref.data.float().abs().clamp_min(1e-3)
                assert bool(((p.data.float() - p_ref.data.float()).abs() <= ulp).all())
    if dtype == torch.float16:
        assert 1 <= skipped <= STEPS, skipped
        assert ref_opt.get_loss_scale().item() < INITIAL_SCALE
    else:
        assert skipped == 0
    result = _full_masters(opt, ddp)
    if result is not None:
        masters, _ = result
        for master, ref_master in zip(masters, _ref_masters(ref, ref_opt)):
            _close(master, ref_master, what=(dtype, "master"))
    _check_start_from_unsharded_state(ref, ref_opt, dtype)
    return ref, ref_opt, ddp, opt


def _check_start_from_unsharded_state(ref, ref_opt, dtype):
    """A fresh distributed optimizer given the unsharded optimizer's state dict (as a
    checkpoint without --use-distributed-optimizer holds it) takes the same next step."""
    half = dtype != torch.float32
    buf = io.BytesIO()
    torch.save({"model": ref.module.state_dict(), "optimizer": ref_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    ddp = DistributedDataParallel(_model(dtype, seed=3), half, True, False,
                                  use_distributed_optimizer=True)
    opt = DistributedOptimizer(_adam(ddp.module), CLIP, True, _scaler(dtype), [ddp])
    ddp.module.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert float(opt.get_loss_scale()) == float(ref_opt.get_loss_scale())
    step = 2 * STEPS + 1
    _backward(ref, ref_opt, step, dtype)
    _backward(ddp, opt, step, dtype)
    ref.allreduce_gradients()
    (ref_ok, ref_norm, _), (ok, norm, _) = ref_opt.step(), opt.step()
    assert ok and ref_ok and abs(norm - ref_norm) <= REL_TOL * ref_norm, (norm, ref_norm)
    for p_ref, p in zip(ref.module.parameters(), ddp.module.parameters()):
        if dtype == torch.float32:
            _close(p.data, p_ref.data, what="from unsharded")
        else:
            ulp = torch.finfo(dtype).eps * p_ref.data.float().abs().clamp_min(1e-3)
            assert bool(((p.data.float() - p_ref.data.float()).abs() <= ulp).all())


def _ref_masters(ref, ref_opt):
    """The reference's fp32 master of each model param, in model order."""
    if isinstance(ref_opt, FP32Optimizer):
        return [p.data for p in ref.module.parameters()]
    by_param = {}
    for model_group, main_group in zip(ref_opt.float16_groups, ref_opt.fp32_from_float16_groups):
        for model_param, main_param in zip(model_group, main_group):
            by_param[id(model_param)] = main_param.data
    return [by_param[id(p)] for p in ref.module.parameters()]


def _step_from(ddp, opt, step):
    _backward(ddp, opt, step, torch.float32)
    ok, norm, _ = opt.step()
    assert ok
    return norm, [p.data.clone() for p in ddp.module.parameters()]


def _check(rank, world_size, tmp_dir):
    mpu.initialize_model_parallel(1)
    assert mpu.get_data_parallel_world_size() == 4
    for dtype in (torch.bfloat16, torch.float16):
        check_equals_ddp(dtype)
    _, _, ddp, opt = check_equals_ddp(torch.float32)

    # save at DP=4, then continue one step as the reference
    path = os.path.join(tmp_dir, "distrib_optim.pt")
    result = _full_masters(opt, ddp)
    if rank == 0:
        _, state = result
        assert state["metadata"]["data_parallel_size"] == 4
        assert sorted(state["metadata"]["element_state_keys"]) == ["exp_avg", "exp_avg_sq"]
        torch.save(state, path)
    model_state = {k: v.clone() for k, v in ddp.module.state_dict().items()}
    opt_state = opt.state_dict()
    torch.distributed.barrier()
    ref_norm, ref_params = _step_from(ddp, opt, STEPS)

    # reload at DP=2 (TP=2 replicas of the same model), take the same step
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(2)
    assert mpu.get_data_parallel_world_size() == 2
    ddp2 = DistributedDataParallel(_model(torch.float32, seed=7), False, True, False,
                                   use_distributed_optimizer=True)
    opt2 = DistributedOptimizer(_adam(ddp2.module), CLIP, False, None, [ddp2])
    ddp2.module.load_state_dict(model_state)
    opt2.load_state_dict(opt_state)
    opt2.load_parameter_state(torch.load(path, weights_only=False, mmap=True), path)
    norm, params = _step_from(ddp2, opt2, STEPS)
    assert abs(norm - ref_norm) <= REL_TOL * ref_norm, (norm, ref_norm)
    for p, p_ref in zip(params, ref_params):
        _close(p, p_ref, what="resharded step")

    # a file of another model is refused by name
    ddp3 = DistributedDataParallel(torch.nn.Linear(3, 2), False, True, False,
                                   use_distributed_optimizer=True)
    opt3 = DistributedOptimizer(_adam(ddp3), CLIP, False, None, [ddp3])
    with pytest.raises(ValueError, match="distrib_optim.pt: model chunk 0 was saved with 2072 "
                       "parameters in its torch.float32 gradient buffer, this model has 8"):
        opt3.load_parameter_state(torch.load(path, weights_only=False), path)
    mpu.destroy_model_parallel()


def test_distributed_optimizer_equals_ddp_and_reshards(tmp_path):
    run_distributed(_check, world_size=4, args=(str(tmp_path),), timeout=300)


_FLAGS = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
          "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
          "--train-iters 10 --lr 1e-3 --use-distributed-optimizer")


@pytest.mark.parametrize("extra,message", [
    ("--deepspeed", "--use-distributed-optimizer is Megatron's own optimizer sharding and "
                    "cannot be combined with --deepspeed"),
    ("--DDP-impl torch", "--use-distributed-optimizer requires --DDP-impl local "
                         "(got --DDP-impl torch)"),
    ("--no-contiguous-buffers-in-local-ddp", "requires contiguous gradient buffers"),
    ("--cpu-optimizer", "--use-distributed-optimizer and --cpu-optimizer"),
    ("--num-experts 2", "does not shard expert params (--num-experts > 1)"),
])
def test_refused_combinations(extra, message, monkeypatch):
    import shlex

    from megatron.arguments import ArgumentError, build_parser, validate_args

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(shlex.split(f"{_FLAGS} {extra}"))
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_args(args, world_size=2, rank=0)


def test_flag_validates_with_bf16_and_the_local_ddp(monkeypatch):
    import shlex

    from megatron.arguments import build_parser, validate_args

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    args = validate_args(build_parser().parse_args(shlex.split(f"{_FLAGS} --bf16")),
                         world_size=2, rank=0)
    assert args.use_distributed_optimizer and args.use_contiguous_buffers_in_local_ddp
    assert args.accumulate_allreduce_grads_in_fp32  # bf16 grads are summed in fp32
