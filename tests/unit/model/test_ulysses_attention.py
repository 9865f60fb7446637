"""DeepSpeed-Ulysses attention (megatron/model/ulysses.py) equals attention over the whole
sequence on one rank: outputs, input gradients and weight gradients, in fp32.

One spawned world of 2 gloo ranks (sequence-parallel size 2). Each rank builds the same
ParallelAttention (same seed), runs it on its half of the tokens through DeepSpeed's
DistributedAttention, and compares with the same module run on all tokens without the
all-to-all (its `ulysses` switched off). Weight gradients of the sequence ranks are
summed, as the gradient reduction does. Cases: the math path with a causal [s, s] mask
and RoPE, and the flash (SDPA is_causal, no mask) path with grouped-query attention.
"""

from __future__ import annotations

import copy

import torch

from megatron import mpu
from megatron.model.enums import AttnMaskType
from megatron.model.transformer import ParallelAttention
from megatron.model.ulysses import masked_mean_over_sequence, slice_sequence
from megatron.model.utils import init_method_normal

from ...dist_utils import run_distributed
from .tiny import causal_mask, tiny_config

SEQ, BATCH, HIDDEN = 16, 2, 64
TOL = dict(rtol=1e-5, atol=1e-6)


def _attention(**overrides) -> ParallelAttention:
    config = tiny_config(hidden_size=HIDDEN, num_attention_heads=4, **overrides)
    torch.manual_seed(7)
    mpu.model_parallel_cuda_manual_seed(7)
    init = init_method_normal(0.02)
    return ParallelAttention(config, init, init, layer_number=1,
                             attn_mask_type=AttnMaskType.causal)


def _compare(rank: int, sp: int, layer: ParallelAttention, mask) -> None:
    assert layer.ulysses is not None
    reference = copy.deepcopy(layer)
    reference.ulysses = None  # the same weights, attention over all tokens on this rank
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(3))
    grad_out = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(4))

    x_full = x.clone().requires_grad_(True)
    out_full, _ = reference(x_full, mask)
    (out_full * grad_out).sum().backward()

    chunk = SEQ // sp
    mine = slice(rank * chunk, (rank + 1) * chunk)
    x_part = x[mine].clone().requires_grad_(True)  # [s/N, b, h]
    out_part, _ = layer(x_part, mask)  # [s/N, b, h]
    (out_part * grad_out[mine]).sum().backward()

    torch.testing.assert_close(out_part, out_full[mine], **TOL)
    torch.testing.assert_close(x_part.grad, x_full.grad[mine], **TOL)
    group = mpu.get_sequence_parallel_group()
    checked = 0
    for (name, p), ref in zip(layer.named_parameters(), reference.parameters()):
        if ref.grad is None:  # the dense bias is returned unadded (skip_bias_add)
            assert p.grad is None, name
            continue
        checked += 1
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad, group=group)  # the sequence ranks' sum
        torch.testing.assert_close(grad, ref.grad, **TOL, msg=name)
    assert checked >= 3, checked  # query_key_value weight and bias, dense weight


def _check_loss(rank: int, sp: int) -> None:
    g = torch.Generator().manual_seed(5)
    losses = torch.rand(BATCH, SEQ, generator=g)
    loss_mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).float()
    full = losses.clone().requires_grad_(True)
    want = torch.sum(full * loss_mask) / loss_mask.sum()
    want.backward()
    part, part_mask = slice_sequence((losses, loss_mask), rank, sp)
    part = part.clone().requires_grad_(True)
    got = masked_mean_over_sequence(part, part_mask, mpu.get_sequence_parallel_group())
    got.backward()
    torch.testing.assert_close(got, want.detach(), **TOL)
    torch.testing.assert_close(part.grad, slice_sequence((full.grad,), rank, sp)[0], **TOL)


def _check(rank: int, world_size: int) -> None:
    torch.use_deterministic_algorithms(True)
    mpu.initialize_model_parallel(1, 1, sequence_parallel_size=world_size)
    assert mpu.get_sequence_parallel_world_size() == world_size
    assert mpu.get_sequence_parallel_rank() == rank
    assert mpu.get_data_parallel_world_size() == 1
    assert mpu.get_sequence_data_parallel_world_size() == world_size
    # the math path: causal [1, 1, s, s] mask, RoPE at each token's global position
    layer = _attention(use_rotary_position_embeddings=True)
    _compare(rank, world_size, layer, causal_mask(SEQ))
    # flash path (SDPA is_causal, no mask tensor) with grouped-query attention, 2 kv heads
    layer = _attention(use_flash_attn=True, num_key_value_heads=2)
    _compare(rank, world_size, layer, None)
    _check_loss(rank, world_size)
    mpu.destroy_model_parallel()


def test_ulysses_attention_equals_full_attention():
    run_distributed(_check, world_size=2)
