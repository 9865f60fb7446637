"""Tensor-parallel layers, communication mappings, cross entropy and broadcast_data equal
their serial versions, on 4 gloo ranks laid out as TP=2 x PP=2 and then TP=4; the same
world also checks every group layout of 4 ranks."""

import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from tests.dist_utils import run_distributed
from tests.unit.mpu.group_checks import check_groups

SEED = 1234
ATOL = 1e-5


def _close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.allclose(actual, expected, atol=ATOL, rtol=1e-5), (
        f"{what}: max diff {(actual - expected).abs().max().item()}"
    )


def _serial(cls, *args, **kwargs):
    """The same layer built as if TP were 1 (the reference), from the same seed."""
    mpu.set_tensor_model_parallel_world_size(1)
    mpu.set_tensor_model_parallel_rank(0)
    try:
        torch.manual_seed(SEED)
        return cls(*args, **kwargs)
    finally:
        mpu.clear_model_parallel_overrides()


def _parallel(cls, *args, **kwargs):
    torch.manual_seed(SEED)
    return cls(*args, **kwargs)


def _data(*shape, seed=7):
    """The same random tensor on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


def _check_column(tp, r):
    for gather_output, skip_bias_add in [(True, False), (False, False), (False, True)]:
        kwargs = dict(gather_output=gather_output, skip_bias_add=skip_bias_add)
        ref = _serial(mpu.ColumnParallelLinear, 8, 12, **kwargs)
        par = _parallel(mpu.ColumnParallelLinear, 8, 12, **kwargs)
        assert torch.equal(par.weight, ref.weight.chunk(tp, 0)[r]), "shard != slice of TP=1"
        assert torch.count_nonzero(par.bias) == 0
        assert (par.weight.tensor_model_parallel, par.weight.partition_dim) == (True, 0)
        bias = _data(12, seed=3)
        with torch.no_grad():
            ref.bias.copy_(bias)
            par.bias.copy_(bias.chunk(tp)[r])

        x = _data(4, 3, 8).requires_grad_()  # [s, b, in]
        x_ref = x.detach().clone().requires_grad_()
        grad = _data(4, 3, 12, seed=9)
        y, out_bias = par(x)
        y_ref = F.linear(x_ref, ref.weight, ref.bias)
        if skip_bias_add:
            assert out_bias is par.bias
            y = y + out_bias
        else:
            assert out_bias is None
        if not gather_output:
            y_ref_local = y_ref.chunk(tp, -1)[r]
            _close(y, y_ref_local, f"column forward {kwargs}")
            (y * grad.chunk(tp, -1)[r]).sum().backward()
        else:
            _close(y, y_ref, f"column forward {kwargs}")
            (y * grad).sum().backward()
        (y_ref * grad).sum().backward()
        _close(x.grad, x_ref.grad, f"column input grad {kwargs}")
        _close(par.weight.grad, ref.weight.grad.chunk(tp, 0)[r], f"column weight grad {kwargs}")
        _close(par.bias.grad, ref.bias.grad.chunk(tp)[r], f"column bias grad {kwargs}")


def _check_column_stride(tp, r):
    ref = _serial(mpu.ColumnParallelLinear, 4, 6 * tp, stride=3)
    par = _parallel(mpu.ColumnParallelLinear, 4, 6 * tp, stride=3)
    blocks = ref.weight.split(2, dim=0)  # 3 * tp blocks of 2 rows
    assert torch.equal(par.weight, torch.cat(blocks[r::tp]))
    assert par.weight.partition_stride == 3


def _check_row(tp, r):
    for input_is_parallel, skip_bias_add in [(False, False), (True, False), (True, True)]:
        kwargs = dict(input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add)
        ref = _serial(mpu.RowParallelLinear, 8, 6, **kwargs)
        par = _parallel(mpu.RowParallelLinear, 8, 6, **kwargs)
        assert torch.equal(par.weight, ref.weight.chunk(tp, 1)[r]), "shard != slice of TP=1"
        assert (par.weight.tensor_model_parallel, par.weight.partition_dim) == (True, 1)
        assert not mpu.param_is_not_tensor_parallel_duplicate(par.bias) or r == 0
        bias = _data(6, seed=4)
        with torch.no_grad():
            ref.bias.copy_(bias)
            par.bias.copy_(bias)

        x_full = _data(4, 3, 8)
        x_ref = x_full.clone().requires_grad_()
        x = (x_full.chunk(tp, -1)[r] if input_is_parallel else x_full).clone().requires_grad_()
        grad = _data(4, 3, 6, seed=9)
        y, out_bias = par(x)
        if skip_bias_add:
            assert out_bias is par.bias
            y = y + out_bias
        else:
            assert out_bias is None
        y_ref = F.linear(x_ref, ref.weight, ref.bias)
        _close(y, y_ref, f"row forward {kwargs}")
        (y * grad).sum().backward()
        (y_ref * grad).sum().backward()
        want_x_grad = x_ref.grad.chunk(tp, -1)[r] if input_is_parallel else x_ref.grad
        _close(x.grad, want_x_grad, f"row input grad {kwargs}")
        _close(par.weight.grad, ref.weight.grad.chunk(tp, 1)[r], f"row weight grad {kwargs}")
        _close(par.bias.grad, ref.bias.grad, f"row bias grad {kwargs}")


def _check_row_chunked(tp, r):
    """The row-parallel GEMM in pieces, each all-reduced while the next computes, equals
    the one-piece layer in value and gradients (also when the pieces are uneven)."""
    for chunks in (2, 3):
        ref = _serial(mpu.RowParallelLinear, 8, 6, input_is_parallel=True)
        par = _parallel(
            mpu.RowParallelLinear,
            8,
            6,
            input_is_parallel=True,
            config=mpu.ParallelConfig(tp_comm_overlap_chunks=chunks),
        )
        x_full = _data(5, 3, 8)  # [s, b, in]
        x_ref = x_full.clone().requires_grad_()
        x = x_full.chunk(tp, -1)[r].clone().requires_grad_()
        grad = _data(5, 3, 6, seed=9)
        y, _ = par(x)
        y_ref = F.linear(x_ref, ref.weight, ref.bias)
        _close(y, y_ref, f"chunked row forward ({chunks} pieces)")
        (y * grad).sum().backward()
        (y_ref * grad).sum().backward()
        _close(x.grad, x_ref.grad.chunk(tp, -1)[r], f"chunked row input grad ({chunks})")
        _close(par.weight.grad, ref.weight.grad.chunk(tp, 1)[r], f"chunked row w grad ({chunks})")
        _close(par.bias.grad, ref.bias.grad, f"chunked row bias grad ({chunks})")


def _check_sequence_parallel_mlp(tp, r):
    """Column -> gelu -> Row with sequence parallelism equals the serial MLP, with the
    GEMMs and their all-gather / reduce-scatter one after the other and through the
    --tp-comm-overlap functions (mpu/overlap.py; on gloo they run unfused)."""
    for overlap in (False, True):
        _sequence_parallel_mlp(tp, r, overlap)


def _sequence_parallel_mlp(tp, r, overlap):
    what = f"tp_comm_overlap={overlap}"
    config = mpu.ParallelConfig(sequence_parallel=True, tp_comm_overlap=overlap)
    col_ref = _serial(mpu.ColumnParallelLinear, 8, 16, gather_output=False)
    row_ref = _serial(mpu.RowParallelLinear, 16, 8, input_is_parallel=True)
    col = _parallel(mpu.ColumnParallelLinear, 8, 16, gather_output=False, config=config)
    row = _parallel(mpu.RowParallelLinear, 16, 8, input_is_parallel=True, config=config)
    assert row.bias.sequence_parallel
    x_full = _data(8, 2, 8)  # [s, b, h]
    x_ref = x_full.clone().requires_grad_()
    x = x_full.chunk(tp, 0)[r].clone().requires_grad_()  # [s/p, b, h]
    grad = _data(8, 2, 8, seed=5)

    y = row(F.gelu(col(x)[0]))[0]  # [s/p, b, h]
    # the reference layers' own forward would communicate (TP is 2 again): use F.linear
    y_ref = F.linear(F.gelu(F.linear(x_ref, col_ref.weight, col_ref.bias)), row_ref.weight)
    y_ref = y_ref + row_ref.bias
    _close(y, y_ref.chunk(tp, 0)[r], f"sequence-parallel MLP forward {what}")
    (y * grad.chunk(tp, 0)[r]).sum().backward()
    (y_ref * grad).sum().backward()
    _close(x.grad, x_ref.grad.chunk(tp, 0)[r], f"sequence-parallel input grad {what}")
    _close(col.weight.grad, col_ref.weight.grad.chunk(tp, 0)[r], f"sp column weight grad {what}")
    _close(row.weight.grad, row_ref.weight.grad.chunk(tp, 1)[r], f"sp row weight grad {what}")
    # each rank's bias grad covers its sequence chunk: their sum is the serial grad
    bias_grad = row.bias.grad.clone()
    torch.distributed.all_reduce(bias_grad, group=mpu.get_tensor_model_parallel_group())
    _close(bias_grad, row_ref.bias.grad, f"sp row bias grad (summed over TP) {what}")


def _check_async_linear(tp, r):
    """The column-parallel GEMM with overlapped input-gradient communication equals
    F.linear after copy_to (or, sequence parallel, after the sequence all-gather), in
    value and gradients, with and without overlap and bias; the in-place reduction
    equals the copying one."""
    w_full = _data(12, 8, seed=11)
    b_full = _data(12, seed=12)
    for sp, overlap, use_bias in [
        (False, True, True),
        (False, False, True),
        (True, True, True),
        (True, False, False),
    ]:
        what = f"sequence_parallel={sp} async={overlap} bias={use_bias}"
        x_full = _data(8, 2, 8, seed=13)  # [s, b, h]
        x = (x_full.chunk(tp, 0)[r] if sp else x_full).clone().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        w = w_full.chunk(tp, 0)[r].clone().requires_grad_()
        w_ref = w.detach().clone().requires_grad_()
        b = b_full.chunk(tp)[r].clone().requires_grad_() if use_bias else None
        b_ref = b.detach().clone().requires_grad_() if use_bias else None
        grad = _data(8, 2, 12 // tp, seed=14 + r)
        y = mpu.linear_with_grad_accumulation_and_async_allreduce(x, w, b, sp, overlap)
        if sp:
            x_in = mpu.gather_from_sequence_parallel_region(x_ref)
        else:
            x_in = mpu.copy_to_tensor_model_parallel_region(x_ref)
        y_ref = F.linear(x_in, w_ref, b_ref)
        _close(y, y_ref, f"async linear forward {what}")
        (y * grad).sum().backward()
        (y_ref * grad).sum().backward()
        _close(x.grad, x_ref.grad, f"async linear input grad {what}")
        _close(w.grad, w_ref.grad, f"async linear weight grad {what}")
        if use_bias:
            _close(b.grad, b_ref.grad, f"async linear bias grad {what}")
    # no input gradient wanted: no communication, weight gradient still right
    w = w_full.chunk(tp, 0)[r].clone().requires_grad_()
    x = _data(8, 2, 8, seed=13)
    mpu.linear_with_grad_accumulation_and_async_allreduce(x, w, None).sum().backward()
    _close(w.grad, torch.ones(12 // tp, 16) @ x.view(16, 8), "weight grad without input grad")

    part = _data(4, 3, seed=20 + r).requires_grad_()
    expect = mpu.reduce_from_tensor_model_parallel_region(part)
    fresh = part * 1.0  # a new tensor nothing else reads
    got = mpu.reduce_from_tensor_model_parallel_region_inplace(fresh)
    _close(got, expect, "in-place reduce")
    got.sum().backward()
    _close(part.grad, torch.ones(4, 3), "in-place reduce backward is the identity")


def _check_embedding(tp, r):
    ref = _serial(mpu.VocabParallelEmbedding, 16, 6)
    par = _parallel(mpu.VocabParallelEmbedding, 16, 6)
    assert torch.equal(par.weight, ref.weight.chunk(tp, 0)[r])
    assert (par.vocab_start_index, par.vocab_end_index) == (r * 16 // tp, (r + 1) * 16 // tp)
    ids = torch.randint(0, 16, (3, 5), generator=torch.Generator().manual_seed(1))
    emb = torch.nn.Embedding(16, 6)
    with torch.no_grad():
        emb.weight.copy_(ref.weight)
    out = par(ids)  # [b, s, h]
    out_ref = emb(ids)
    _close(out, out_ref, "embedding forward")
    grad = _data(3, 5, 6)
    (out * grad).sum().backward()
    (out_ref * grad).sum().backward()
    _close(par.weight.grad, emb.weight.grad.chunk(tp, 0)[r], "embedding weight grad")


def _check_cross_entropy(tp, r):
    vocab = 8 * tp
    logits = _data(4, 3, vocab) * 5 + 100  # large offset: needs the max subtraction
    target = torch.randint(0, vocab, (4, 3), generator=torch.Generator().manual_seed(2))
    ref_logits = logits.clone().requires_grad_()
    local = logits.chunk(tp, -1)[r].clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(local, target)  # [s, b]
    ref = F.cross_entropy(ref_logits.view(-1, vocab), target.view(-1), reduction="none")
    _close(loss, ref.view(4, 3), "vocab-parallel cross entropy")
    weights = _data(4, 3, seed=11)
    (loss * weights).sum().backward()
    (ref.view(4, 3) * weights).sum().backward()
    _close(local.grad, ref_logits.grad.chunk(tp, -1)[r], "cross entropy grad")


def _check_last_dim_mappings(tp, r):
    x = _data(2, 3, 4 * tp).requires_grad_()
    scattered = mpu.scatter_to_tensor_model_parallel_region(x)
    _close(scattered, x.detach().chunk(tp, -1)[r], "scatter last dim")
    gathered = mpu.gather_from_tensor_model_parallel_region(scattered)
    _close(gathered, x.detach(), "gather(scatter(x)) == x")
    (gathered * (r + 1)).sum().backward()  # each rank's gradient of the gather is (r+1)
    # backward: gather keeps the local chunk, scatter all-gathers it: chunk i gets (i+1)
    want = torch.cat([torch.full((2, 3, 4), float(i + 1)) for i in range(tp)], dim=-1)
    _close(x.grad, want, "scatter/gather backward")

    y = (_data(2, 3) * (r + 1)).requires_grad_()  # differs per rank
    reduced = mpu.reduce_from_tensor_model_parallel_region(y)
    _close(reduced, _data(2, 3) * sum(range(1, tp + 1)), "reduce forward")
    copied = mpu.copy_to_tensor_model_parallel_region(y)
    assert torch.equal(copied, y)
    (reduced.sum() + (copied * (r + 1)).sum()).backward()
    # reduce backward: identity (1); copy backward: all-reduce of (r+1)
    _close(y.grad, torch.full((2, 3), 1.0 + sum(range(1, tp + 1))), "copy/reduce backward")


def _check_sequence_mappings(tp, r):
    x = _data(4 * tp, 2, 3).requires_grad_()  # [s, b, h]
    local = mpu.scatter_to_sequence_parallel_region(x)
    _close(local, x.detach().chunk(tp, 0)[r], "scatter first dim")
    full = mpu.gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=False)
    _close(full, x.detach(), "gather(scatter(x)) == x")
    full.sum().backward()
    # no-TP-grad gather keeps the local chunk; scatter's backward all-gathers: all ones
    _close(x.grad, torch.ones_like(x), "sequence scatter/gather backward")

    # gather with tensor-parallel output grad: backward reduce-scatters
    part = x.detach().chunk(tp, 0)[r].clone().requires_grad_()
    gathered = mpu.gather_from_sequence_parallel_region(part)
    _close(gathered, x.detach(), "sequence gather forward")
    g = _data(4 * tp, 2, 3, seed=13)
    (gathered * g * (r + 1)).sum().backward()
    want = (g * sum(range(1, tp + 1))).chunk(tp, 0)[r]
    _close(part.grad, want, "gather backward = reduce-scatter")

    # reduce-scatter: sum over ranks, keep the local chunk; backward all-gathers
    y = (_data(4 * tp, 2, 3) * (r + 1)).requires_grad_()
    out = mpu.reduce_scatter_to_sequence_parallel_region(y)
    want = (_data(4 * tp, 2, 3) * sum(range(1, tp + 1))).chunk(tp, 0)[r]
    _close(out, want, "reduce-scatter forward")
    (out * (r + 1)).sum().backward()
    want = torch.cat([torch.full((4, 2, 3), float(i + 1)) for i in range(tp)])
    _close(y.grad, want, "reduce-scatter backward = all-gather")


def _check_broadcast_data(tp, r):
    src = mpu.get_tensor_model_parallel_src_rank()
    keys = ["text", "labels", "empty"]
    data = None
    if r == 0:
        data = {
            "text": torch.arange(10).view(2, 5) + 100 * src,
            "labels": torch.arange(24).view(2, 3, 4) - src,
            "empty": torch.zeros(3, 0, dtype=torch.long),
        }
    out = mpu.broadcast_data(keys, data, torch.int64)
    assert torch.equal(out["text"], torch.arange(10).view(2, 5) + 100 * src)
    assert torch.equal(out["labels"], torch.arange(24).view(2, 3, 4) - src)
    assert out["empty"].shape == (3, 0)


def _check_grad_accumulation_fusion(tp, r):
    """With the local DDP's main_grad buffers marked for fusion, the column- and row-parallel
    GEMMs (plain and chunked) add dW into main_grad over two micro-batches and give the
    weights no .grad; main_grad equals the unfused layers' accumulated .grad exactly."""

    def mlp(fused: bool):
        torch.manual_seed(SEED)
        layers = [
            mpu.ColumnParallelLinear(8, 12, gather_output=False),
            mpu.RowParallelLinear(12, 8, input_is_parallel=True),
            mpu.RowParallelLinear(
                8, 6, config=mpu.ParallelConfig(tp_comm_overlap_chunks=2 if tp > 1 else 1)
            ),
        ]
        if fused:
            for layer in layers:
                layer.weight.main_grad = torch.zeros_like(layer.weight)
                layer.weight.fuse_wgrad_accumulation = True
        return layers

    def backward(layers):
        for micro in range(2):
            h = _data(5, 3, 8, seed=20 + micro)
            h, _ = layers[0](h)
            h, _ = layers[1](torch.tanh(h))
            y, _ = layers[2](h)
            (y * _data(5, 3, 6, seed=30 + micro)).sum().backward()

    plain, fused = mlp(False), mlp(True)
    backward(plain)
    backward(fused)
    for i, (a, b) in enumerate(zip(plain, fused)):
        assert b.weight.grad is None, f"layer {i}: fused weight got a .grad"
        assert torch.equal(b.weight.main_grad, a.weight.grad), f"layer {i}: main_grad != grad"
        assert torch.equal(b.bias.grad, a.bias.grad), f"layer {i}: bias grad"


def _run_tp_checks(rank, world_size, tp, pp):
    mpu.initialize_model_parallel(tp, pp)
    r = mpu.get_tensor_model_parallel_rank()
    for check in (
        _check_column,
        _check_column_stride,
        _check_row,
        _check_row_chunked,
        _check_sequence_parallel_mlp,
        _check_async_linear,
        _check_embedding,
        _check_cross_entropy,
        _check_last_dim_mappings,
        _check_sequence_mappings,
        _check_broadcast_data,
        _check_grad_accumulation_fusion,
    ):
        check(tp, r)
    mpu.destroy_model_parallel()


def _check_world(rank, world_size):
    check_groups(rank, world_size)  # one spawned world serves both (ranks are slow to start)
    _run_tp_checks(rank, world_size, 2, 2)
    _run_tp_checks(rank, world_size, 4, 1)


def test_parallel_layers_match_serial():
    run_distributed(_check_world, world_size=4, timeout=150)


def test_single_process_layers_are_serial():
    """Without process groups (TP=1) the layers are plain linear / embedding layers."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group was left initialised in this process")
    mpu.destroy_model_parallel()
    torch.manual_seed(SEED)
    cpu = mpu.ParallelConfig(use_cpu_initialization=True)
    col = mpu.ColumnParallelLinear(5, 7, config=cpu)
    torch.manual_seed(SEED)
    full = torch.empty(7, 5)
    torch.nn.init.xavier_normal_(full)
    assert torch.equal(col.weight, full)
    x = _data(2, 5)
    y, bias = col(x)
    assert bias is None
    _close(y, F.linear(x, full), "TP=1 column")
    row = mpu.RowParallelLinear(7, 3, config=cpu, skip_bias_add=True)
    y2, bias2 = row(y)
    _close(y2, F.linear(y, row.weight), "TP=1 row")
    assert bias2 is row.bias and torch.count_nonzero(row.bias) == 0
    target = torch.tensor([1, 0])
    logits = _data(2, 4)
    _close(
        mpu.vocab_parallel_cross_entropy(logits, target),
        F.cross_entropy(logits, target, reduction="none"),
        "TP=1 cross entropy",
    )
    _check_grad_accumulation_fusion(1, 0)
