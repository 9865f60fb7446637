"""LLaMA-family options of the one model stack: RoPE, grouped-query attention, SwiGLU,
RMSNorm, untied output weights and no linear biases, against independent references;
their flags; and a tiny LLaMA at TP=2 and PP=2 equal to TP=1 on two gloo ranks."""

import shlex

import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.arguments import ArgumentError, build_parser, validate_args
from megatron.model import GPTModel
from megatron.model.config import TransformerConfig, config_from_args
from megatron.model.enums import AttnMaskType
from megatron.model.rmsnorm import RMSNorm, rms_norm_reference
from megatron.model.rotary_pos_embedding import RotaryEmbedding, apply_rotary_pos_emb, rotary_dim
from megatron.model.transformer import (
    ParallelAttention,
    ParallelMLP,
    build_norm,
    sdpa_supports_gqa,
)
from megatron.model.utils import init_method_normal, scaled_init_method_normal
from tests.dist_utils import run_distributed

from .tiny import batch, causal_mask, tiny_config

# rotary, SwiGLU, RMSNorm, 4 heads / 2 key-value heads, untied, no linear biases
LLAMA = dict(
    use_rotary_position_embeddings=True,
    swiglu=True,
    normalization="rmsnorm",
    num_key_value_heads=2,
    untie_embeddings_and_output_weights=True,
    add_bias_linear=False,
)


@pytest.fixture(autouse=True)
def _seeded():
    mpu.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)


# ----------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------


def _rope_reference(x: torch.Tensor, offset: int, theta: float, dim: int) -> torch.Tensor:
    """Complex RoPE of x [s, b, n, hn]: z_k = x_k + i x_{k + dim/2} (k < dim/2) times
    exp(i (offset + m) theta^(-2k/dim)) at position m; channels from dim on pass."""
    half = dim // 2
    z = torch.complex(x[..., :half].double(), x[..., half:dim].double())
    k = torch.arange(half, dtype=torch.float64)
    positions = offset + torch.arange(x.size(0), dtype=torch.float64)
    angle = positions[:, None] * theta ** (-2.0 * k / dim)  # [s, dim/2]
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, None, :]
    return torch.cat((z.real, z.imag, x[..., dim:].double()), dim=-1).to(x.dtype)


@pytest.mark.parametrize(
    "percent, offset, theta",
    [(1.0, 0, 10000), (0.5, 0, 10000), (1.0, 7, 10000), (0.25, 5, 500000)],
)
def test_rotary_matches_complex_reference(percent, offset, theta):
    x = torch.randn(12, 2, 3, 16)  # [s, b, n, hn]
    dim = rotary_dim(16, percent)
    cos, sin = RotaryEmbedding(dim, theta)(12, offset)
    out = apply_rotary_pos_emb(x, cos, sin)
    torch.testing.assert_close(out, _rope_reference(x, offset, theta, dim), atol=1e-5, rtol=1e-5)
    if dim < 16:
        assert torch.equal(out[..., dim:], x[..., dim:])


def test_rotary_table_slices_for_shorter_sequences_and_offsets():
    rope = RotaryEmbedding(8)
    short = rope(4)  # first call builds a small table; the next one grows it
    long = rope(40)
    for a, b in zip(short, long):
        torch.testing.assert_close(a, b[:4])
    for a, b in zip(rope(8, offset=20), long):
        torch.testing.assert_close(a, b[20:28])
    assert long[0].shape == (40, 1, 1, 8)


# ----------------------------------------------------------------------------------------
# Grouped-query attention
# ----------------------------------------------------------------------------------------


def _attention(**overrides):
    config = tiny_config(**overrides)
    return ParallelAttention(
        config,
        init_method_normal(0.02),
        scaled_init_method_normal(0.02, 2),
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
    )


def _gqa_rows_to_mha(t: torch.Tensor, heads: int, groups: int, hn: int) -> torch.Tensor:
    """Grouped [g: q_{g r} .. q_{g r + r - 1}, k_g, v_g] rows -> per-head [q_j, k_{j // r},
    v_{j // r}] rows of plain multi-head attention with the key/values repeated."""
    r = heads // groups
    rest = t.shape[1:]
    blocks = t.reshape(groups, r + 2, hn, *rest)
    q = blocks[:, :r]
    k = blocks[:, r : r + 1].expand(groups, r, hn, *rest)
    v = blocks[:, r + 1 : r + 2].expand(groups, r, hn, *rest)
    return torch.stack((q, k, v), dim=2).reshape(heads * 3 * hn, *rest)


def _mha_grad_to_gqa(g: torch.Tensor, heads: int, groups: int, hn: int) -> torch.Tensor:
    """The gradient of the grouped weight: q rows as they are, k and v rows summed over
    the r heads that share them."""
    r = heads // groups
    rest = g.shape[1:]
    per_head = g.reshape(groups, r, 3, hn, *rest)
    q = per_head[:, :, 0]
    k = per_head[:, :, 1].sum(dim=1, keepdim=True)
    v = per_head[:, :, 2].sum(dim=1, keepdim=True)
    return torch.cat((q, k, v), dim=1).reshape(-1, *rest)


def _run_attention(attention, hidden, mask):
    x = hidden.clone().requires_grad_(True)
    out, bias = attention(x, mask)
    (out + bias).square().sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("flash", [False, True])
def test_gqa_equals_multi_head_attention_with_repeated_kv(groups, flash):
    options = dict(use_flash_attn=flash, use_rotary_position_embeddings=groups == 2)
    gqa = _attention(num_key_value_heads=groups, **options)
    mha = _attention(**options)
    assert gqa.query_key_value.weight.shape == ((4 + 2 * groups) * 16, 64)
    with torch.no_grad():
        for name in ("weight", "bias"):
            src = getattr(gqa.query_key_value, name)
            src.normal_()
            getattr(mha.query_key_value, name).copy_(_gqa_rows_to_mha(src, 4, groups, 16))
        mha.dense.weight.copy_(gqa.dense.weight)
        mha.dense.bias.copy_(gqa.dense.bias)
    hidden = torch.randn(12, 2, 64)
    out, grad = _run_attention(gqa, hidden, causal_mask(12))
    ref_out, ref_grad = _run_attention(mha, hidden, causal_mask(12))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            getattr(gqa.query_key_value, name).grad,
            _mha_grad_to_gqa(getattr(mha.query_key_value, name).grad, 4, groups, 16),
            atol=1e-5,
            rtol=1e-4,
        )


def test_flash_gqa_does_not_repeat_kv(monkeypatch):
    assert sdpa_supports_gqa()  # torch >= 2.5
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    _attention(num_key_value_heads=1, use_flash_attn=True)(torch.randn(8, 2, 64), None)
    assert seen == [(4, 1, True)]


@pytest.mark.parametrize("flash", [False, True])
def test_rotary_gqa_key_value_cache_offsets_positions(flash):
    """Generation: 8 tokens, then 4 more with the cache (positions 8..11) give the last 4
    outputs of one pass over all 12."""
    attention = _attention(
        num_key_value_heads=2,
        use_rotary_position_embeddings=True,
        rotary_percent=0.5,
        use_flash_attn=flash,
    )
    hidden = torch.randn(12, 2, 64)
    mask = causal_mask(12)
    with torch.no_grad():
        full, _ = attention(hidden, mask)
        (first, present), _ = attention(hidden[:8], mask, get_key_value=True)
        (second, present), _ = attention(hidden[8:], mask, layer_past=present, get_key_value=True)
    assert present[0].shape == (12, 2, 2, 16)  # [sk, b, ng, hn]: the cache is not repeated
    torch.testing.assert_close(first, full[:8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, full[8:], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# SwiGLU, RMSNorm
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_mlp_matches_reference(bias):
    config = tiny_config(swiglu=True, add_bias_linear=bias)
    assert config.ffn_hidden_size == 128  # int(4 * 64 * 2/3 / 64) * 64
    mlp = ParallelMLP(config, init_method_normal(0.02), scaled_init_method_normal(0.02, 2))
    assert mlp.dense_h_to_4h.weight.shape == (256, 64)
    if bias:
        with torch.no_grad():
            mlp.dense_h_to_4h.bias.normal_()
            mlp.dense_4h_to_h.bias.normal_()
    else:
        assert mlp.dense_h_to_4h.bias is None and mlp.dense_4h_to_h.bias is None
    x = torch.randn(6, 2, 64)
    out, out_bias = mlp(x)
    w1, w2 = mlp.dense_h_to_4h.weight, mlp.dense_4h_to_h.weight
    gate, up = x @ w1[:128].t(), x @ w1[128:].t()
    if bias:
        gate, up = gate + mlp.dense_h_to_4h.bias[:128], up + mlp.dense_h_to_4h.bias[128:]
        out = out + out_bias
    ref = (gate * torch.sigmoid(gate) * up) @ w2.t()
    if bias:
        ref = ref + mlp.dense_4h_to_h.bias
    else:
        assert out_bias is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_swiglu_default_width():
    config = TransformerConfig(num_layers=1, hidden_size=4096, num_attention_heads=32, swiglu=True)
    assert config.ffn_hidden_size == 10880  # int(16384 * 2/3 / 64) * 64, Megatron-DeepSpeed's


def test_rmsnorm_matches_formula():
    norm = build_norm(tiny_config(normalization="rmsnorm", layernorm_epsilon=1e-6))
    assert isinstance(norm, RMSNorm) and norm.eps == 1e-6
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 2, 64) * 3
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)
    # an fp32 residual stream with bf16 weights gives bf16, like the layer norm
    out = rms_norm_reference(x, norm.weight.detach().bfloat16(), 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.detach(), atol=0.05, rtol=0.02)


def test_rmsnorm_sequence_parallel_marking():
    assert build_norm(
        tiny_config(normalization="rmsnorm", sequence_parallel=True)
    ).weight.sequence_parallel
    assert not RMSNorm(8).weight.sequence_parallel


# ----------------------------------------------------------------------------------------
# Untied output layer, no biases, no position embeddings
# ----------------------------------------------------------------------------------------


def test_llama_model_parameters_and_checkpoint_keys():
    model = GPTModel(tiny_config(**LLAMA))
    names = [n for n, _ in model.named_parameters()]
    assert "language_model.output_layer.weight" in names
    assert not any(n.endswith(".bias") for n in names), names
    assert not any("position_embeddings" in n for n in names)
    assert not model.share_word_embeddings
    nested = model.state_dict_for_save_checkpoint()["language_model"]
    assert sorted(nested) == ["embedding", "output_layer", "transformer"]
    assert list(nested["embedding"]) == ["word_embeddings"]
    fresh = GPTModel(tiny_config(**LLAMA, seed=99))
    fresh.load_state_dict(model.state_dict_for_save_checkpoint())
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_untied_head_with_the_embedding_copied_equals_tied():
    tokens, labels, position_ids = batch()
    tied = GPTModel(tiny_config(use_rotary_position_embeddings=True))
    untied = GPTModel(
        tiny_config(use_rotary_position_embeddings=True, untie_embeddings_and_output_weights=True)
    )
    embedding = untied.language_model.embedding.word_embeddings.weight
    assert not torch.equal(untied.language_model.output_layer.weight, embedding)
    with torch.no_grad():
        untied.language_model.output_layer.weight.copy_(embedding)
    a = tied(tokens, position_ids, causal_mask(), labels=labels)
    b = untied(tokens, position_ids, causal_mask(), labels=labels)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------

BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2"
)


@pytest.fixture
def _clean_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _validate(flags: str, world_size: int = 1):
    args = build_parser().parse_args(shlex.split(f"{BASE} {flags}"))
    return validate_args(args, world_size=world_size, rank=0)


def test_llama_flags_defaults_and_config(_clean_env):
    args = _validate("")
    assert (args.use_rotary_position_embeddings, args.rope_theta, args.rotary_percent) == (
        False,
        10000,
        1.0,
    )
    assert args.add_position_embedding and args.add_bias_linear and not args.swiglu
    assert args.normalization == "layernorm" and args.num_key_value_heads == 4
    assert not args.untie_embeddings_and_output_weights
    args = _validate(
        "--use-rotary-position-embeddings --rotary-position-embeddings-theta 500000 "
        "--rotary-percent 0.5 --swiglu --normalization rmsnorm --layernorm-epsilon 1e-6 "
        "--num-key-value-heads 2 --untie-embeddings-and-output-weights --disable-bias-linear"
    )
    assert args.ffn_hidden_size == 128 and not args.add_position_embedding
    config = config_from_args(args, padded_vocab_size=128)
    assert (config.rope_theta, config.rotary_percent, config.num_key_value_heads) == (
        500000,
        0.5,
        2,
    )
    assert config.swiglu and config.normalization == "rmsnorm" and config.layernorm_epsilon == 1e-6
    assert config.untie_embeddings_and_output_weights and not config.add_bias_linear
    assert not config.add_position_embedding
    assert not _validate("--no-position-embedding").add_position_embedding
    assert _validate("--swiglu --ffn-hidden-size 96").ffn_hidden_size == 96


@pytest.mark.parametrize(
    "flags, world_size, names",
    [
        ("--num-key-value-heads 3", 1, ["--num-attention-heads", "--num-key-value-heads"]),
        (
            "--num-key-value-heads 2 --tensor-model-parallel-size 4",
            4,
            ["--num-key-value-heads", "--tensor-model-parallel-size"],
        ),
        ("--use-rotary-position-embeddings --rotary-percent 0", 1, ["--rotary-percent"]),
        ("--use-rotary-position-embeddings --rotary-percent 1.5", 1, ["--rotary-percent"]),
        ("--rotary-percent 1.5", 1, ["--rotary-percent"]),
        ("--use-rotary-position-embeddings --rotary-percent 0.05", 1, ["--rotary-percent"]),
        (
            "--swiglu --ffn-hidden-size 130 --tensor-model-parallel-size 4",
            4,
            ["--swiglu", "--ffn-hidden-size"],
        ),
        ("--swiglu --hidden-size 16", 1, ["--swiglu", "--ffn-hidden-size"]),
    ],
)
def test_bad_llama_flags_are_one_line_errors(_clean_env, flags, world_size, names):
    with pytest.raises(ArgumentError) as err:
        _validate(flags, world_size=world_size)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message


# ----------------------------------------------------------------------------------------
# Parallel equals serial: TP=2 (plain, flash, sequence parallel, recompute, curriculum)
# and PP=2, on two gloo ranks
# ----------------------------------------------------------------------------------------

TP_VARIANTS = [
    ({}, None),
    ({"use_flash_attn": True}, None),
    ({"sequence_parallel": True}, None),
    ({"recompute_granularity": "full"}, None),
    ({"recompute_granularity": "selective"}, None),
    ({"sequence_parallel": True}, 16),  # curriculum: the first 16 tokens
]


def _loss_and_grads(model, data, curriculum_seqlen=None):
    tokens, labels, position_ids, mask = data
    loss = model(tokens, position_ids, mask, labels=labels, curriculum_seqlen=curriculum_seqlen)
    loss.mean().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _full_grad(param, grad, world_size):
    """The TP=1 view of a gradient: split weights gathered (a stride-s weight such as the
    fused SwiGLU gate/up holds s blocks per rank, joined block by block), sequence-parallel
    ones summed."""
    group = mpu.get_tensor_model_parallel_group()
    if getattr(param, "tensor_model_parallel", False):
        parts = [torch.empty_like(grad) for _ in range(world_size)]
        torch.distributed.all_gather(parts, grad.contiguous(), group=group)
        dim, stride = param.partition_dim, param.partition_stride
        blocks = [part.chunk(stride, dim=dim) for part in parts]
        return torch.cat([b[i] for i in range(stride) for b in blocks], dim=dim)
    if getattr(param, "sequence_parallel", False):
        total = grad.clone()
        torch.distributed.all_reduce(total, group=group)
        return total
    return grad


def _serial_reference(config, data, curriculum_seqlen):
    mpu.set_tensor_model_parallel_world_size(1)
    mpu.set_tensor_model_parallel_rank(0)
    try:
        mpu.model_parallel_cuda_manual_seed(1234)
        return _loss_and_grads(GPTModel(config), data, curriculum_seqlen)
    finally:
        mpu.clear_model_parallel_overrides()


def _check_tensor_parallel(world_size):
    mpu.initialize_model_parallel(world_size)
    tokens, labels, position_ids = batch(b=2)
    data = (tokens, labels, position_ids, causal_mask())
    refs = {}
    for overrides, curriculum in TP_VARIANTS:
        if curriculum not in refs:
            refs[curriculum] = _serial_reference(tiny_config(**LLAMA), data, curriculum)
        ref_loss, ref_grads = refs[curriculum]
        mpu.model_parallel_cuda_manual_seed(1234)
        model = GPTModel(tiny_config(**LLAMA, **overrides))
        attention = model.language_model.transformer.layers[0].self_attention
        assert attention.query_key_value.weight.shape == ((4 + 2 * 2) * 16 // world_size, 64)
        loss, grads = _loss_and_grads(model, data, curriculum)
        what = f"{overrides} curriculum {curriculum}"
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, msg=f"loss {what}")
        assert grads.keys() == ref_grads.keys()
        params = dict(model.named_parameters())
        for name, grad in grads.items():
            full = _full_grad(params[name], grad, world_size)
            torch.testing.assert_close(
                full, ref_grads[name], atol=1e-5, rtol=1e-4, msg=f"{name} {what}"
            )
    mpu.destroy_model_parallel()


def _pipeline_reference(config, data):
    mpu.set_pipeline_model_parallel_world_size(1)
    mpu.set_pipeline_model_parallel_rank(0)
    try:
        mpu.model_parallel_cuda_manual_seed(1234)
        model = GPTModel(config)
        loss, grads = _loss_and_grads(model, data)
        return loss, grads, dict(model.named_parameters())
    finally:
        mpu.clear_model_parallel_overrides()


def _check_pipeline_parallel(rank, world_size):
    """Two stages, activations and gradients passed by hand; nothing is tied between the
    first and the last stage (the embedding-group all-reduce of training.py skips it)."""
    from megatron.training import _allreduce_embedding_grads

    config = tiny_config(num_layers=4, **LLAMA)
    tokens, labels, position_ids = batch(b=2)
    mask = causal_mask()
    mpu.initialize_model_parallel(1, world_size)
    ref_loss, ref_grads, ref_params = _pipeline_reference(
        config, (tokens, labels, position_ids, mask)
    )
    mpu.model_parallel_cuda_manual_seed(1234)
    first = rank == 0
    model = GPTModel(config, pre_process=first, post_process=not first)
    assert not model.share_word_embeddings and not hasattr(model, "word_embeddings")
    if first:
        hidden = model(tokens, position_ids, mask)  # [s, b, h]
        torch.distributed.send(hidden.detach().contiguous(), dst=1)
        grad = torch.empty(32, 2, 64)
        torch.distributed.recv(grad, src=1)
        hidden.backward(grad)
    else:
        received = torch.empty(32, 2, 64, requires_grad=True)
        torch.distributed.recv(received.data, src=0)
        model.set_input_tensor(received)
        loss = model(None, position_ids, mask, labels=labels)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        loss.mean().backward()
        torch.distributed.send(received.grad.contiguous(), dst=0)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    _allreduce_embedding_grads([model])  # untied: no all-reduce, no hang
    offset = 0 if first else 2
    prefix = "language_model.transformer.layers."
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, before[name]), name
        ref_name = name
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            ref_name = f"{prefix}{int(index) + offset}.{rest}"
        assert torch.equal(param.detach(), ref_params[ref_name].detach()), name
        torch.testing.assert_close(param.grad, ref_grads[ref_name], atol=1e-5, rtol=1e-4)
    mpu.destroy_model_parallel()


def _check_all(rank, world_size):
    torch.set_num_threads(1)
    _check_tensor_parallel(world_size)
    _check_pipeline_parallel(rank, world_size)
    return True


def test_tiny_llama_tensor_and_pipeline_parallel_equal_serial():
    assert run_distributed(_check_all, world_size=2, timeout=240) == [True, True]
