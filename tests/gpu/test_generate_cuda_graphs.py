"""Decoding with the one-token step captured as a CUDA graph: the same greedy tokens as
the eager fixed-shape step and as the whole-sequence recompute, GPT and LLaMA (rotary,
grouped-query attention), fp32 math attention and bf16 flash attention."""

import pytest
import torch

from megatron import text_generation_utils as tgu
from megatron.text_generation_utils import SamplingParams, generate_tokens, pad_batch

PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]
LLAMA = dict(use_rotary_position_embeddings=True, num_key_value_heads=2, swiglu=True,
             normalization="rmsnorm", untie_embeddings_and_output_weights=True)


def _model(dtype, **overrides):
    from megatron import mpu
    from megatron.model import GPTModel

    from ..unit.model.tiny import tiny_config

    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    flash = dtype == torch.bfloat16
    config = tiny_config(bf16=flash, use_flash_attn=flash, **overrides)
    return GPTModel(config, parallel_output=False).to("cuda", dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_cuda_graph_decoding_equals_eager_and_recompute(arch, dtype):
    model = _model(dtype, **(LLAMA if arch == "llama" else {}))
    context, lengths = pad_batch(PROMPTS, 0, 24, device="cuda")
    greedy = SamplingParams(greedy=True)
    tgu._GRAPH_NOTES.clear()
    graph = generate_tokens(model, context, lengths, 16, 127, greedy, cuda_graphs=True)
    assert any("run as a CUDA graph" in note for note in tgu._GRAPH_NOTES), tgu._GRAPH_NOTES
    fixed = generate_tokens(model, context, lengths, 16, 127, greedy, cuda_graphs=False,
                            fixed_shape_steps=True)
    assert torch.equal(graph.tokens, fixed.tokens)
    assert torch.allclose(graph.log_probs, fixed.log_probs, atol=1e-5)  # the same kernels
    if dtype == torch.float32:  # bf16 rounding may flip a near tie against recompute
        full = generate_tokens(model, context, lengths, 16, 127, greedy, recompute=True)
        assert torch.equal(graph.tokens, full.tokens)
        assert torch.allclose(graph.log_probs, full.log_probs, atol=1e-4)
