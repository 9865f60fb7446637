"""--tp-comm-overlap on two GPUs (NCCL): the symmetric-memory GEMMs (copy-engine
all-gather / reduce-scatter in pieces) equal the collective-then-GEMM path in value and
gradient, in fp32 and bf16, for the sequence-parallel column -> gelu -> row MLP."""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)

# fp32 GEMMs may run as TF32; bf16 rounds each piece's output before the sum
TOLERANCE = {torch.float32: dict(atol=2e-2, rtol=2e-2), torch.bfloat16: dict(atol=6e-2, rtol=5e-2)}


def _close(got, want, dtype, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = TOLERANCE[dtype]
    diff = (got.float() - want.float()).abs().max().item()
    assert torch.allclose(got.float(), want.float(), **tol), f"{what}: max diff {diff}"


def _mlp_run(col, row, x, grad):
    x = x.detach().clone().requires_grad_()
    for p in (*col.parameters(), *row.parameters()):
        p.grad = None
    y = row(F.gelu(col(x)[0]))[0]  # [s/p, b, h]
    (y.float() * grad).sum().backward()
    return y.detach(), x.grad, col.weight.grad.clone(), row.weight.grad.clone()


def _check(rank, world_size):
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    from megatron import mpu
    from megatron.mpu import overlap

    mpu.initialize_model_parallel(2, 1)
    usable, why = mpu.symmetric_memory_available()
    assert usable, why
    dev = torch.device("cuda", rank)
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device=dev).manual_seed(5 + rank)
        s, b, h, ffn = 512, 2, 256, 1024
        shard = torch.randn(s // 2, b, h, device=dev, dtype=dtype, generator=gen)
        weight = torch.randn(ffn // 2, h, device=dev, dtype=dtype, generator=gen) / 16
        gathered, out = overlap.all_gather_matmul(shard, weight.t())
        want_gathered = mpu.mappings._gather_along_first_dim(shard)
        assert torch.equal(gathered, want_gathered), "fused all-gather differs"
        _close(out, want_gathered.matmul(weight.t()), dtype, f"all_gather_matmul {dtype}")

        full = torch.randn(s, b, ffn // 2, device=dev, dtype=dtype, generator=gen)
        w_row = torch.randn(h, ffn // 2, device=dev, dtype=dtype, generator=gen) / 16
        got = overlap.matmul_reduce_scatter(full, w_row.t())
        want = mpu.mappings._reduce_scatter_along_first_dim(full.matmul(w_row.t()))
        _close(got, want, dtype, f"matmul_reduce_scatter {dtype}")
        assert mpu.get_tensor_model_parallel_group().group_name in overlap._SYMM_MEM_GROUPS
        assert overlap._EXCHANGES, "two ranks: the copy-engine exchange was not used"

        # pieces of other sizes in turn (both slots, a larger buffer), work queued between
        # the start and the finish of a reduce-scatter
        for rows in (64, 1024, 256):
            part = torch.randn(rows, b, h, device=dev, dtype=dtype, generator=gen)
            got_g, got = overlap.all_gather_matmul(part, weight.t())
            want_g = mpu.mappings._gather_along_first_dim(part)
            assert torch.equal(got_g, want_g), f"all-gather of {rows} rows"
            _close(got, want_g.matmul(weight.t()), dtype, f"all_gather_matmul {rows} rows")
            x_full = torch.randn(2 * rows, b, ffn // 2, device=dev, dtype=dtype, generator=gen)
            finish = overlap.matmul_reduce_scatter_start(x_full, w_row.t())
            between = x_full.sum()
            want = mpu.mappings._reduce_scatter_along_first_dim(x_full.matmul(w_row.t()))
            _close(finish(), want, dtype, f"matmul_reduce_scatter {rows} rows")
            assert torch.isfinite(between)

        torch.manual_seed(11)
        plain_config = mpu.ParallelConfig(params_dtype=dtype, sequence_parallel=True)
        layers = {}
        for fused in (False, True):
            config = dataclasses.replace(plain_config, tp_comm_overlap=fused)
            torch.manual_seed(11)
            layers[fused] = (
                mpu.ColumnParallelLinear(h, ffn, config=config, gather_output=False),
                mpu.RowParallelLinear(ffn, h, config=config, input_is_parallel=True),
            )
        for plain_layer, fused_layer in zip(*layers.values()):
            fused_layer.load_state_dict(plain_layer.state_dict())
        x = torch.randn(s // 2, b, h, device=dev, dtype=dtype, generator=gen)
        grad = torch.randn(s // 2, b, h, device=dev, generator=gen)
        plain = _mlp_run(*layers[False], x, grad)
        fused = _mlp_run(*layers[True], x, grad)
        for name, a, c in zip(
            ("output", "input grad", "column w grad", "row w grad"), fused, plain
        ):
            _close(a, c, dtype, f"sequence-parallel MLP {name} {dtype}")
    torch.cuda.synchronize()
    mpu.destroy_model_parallel()


def test_tp_comm_overlap_matches_sequence_parallel():
    run_distributed(_check, world_size=2, backend="nccl", timeout=240)
