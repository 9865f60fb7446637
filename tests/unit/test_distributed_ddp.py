"""Local DistributedDataParallel on 2 gloo ranks (DP=2) equals one process on the whole batch."""

import torch

from megatron import mpu
from megatron.model.distributed import DistributedDataParallel, MemoryBuffer
from megatron.model.module import MegatronModule
from megatron.optimizer import FP32Optimizer
from tests.dist_utils import run_distributed

MICRO_BATCHES = 2


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    # torch.testing.assert_close imports torch.distributed.tensor: seconds per spawned rank.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.float(), expected.float(), rtol=rtol, atol=atol), (
        (actual.float() - expected.float()).abs().max().item()
    )


class _Tiny(MegatronModule):
    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(6, 8)
        self.layernorm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):  # x: [b, 6]
        return self.head(self.layernorm(torch.tanh(self.dense(x))))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return _Tiny().to(dtype)


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def _loss(model, x, y):
    return (model(x.to(next(model.parameters()).dtype)).float() - y).pow(2).mean()


def _reference_grads():
    model = _model()
    _loss(model, *_batch()).backward()
    return model, [p.grad.clone() for p in model.parameters()]


def _backward_local_shard(ddp, rank, world_size):
    """Two micro-batches of this rank's half of the batch; the loss is averaged over them."""
    x, y = _batch()
    shard = 8 // world_size
    xs, ys = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
    for xm, ym in zip(xs.chunk(MICRO_BATCHES), ys.chunk(MICRO_BATCHES)):
        (_loss(ddp, xm, ym) / MICRO_BATCHES).backward()


def _check_contiguous_buffers(rank, world_size, ref_grads):
    ddp = DistributedDataParallel(_model(), False, True)
    for _ in range(2):  # the second round checks that zero_grad_buffer resets accumulation
        ddp.zero_grad_buffer()
        _backward_local_shard(ddp, rank, world_size)
        assert all(p.grad is None for p in ddp.parameters())  # moved into main_grad
        ddp.allreduce_gradients()
        for param, ref in zip(ddp.parameters(), ref_grads):
            _assert_close(param.main_grad, ref, rtol=1e-5, atol=1e-6)
    # every main_grad is a view into one flat buffer, the last param at the front
    (buffer,) = ddp._grad_buffers.values()
    assert buffer.data.numel() == sum(p.numel() for p in ddp.parameters())
    last = list(ddp.parameters())[-1]
    assert last.main_grad.data_ptr() == buffer.data.data_ptr()
    return ddp


def _check_optimizer_step_from_main_grad(ddp, ref_model):
    opt = FP32Optimizer(torch.optim.SGD(ddp.parameters(), lr=0.5), 0.0, False, True)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    assert opt.step()[0]
    ref_opt.step()
    for param, ref in zip(ddp.parameters(), ref_model.parameters()):
        _assert_close(param, ref, rtol=1e-5, atol=1e-6)
    gathered = [torch.empty_like(ddp.module.dense.weight) for _ in range(2)]
    torch.distributed.all_gather(gathered, ddp.module.dense.weight.detach())
    assert torch.equal(gathered[0], gathered[1])  # replicas stay identical


def _check_bucketed_without_buffers(rank, world_size, ref_grads):
    ddp = DistributedDataParallel(_model(), False, False)
    _backward_local_shard(ddp, rank, world_size)
    ddp.allreduce_gradients()
    for param, ref in zip(ddp.parameters(), ref_grads):
        assert param.main_grad is param.grad
        _assert_close(param.grad, ref, rtol=1e-5, atol=1e-6)


def _check_fp32_accumulation_of_bf16_grads(rank, world_size, ref_grads):
    ddp = DistributedDataParallel(_model(torch.bfloat16), True, True)
    ddp.zero_grad_buffer()
    _backward_local_shard(ddp, rank, world_size)
    ddp.allreduce_gradients()
    for param, ref in zip(ddp.parameters(), ref_grads):
        assert param.dtype == torch.bfloat16 and param.main_grad.dtype == torch.float32
        _assert_close(param.main_grad, ref, rtol=5e-2, atol=5e-2)


def _check_state_dict_passthrough():
    ddp = DistributedDataParallel(_model(), False, True)
    keys = set(ddp.state_dict())
    assert keys == set(_model().state_dict()) and not any(k.startswith("module.") for k in keys)
    assert set(ddp.state_dict_for_save_checkpoint()) == keys
    new = {k: torch.zeros_like(v) for k, v in ddp.state_dict().items()}
    ddp.load_state_dict(new)
    assert torch.count_nonzero(ddp.module.dense.weight) == 0


def _dp_world(rank, world_size):
    mpu.initialize_model_parallel(1, 1)
    try:
        assert mpu.get_data_parallel_world_size() == 2
        ref_model, ref_grads = _reference_grads()
        ddp = _check_contiguous_buffers(rank, world_size, ref_grads)
        _check_optimizer_step_from_main_grad(ddp, ref_model)
        _check_bucketed_without_buffers(rank, world_size, ref_grads)
        _check_fp32_accumulation_of_bf16_grads(rank, world_size, ref_grads)
        _check_state_dict_passthrough()
    finally:
        mpu.destroy_model_parallel()


def test_local_ddp_matches_single_process():
    run_distributed(_dp_world, world_size=2, timeout=120)


def test_memory_buffer_views_and_bad_requests():
    buffer = MemoryBuffer(10, torch.float32, device="cpu")
    view = buffer.get(torch.Size([2, 3]), 4)
    view.fill_(1.0)
    assert buffer.data[4:10].sum() == 6 and buffer.data[:4].sum() == 0
    buffer.zero()
    assert buffer.data.sum() == 0
    try:
        buffer.get(torch.Size([4]), 8)
    except ValueError as err:
        assert "out of the buffer of 10 elements" in str(err)
    else:
        raise AssertionError("an out-of-range view must fail")
    try:
        DistributedDataParallel(_model(), True, False)
    except ValueError as err:
        assert "--accumulate-allreduce-grads-in-fp32" in str(err)
    else:
        raise AssertionError("fp32 accumulation without buffers must fail")
