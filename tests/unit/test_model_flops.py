"""The TFLOP/s of the log line: model FLOPs per iteration for GPT and LLaMA shapes."""

from __future__ import annotations

import argparse

import pytest

from megatron.utils import model_flops_per_iteration, num_floating_point_operations


def _paper(b, s, n_layers, h, v, c):
    return c * b * s * n_layers * h**2 * (1 + s / (6 * h) + v / (16 * n_layers * h))


@pytest.mark.parametrize("recompute,c", [(False, 72), (True, 96)])
def test_gpt_shape_is_the_megatron_paper_formula(recompute, c):
    b, s, n_layers, h, v = 8, 2048, 24, 2048, 51200
    got = num_floating_point_operations(b, s, n_layers, h, v, recompute=recompute)
    assert got == pytest.approx(_paper(b, s, n_layers, h, v, c), rel=1e-12)
    # naming the heads of a plain GPT changes nothing
    named = num_floating_point_operations(
        b, s, n_layers, h, v, recompute=recompute, num_attention_heads=16, num_key_value_heads=16,
        ffn_hidden_size=4 * h,
    )
    assert named == pytest.approx(got, rel=1e-12)


def test_llama_3_2_1b_counts_gqa_and_the_swiglu_gate():
    """Worked by hand from the weight shapes: forward = 2 FLOPs per weight per token for
    every linear layer, plus 4·s·a·d for the attention products; x3 for forward+backward."""
    b, s, n_layers, h, a, g, d, f, v = 4, 2048, 16, 2048, 32, 8, 64, 8192, 128256
    weights = h * (a * d + 2 * g * d) + a * d * h + 3 * h * f  # qkv, dense, gate+up, down
    per_token_forward = 2 * weights + 4 * s * a * d
    expected = 3 * n_layers * b * s * per_token_forward + 4.5 * b * s * h * v
    args = argparse.Namespace(
        num_layers=n_layers, hidden_size=h, padded_vocab_size=v, num_attention_heads=a,
        kv_channels=d, num_key_value_heads=g, ffn_hidden_size=f, swiglu=True,
        checkpoint_activations=False,
    )
    got = model_flops_per_iteration(args, b, s)
    assert got == pytest.approx(expected, rel=1e-12)
    # GQA and the third GEMM matter: MHA with a GeLU MLP of the same width counts differently
    mha = num_floating_point_operations(b, s, n_layers, h, v, num_attention_heads=a, ffn_hidden_size=f)
    assert mha != pytest.approx(got, rel=1e-3)
    # recompute repeats the layers' forward, not the logits
    args.checkpoint_activations = True
    recomputed = 4 * n_layers * b * s * per_token_forward + 6 * b * s * h * v
    assert model_flops_per_iteration(args, b, s) == pytest.approx(recomputed, rel=1e-12)
