"""MoE layers of a tiny LLaMA (--swiglu, --disable-bias-linear, RMSNorm, RoPE, GQA,
--num-experts 2): the experts are SwiGLU MLPs (one fused gate/up GEMM of width 2 ffn, no
biases, the fused weight split with stride 2), and the MoE layer's output, aux loss and
gradients equal an independent top-1 SwiGLU formula on random expert weights.

One process, no process group (expert-parallel size 1). End to end through
pretrain_gpt.py, and at TP=2 / with sequence parallelism / with expert parallelism 2:
tests/functional/test_llama_moe.py.
"""

import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.model import GPTModel
from megatron.model.moe import ExpertMLP, MoEMLP, moe_layers

from .tiny import batch, causal_mask, tiny_config

LLAMA = dict(
    use_rotary_position_embeddings=True,
    swiglu=True,
    normalization="rmsnorm",
    num_key_value_heads=2,
    untie_embeddings_and_output_weights=True,
    add_bias_linear=False,
)
MOE_MLP = "language_model.transformer.layers.1.mlp."
EXPERTS = MOE_MLP + "deepspeed_moe"


def _model(**overrides) -> GPTModel:
    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    config = dict(LLAMA, num_experts=[2], expert_interval=2, topk=1, moe_token_dropping=False)
    config.update(overrides)
    return GPTModel(tiny_config(**config))


def test_experts_are_swiglu_without_biases():
    """Layer 2 of 2 is the MoE layer; each expert's dense_h_to_4h is [2 ffn, h] (gate
    rows, then up rows; stride 2 for TP splits), dense_4h_to_h [h, ffn]; no bias anywhere
    in the layer, and the dense layer 1 keeps its SwiGLU MLP."""
    model = _model()
    ffn, h = model.config.ffn_hidden_size, model.config.hidden_size
    assert ffn == 128  # SwiGLU's int(4h * 2/3 / 64) * 64
    params = dict(model.named_parameters())
    moe = {k: v for k, v in params.items() if k.startswith(MOE_MLP)}
    want = {f"{EXPERTS}.gate.wg.weight": (2, h)}
    for e in (0, 1):
        prefix = f"{EXPERTS}.experts.deepspeed_experts.{e}"
        want[f"{prefix}.dense_h_to_4h.weight"] = (2 * ffn, h)
        want[f"{prefix}.dense_4h_to_h.weight"] = (h, ffn)
    assert {k: tuple(v.shape) for k, v in moe.items()} == want
    for e in (0, 1):
        prefix = f"{EXPERTS}.experts.deepspeed_experts.{e}"
        fused = params[f"{prefix}.dense_h_to_4h.weight"]
        out = params[f"{prefix}.dense_4h_to_h.weight"]
        assert (fused.partition_dim, fused.partition_stride) == (0, 2)
        assert (out.partition_dim, out.partition_stride) == (1, 1)
        assert fused.allreduce is False and out.allreduce is False  # expert params
    dense = model.language_model.transformer.layers[0].mlp
    assert dense.swiglu and tuple(dense.dense_h_to_4h.weight.shape) == (2 * ffn, h)
    layer = model.language_model.transformer.layers[1].mlp
    assert isinstance(layer, MoEMLP) and not layer.sequence_parallel
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    assert all(isinstance(x, ExpertMLP) and x.swiglu for x in experts)


def _reference(x, wg, experts):
    """Top-1 MoE of x [t, h] by hand: p = softmax(x W_g^T), e = argmax p,
    y = p_e (silu(x G_e^T) * (x U_e^T)) B_e^T with [G_e; U_e] the fused weight;
    l_aux = E sum_e mean_t p_te * fraction of tokens routed to e."""
    probs = torch.softmax(x.double() @ wg.double().t(), dim=-1)  # [t, E]
    chosen = probs.argmax(dim=-1)
    y = torch.zeros_like(x, dtype=torch.float64)
    for e, (fused, out) in enumerate(experts):
        gate, up = fused.double().chunk(2, dim=0)  # [ffn, h] each
        expert_out = (F.silu(x.double() @ gate.t()) * (x.double() @ up.t())) @ out.double().t()
        routed = (chosen == e).double()[:, None]
        y = y + routed * probs[:, e : e + 1] * expert_out
    fraction = F.one_hot(chosen, len(experts)).double().mean(dim=0)
    l_aux = len(experts) * (probs.mean(dim=0) * fraction).sum()
    return y, l_aux


def test_moe_layer_equals_top1_swiglu_formula():
    """Random, different expert weights; output [s, b, h], aux loss and the gradients of
    the input, the gate and both experts' weights against the float64 reference."""
    model = _model()
    layer = model.language_model.transformer.layers[1].mlp
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for expert in experts:  # DeepSpeed deep-copies one expert: make them differ
            for p in expert.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        layer.deepspeed_moe.gate.wg.weight.copy_(torch.randn(2, 64, generator=g))
    x = torch.randn(8, 3, 64, generator=g, requires_grad=True)  # [s, b, h]
    output, bias = layer(x)
    assert output.shape == x.shape and bias.abs().sum() == 0
    weights = [(x_.dense_h_to_4h.weight, x_.dense_4h_to_h.weight) for x_ in experts]
    ref_x = x.detach().clone().requires_grad_(True)
    wg = layer.deepspeed_moe.gate.wg.weight
    ref_w = [(a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
             for a, b in weights]  # fmt: skip
    ref_g = wg.detach().clone().requires_grad_(True)
    ref_out, ref_aux = _reference(ref_x.reshape(-1, 64), ref_g, ref_w)
    routed = ref_out.detach().abs().sum(dim=-1) > 0
    assert routed.all()  # no token dropped
    torch.testing.assert_close(output.double().reshape(-1, 64), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.l_aux.double(), ref_aux, atol=1e-6, rtol=1e-6)

    upstream = torch.randn(8, 3, 64, generator=g)
    (output * upstream).sum().backward()
    ((ref_out * upstream.double().reshape(-1, 64)).sum()).backward()
    torch.testing.assert_close(x.grad, ref_x.grad.float().reshape(x.shape), atol=1e-5, rtol=1e-4)
    for (a, b), (ra, rb) in zip(weights, ref_w):
        torch.testing.assert_close(a.grad, ra.grad.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.grad, rb.grad.float(), atol=1e-5, rtol=1e-4)
    # the gate learns through the combine weights p_e (the aux loss is not in this sum)
    torch.testing.assert_close(wg.grad, ref_g.grad.float(), atol=1e-5, rtol=1e-4)
    # both experts took tokens, so both got gradients
    assert all(a.grad.abs().sum() > 0 for a, _ in weights)


def test_llama_moe_model_trains_its_experts():
    """GPTModel returns (per-token loss, summed aux loss of its one MoE layer); the LM
    loss plus coeff x aux gives every expert weight and the gate a finite gradient."""
    model = _model()
    tokens, labels, position_ids = batch(b=2)
    lm, aux = model(tokens, position_ids, causal_mask(), labels=labels)
    assert lm.shape == (2, 32) and aux.shape == () and 1.0 <= float(aux.detach()) <= 2.0
    (lm.mean() + 0.1 * aux).backward()
    assert len(moe_layers(model)) == 1
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if ".mlp." in name:
            assert param.grad.abs().sum() > 0, name
