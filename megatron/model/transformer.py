"""The Megatron transformer: tensor-parallel attention and MLP, layers, and the stack.

Layout: activations inside the transformer are [s, b, h] (sequence, batch, hidden)
throughout, as in Megatron; with sequence parallelism each tensor-parallel rank holds
[s/p, b, h] outside the attention and MLP blocks; with DeepSpeed-Ulysses
(--ds-sequence-parallel-size N) each rank holds [s/N, b, h] everywhere but inside the
core attention, which sees all s tokens of np/N heads (ulysses.py). Notation below:
p = tensor-parallel size, np = attention heads on this rank, ng = key/value heads on this
rank (grouped-query attention; ng = np for plain multi-head attention), hn = per-head
width, hp = np * hn.

Every layer takes a TransformerConfig; nothing here reads global arguments.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from megatron import mpu

from .config import TransformerConfig
from .enums import AttnMaskType, AttnType, LayerType
from .fused_bias_gelu import bias_gelu_impl
from .fused_layer_norm import MixedFusedLayerNorm as LayerNorm
from .fused_softmax import FusedScaleMaskSoftmax
from .kv_cache import LayerKVCache
from .module import MegatronModule
from .rmsnorm import RMSNorm
from .rotary_pos_embedding import RotaryEmbedding, apply_rotary_pos_emb, rotary_dim
from .utils import (
    attention_mask_func,
    compile_for_cuda,
    erf_gelu,
    fuse_pointwise,
    init_rng,
    jit_script,
    layer_init_salt,
    openai_gelu,
)


def _linear_kwargs(config: TransformerConfig) -> dict:
    return dict(config=config.parallel_config, bias=config.add_bias_linear)


def build_norm(config: TransformerConfig) -> torch.nn.Module:
    """The normalisation layer of config.normalization over h (LayerNorm or RMSNorm)."""
    if config.normalization == "rmsnorm":
        return RMSNorm(
            config.hidden_size,
            eps=config.layernorm_epsilon,
            sequence_parallel=config.sequence_parallel,
        )
    return LayerNorm(
        config.hidden_size,
        eps=config.layernorm_epsilon,
        sequence_parallel=config.sequence_parallel,
    )


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    """[gate, up] along the last dimension -> silu(gate) * up (half the width)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


swiglu = compile_for_cuda(_swiglu)  # eager on CPU, one fused kernel on CUDA


class ParallelMLP(MegatronModule):
    """h -> ffn -> h with GeLU: Y = gelu(X A + a) B + b, or with config.swiglu
    Y = (silu(X G + g) * (X U + u)) B + b.

    A [h, ffn] is split by columns (each rank computes its ffn/p features, no
    communication); B [ffn, h] by rows (partial products summed by an all-reduce, or a
    reduce-scatter under sequence parallelism). The output bias b is returned unadded so
    that it fuses into the bias-dropout-add that follows (None with --disable-bias-linear).

    SwiGLU: G and U are ONE column-parallel GEMM `dense_h_to_4h` of width 2 ffn. Its TP=1
    weight is [G^T; U^T] ([2 ffn, h]: the ffn gate rows, then the ffn up rows); it is
    split with partition_stride 2, so rank r holds [G_r^T; U_r^T] ([2 ffn/p, h]: its
    ffn/p gate rows, then the same ffn/p up rows) and computes silu(X G_r) * (X U_r)
    locally, the input of its rows B_r of B. Reshaping a checkpoint across TP sizes must
    therefore split (or join) each shard in two halves along dim 0 and concatenate the
    gate halves and the up halves separately (partition_stride 2 marks this), not split
    the weight into p contiguous blocks.
    """

    def __init__(
        self, config: TransformerConfig, init_method: Callable, output_layer_init_method: Callable
    ) -> None:
        super().__init__()
        self.swiglu = config.swiglu
        self.dense_h_to_4h = mpu.ColumnParallelLinear(
            config.hidden_size,
            2 * config.ffn_hidden_size if self.swiglu else config.ffn_hidden_size,
            gather_output=False,
            init_method=init_method,
            stride=2 if self.swiglu else 1,
            skip_bias_add=True,
            **_linear_kwargs(config),
        )
        self.bias_gelu_fusion = config.bias_gelu_fusion and not self.swiglu
        self.activation_func = F.gelu
        if self.swiglu:
            self.activation_func = swiglu
        elif config.openai_gelu:
            self.activation_func = openai_gelu
        elif config.onnx_safe:
            self.activation_func = erf_gelu
        self.dense_4h_to_h = mpu.RowParallelLinear(
            config.ffn_hidden_size,
            config.hidden_size,
            input_is_parallel=True,
            init_method=output_layer_init_method,
            skip_bias_add=True,
            **_linear_kwargs(config),
        )

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | None]:
        # hidden_states: [s, b, h] -> intermediate [s, b, ffn/p] ([s, b, 2 ffn/p] SwiGLU)
        intermediate_parallel, bias_parallel = self.dense_h_to_4h(hidden_states)
        if bias_parallel is None:
            intermediate_parallel = self.activation_func(intermediate_parallel)
        elif self.bias_gelu_fusion:
            intermediate_parallel = bias_gelu_impl(intermediate_parallel, bias_parallel)
        else:
            intermediate_parallel = self.activation_func(intermediate_parallel + bias_parallel)
        output, output_bias = self.dense_4h_to_h(intermediate_parallel)  # [s, b, h]
        return output, output_bias


_CAUSAL_CACHE: dict = {}
_SDPA_GQA: dict = {}


def sdpa_supports_gqa() -> bool:
    """Whether this torch's scaled_dot_product_attention takes enable_gqa (torch >= 2.5)."""
    if "ok" not in _SDPA_GQA:
        q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
        try:
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
            _SDPA_GQA["ok"] = True
        except TypeError:
            _SDPA_GQA["ok"] = False
    return _SDPA_GQA["ok"]


def is_plain_causal_mask(attention_mask: torch.Tensor | None) -> bool:
    """True when `attention_mask` ([.., s, s], True = masked) masks exactly the keys after
    each query for every batch entry (or is None), so is_causal attention may replace it.
    A custom mask (e.g. --reset-attention-mask) gives False."""
    if attention_mask is None:
        return True
    s_q, s_k = attention_mask.shape[-2:]
    if s_q != s_k:
        return False
    key = (s_q, attention_mask.device)
    causal = _CAUSAL_CACHE.get(key)
    if causal is None:
        causal = torch.ones(s_q, s_k, dtype=torch.bool, device=attention_mask.device).triu_(1)
        _CAUSAL_CACHE.clear()
        _CAUSAL_CACHE[key] = causal
    return bool((attention_mask.bool() == causal).all())


class ParallelAttention(MegatronModule):
    """Multi-head (or grouped-query) attention over heads split across tensor-parallel
    ranks.

    Self-attention projects [s, b, h] with one column-parallel `query_key_value` whose
    output is grouped per key/value head: with N heads, G key/value heads and r = N / G
    query heads per group, its [(N + 2 G) hn, h] weight is G blocks of (r + 2) hn rows,

        [q heads g r .. g r + r - 1, k_g, v_g]   for g = 0 .. G - 1,

    and query head j attends with key/value head j // r. With G = N (plain multi-head
    attention) this is Megatron's per-head [q, k, v] layout, so existing checkpoints load
    as they are. This layout (rather than separate q | k | v blocks) is chosen because a
    contiguous split of the rows gives each of the p ranks G/p whole groups, its query
    heads with their own keys and values: no strided split, the same rule as the other
    column-parallel weights, and TP reshaping of a checkpoint is a plain split or concat
    along dim 0 (separate q | k | v blocks would need a three-way strided split with
    blocks of two sizes). It is also Megatron-Core's GQA layout.

    With RoPE (config.use_rotary_position_embeddings) q and k are rotated by their
    positions right after the split, before the key/value cache is joined: positions
    start at the number of cached positions. Cross-attention (T5 decoder) uses `query` on
    the input and `key_value` on the encoder output (no GQA, no RoPE). Core attention:

        scores = Q K^T / sqrt(hn),  probs = dropout(softmax(mask(scores))),  ctx = probs V

    either with baddbmm and FusedScaleMaskSoftmax (with apply_query_key_layer_scaling the
    scores are divided by layer_number more and the softmax multiplies them back, which
    keeps fp16 in range and is exact in fp32), or with config.use_flash_attn through
    torch's scaled_dot_product_attention. For grouped-query attention the math path
    repeats each key/value head r times; the flash path passes enable_gqa=True where this
    torch has it, so K and V are never materialised repeated. The row-parallel `dense`
    projects back to h.
    """

    def __init__(
        self,
        config: TransformerConfig,
        init_method: Callable,
        output_layer_init_method: Callable,
        layer_number: int,
        attention_type: AttnType = AttnType.self_attn,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
    ) -> None:
        super().__init__()
        self.fp16, self.bf16 = config.fp16, config.bf16
        self.layer_number = max(1, layer_number)
        self.attention_type = attention_type
        self.attn_mask_type = attn_mask_type
        self.use_flash_attn = config.use_flash_attn
        # selective recompute; flash attention stores no [sq, sk] tensors to begin with
        self.recompute_core_attention = config.recompute_granularity == "selective"
        self.sequence_parallel = config.sequence_parallel
        self.attention_dropout_p = config.attention_dropout
        projection_size = config.kv_channels * config.num_attention_heads
        kv_projection_size = config.kv_channels * config.num_key_value_heads
        world_size = mpu.get_tensor_model_parallel_world_size()
        self.hidden_size_per_partition = mpu.divide(projection_size, world_size)
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = mpu.divide(config.num_attention_heads, world_size)
        self.num_key_value_heads_per_partition = mpu.divide(config.num_key_value_heads, world_size)
        self.num_query_groups = mpu.divide(config.num_attention_heads, config.num_key_value_heads)
        # DeepSpeed-Ulysses: this rank holds s/N tokens; core attention runs on all tokens
        # of n/N heads between two all-to-alls (ulysses.py)
        self.ulysses = None
        if mpu.get_sequence_parallel_world_size() > 1:
            if attention_type != AttnType.self_attn or attn_mask_type != AttnMaskType.causal:
                raise ValueError(
                    "megatron/model/transformer.py: --ds-sequence-parallel-size > 1 supports "
                    "causal self-attention (GPT) only"
                )
            from .ulysses import UlyssesAttention

            self.ulysses = UlyssesAttention(mpu.get_sequence_parallel_group())
        self.rotary_emb = None
        if config.use_rotary_position_embeddings and attention_type == AttnType.self_attn:
            self.rotary_emb = RotaryEmbedding(
                rotary_dim(config.kv_channels, config.rotary_percent), config.rope_theta
            )
        common = dict(
            gather_output=False,
            init_method=init_method,
            **_linear_kwargs(config),
        )
        if attention_type == AttnType.self_attn:
            self.query_key_value = mpu.ColumnParallelLinear(
                config.hidden_size, projection_size + 2 * kv_projection_size, **common
            )
        else:
            self.query = mpu.ColumnParallelLinear(config.hidden_size, projection_size, **common)
            self.key_value = mpu.ColumnParallelLinear(
                config.hidden_size, 2 * projection_size, **common
            )

        coeff = None
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head)
        softmax_in_fp32 = config.attention_softmax_in_fp32
        if config.apply_query_key_layer_scaling:
            coeff = self.layer_number
            self.norm_factor *= coeff
            softmax_in_fp32 = True
        self.scale_mask_softmax = FusedScaleMaskSoftmax(
            self.fp16,
            self.bf16,
            self.attn_mask_type,
            config.masked_softmax_fusion,
            attention_mask_func,
            softmax_in_fp32,
            coeff,
        )
        self.attention_dropout = torch.nn.Dropout(config.attention_dropout)
        self.dense = mpu.RowParallelLinear(
            projection_size,
            config.hidden_size,
            input_is_parallel=True,
            init_method=output_layer_init_method,
            skip_bias_add=True,
            **_linear_kwargs(config),
        )

    def _dropout_rng(self, active: bool):
        """Attention-probability dropout draws from the tracker's per-rank stream (each
        rank holds other heads); under sequence parallelism the whole layer already runs
        inside that stream (ParallelTransformer.forward)."""
        if active and not self.sequence_parallel:
            return mpu.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _project(self, hidden_states, encoder_output):
        """q [sq, b, np, hn], k and v [sk, b, ng, hn] (ng = np for cross-attention)."""
        np_, hn = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        if self.attention_type == AttnType.self_attn:
            ng, r = self.num_key_value_heads_per_partition, self.num_query_groups
            mixed_x_layer, _ = self.query_key_value(hidden_states)  # [sq, b, ng * (r+2) * hn]
            sq, b = mixed_x_layer.shape[:2]
            mixed_x_layer = mixed_x_layer.view(sq, b, ng, (r + 2) * hn)
            query_layer, key_layer, value_layer = torch.split(
                mixed_x_layer, [r * hn, hn, hn], dim=-1
            )  # [sq, b, ng, r * hn], [sq, b, ng, hn], [sq, b, ng, hn]
            query_layer = query_layer.reshape(sq, b, np_, hn)  # heads g r .. g r + r - 1
            return query_layer, key_layer, value_layer
        mixed_kv_layer, _ = self.key_value(encoder_output)  # [sk, b, np * 2 * hn]
        mixed_kv_layer = mixed_kv_layer.view(*mixed_kv_layer.shape[:-1], np_, 2 * hn)
        key_layer, value_layer = torch.split(mixed_kv_layer, hn, dim=-1)
        query_layer, _ = self.query(hidden_states)  # [sq, b, np * hn]
        query_layer = query_layer.view(*query_layer.shape[:-1], np_, hn)
        return query_layer, key_layer, value_layer

    def _repeat_kv(self, layer: torch.Tensor) -> torch.Tensor:
        """[sk, b, ng, hn] -> [sk, b, np, hn]: head j gets key/value head j // r."""
        r = self.num_query_groups
        if r == 1:
            return layer
        sk, b, ng, hn = layer.shape
        return layer[:, :, :, None, :].expand(sk, b, ng, r, hn).reshape(sk, b, ng * r, hn)

    def core_attention(self, query_layer, key_layer, value_layer, attention_mask):
        """Scores by baddbmm, FusedScaleMaskSoftmax, dropout, probs @ V -> [sq, b, hp]."""
        key_layer, value_layer = self._repeat_kv(key_layer), self._repeat_kv(value_layer)
        sq, b, np_, hn = query_layer.shape
        sk = key_layer.size(0)
        query_layer = query_layer.reshape(sq, b * np_, hn)
        key_layer = key_layer.reshape(sk, b * np_, hn)
        matmul_result = torch.empty(
            b * np_, sq, sk, dtype=query_layer.dtype, device=query_layer.device
        )
        matmul_result = torch.baddbmm(
            matmul_result,
            query_layer.transpose(0, 1),  # [b * np, sq, hn]
            key_layer.transpose(0, 1).transpose(1, 2),  # [b * np, hn, sk]
            beta=0.0,
            alpha=1.0 / self.norm_factor,
        )
        attention_scores = matmul_result.view(b, np_, sq, sk)
        attention_probs = self.scale_mask_softmax(attention_scores, attention_mask)
        with self._dropout_rng(self.training and self.attention_dropout_p > 0):
            attention_probs = self.attention_dropout(attention_probs)
        value_layer = value_layer.reshape(sk, b * np_, hn)
        attention_probs = attention_probs.view(b * np_, sq, sk)
        context_layer = torch.bmm(attention_probs, value_layer.transpose(0, 1))  # [b*np, sq, hn]
        context_layer = context_layer.view(b, np_, sq, hn).permute(2, 0, 1, 3).contiguous()
        return context_layer.view(sq, b, np_ * hn)  # [sq, b, hp]

    def _checkpointed_core_attention(self, query_layer, key_layer, value_layer, attention_mask):
        """Selective recompute: core_attention whose [b, np, sq, sk] scores, probabilities
        and dropout mask are recomputed in the backward instead of stored (the same dropout
        mask is drawn again); only q, k, v and the mask are kept."""

        def forward(q, k, v, *mask):
            return self.core_attention(q, k, v, mask[0] if mask else None)

        mask = () if attention_mask is None else (attention_mask,)
        # Megatron's own checkpoint function, also under --deepspeed-activation-checkpointing
        # (it then saves and restores DeepSpeed's RNG tracker), as Megatron-DeepSpeed does:
        # DeepSpeed's with partition_activations gives other gradients than the stored run
        # here (tests/unit/model/test_moe_recompute.py).
        return mpu.random.CheckpointFunction.apply(
            forward, False, query_layer, key_layer, value_layer, *mask
        )

    def flash_attention(
        self, query_layer, key_layer, value_layer, attention_mask, attention_mask_is_causal
    ):
        """The same attention through scaled_dot_product_attention -> [sq, b, hp]."""
        sq, b, np_, hn = query_layer.shape
        sk = key_layer.size(0)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        mask, is_causal = None, False
        if self.attn_mask_type == AttnMaskType.causal and sq == sk:
            if attention_mask_is_causal is None:
                attention_mask_is_causal = is_plain_causal_mask(attention_mask)
            is_causal = attention_mask_is_causal
        if not is_causal and attention_mask is not None:
            mask = ~attention_mask.bool()  # SDPA: True = attend
        dropout_p = self.attention_dropout_p if self.training else 0.0
        gqa = {}
        if self.num_query_groups > 1:
            if sdpa_supports_gqa():
                gqa = {"enable_gqa": True}  # query head j uses key/value head j // r
            else:
                k, v = (t.repeat_interleave(self.num_query_groups, dim=1) for t in (k, v))
        with self._dropout_rng(dropout_p > 0):
            context = F.scaled_dot_product_attention(
                q,  # [b, np, sq, hn]
                k,  # [b, ng, sk, hn]
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=1.0 / math.sqrt(hn),
                **gqa,
            )
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # [sq, b, hp]

    def _rotate(self, query_layer, key_layer, offset: int):
        """RoPE on q and k [s, b, n, hn] at positions offset .. offset + s - 1."""
        cos, sin = self.rotary_emb(
            query_layer.size(0), offset, device=query_layer.device, dtype=query_layer.dtype
        )  # [s, 1, 1, rotary dim]
        query_layer = apply_rotary_pos_emb(query_layer, cos, sin)
        return query_layer, apply_rotary_pos_emb(key_layer, cos, sin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layer_past: Tuple[torch.Tensor, torch.Tensor] | None = None,
        get_key_value: bool = False,
        encoder_output: torch.Tensor | None = None,
        attention_mask_is_causal: bool | None = None,
    ):
        """hidden_states [sq, b, h] -> (output [sq, b, h], dense bias [h]).

        With get_key_value the first element is [output, (key, value)], key and value
        [sk, b, ng, hn] including `layer_past` (incremental generation; with RoPE the
        cached keys are stored rotated).
        `attention_mask_is_causal` (flash path) saves re-checking the mask per layer.
        """
        if self.ulysses is not None and (layer_past is not None or get_key_value):
            raise ValueError(
                "megatron/model/transformer.py: key/value caches (generation) are not "
                "supported with --ds-sequence-parallel-size > 1"
            )
        if isinstance(layer_past, LayerKVCache):
            output, bias = self._forward_with_cache(hidden_states, layer_past)
            return ([output, layer_past] if get_key_value else output), bias
        query_layer, key_layer, value_layer = self._project(hidden_states, encoder_output)
        if self.rotary_emb is not None:
            offset = 0 if layer_past is None else layer_past[0].size(0)
            if self.ulysses is not None:  # this rank's tokens start at rank * s/N
                offset = mpu.get_sequence_parallel_rank() * query_layer.size(0)
            query_layer, key_layer = self._rotate(query_layer, key_layer, offset)
        if layer_past is not None:
            past_key, past_value = layer_past
            key_layer = torch.cat((past_key.type_as(key_layer), key_layer), dim=0)
            value_layer = torch.cat((past_value.type_as(value_layer), value_layer), dim=0)
        present = (key_layer, value_layer) if get_key_value else None
        if get_key_value and attention_mask is not None:
            sq, sk = query_layer.size(0), key_layer.size(0)
            with torch.no_grad():  # the new queries are the last sq of the sk positions
                attention_mask = attention_mask[..., sk - sq : sk, :sk]
            attention_mask_is_causal = None
        if self.ulysses is not None:
            context_layer = self.ulysses(
                self._attend, query_layer, key_layer, value_layer, attention_mask,
                attention_mask_is_causal,
            )  # [s/N, b, hp]: all-to-all, attention over all s tokens of n/N heads, back
        else:
            context_layer = self._attend(
                query_layer, key_layer, value_layer, attention_mask, attention_mask_is_causal
            )
        output, bias = self.dense(context_layer)  # [sq, b, h]
        if get_key_value:
            output = [output, present]
        return output, bias

    def _attend(self, query_layer, key_layer, value_layer, attention_mask, mask_is_causal):
        """Core attention by the configured path (flash, selective recompute or plain)
        -> [sq, b, hp]."""
        if self.use_flash_attn:
            return self.flash_attention(
                query_layer, key_layer, value_layer, attention_mask, mask_is_causal
            )
        if self.recompute_core_attention and self.training:
            return self._checkpointed_core_attention(
                query_layer, key_layer, value_layer, attention_mask
            )
        return self.core_attention(query_layer, key_layer, value_layer, attention_mask)


    def _forward_with_cache(self, hidden_states: torch.Tensor, cache: LayerKVCache):
        """Self-attention of the new positions hidden_states [sq, b, h] over the cached
        ones and themselves, writing their keys and values into `cache` (kv_cache.py):
        appended at cache.filled (a prompt's causal mask once, no mask for one token), or
        for a fixed-shape step at the device position cache.owner.position, attending to
        the whole buffer under its decode mask. -> (output [sq, b, h], dense bias [h])."""
        query_layer, key_layer, value_layer = self._project(hidden_states, None)
        sq = query_layer.size(0)
        fixed = cache.owner.position is not None
        if self.rotary_emb is not None:
            if fixed:
                cos, sin = self.rotary_emb.at(
                    cache.owner.position, cache.owner.max_len, dtype=query_layer.dtype
                )  # [1, 1, 1, rotary dim]
            else:
                cos, sin = self.rotary_emb(
                    sq, cache.filled, device=query_layer.device, dtype=query_layer.dtype
                )
            query_layer = apply_rotary_pos_emb(query_layer, cos, sin)
            key_layer = apply_rotary_pos_emb(key_layer, cos, sin)
        mask, is_causal = None, None
        if fixed:
            key_layer, value_layer = cache.write_at(key_layer, value_layer)  # [max_len, ...]
            mask, is_causal = cache.owner.decode_mask, False
        else:
            offset = cache.filled
            key_layer, value_layer = cache.append(key_layer, value_layer)  # [sk, b, ng, hn]
            if sq > 1:  # query i (position offset + i) sees keys 0 .. offset + i
                sk = key_layer.size(0)
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query_layer.device)
                mask = mask.triu_(offset + 1).view(1, 1, sq, sk)  # True = masked
                is_causal = offset == 0 or None
        if self.use_flash_attn:
            context_layer = self.flash_attention(
                query_layer, key_layer, value_layer, mask, is_causal
            )
        else:
            context_layer = self.core_attention(query_layer, key_layer, value_layer, mask)
        return self.dense(context_layer)  # [sq, b, h]


def bias_dropout_add(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    """residual + dropout(x + bias)."""
    out = F.dropout(x + bias, p=prob, training=training)
    return residual + out


def get_bias_dropout_add(training: bool) -> Callable:
    """The unfused bias-dropout-add with `training` bound."""

    def _bias_dropout_add(x, bias, residual, prob):
        return bias_dropout_add(x, bias, residual, prob, training)

    return _bias_dropout_add


def _bias_dropout_add_fused_train(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, prob: float
) -> torch.Tensor:
    return bias_dropout_add(x, bias, residual, prob, True)


def _bias_dropout_add_fused_inference(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, prob: float
) -> torch.Tensor:
    return bias_dropout_add(x, bias, residual, prob, False)


bias_dropout_add_fused_train = jit_script(_bias_dropout_add_fused_train)
bias_dropout_add_fused_inference = fuse_pointwise(_bias_dropout_add_fused_inference)


class ParallelTransformerLayer(MegatronModule):
    """One pre-LN transformer layer: x [s, b, h] ->

        a = x + dropout(attention(LN1(x)))        (residual from LN1(x) with
        y = a + dropout(mlp(LN2(a)))               apply_residual_connection_post_layernorm)

    with cross-attention on the encoder output between the two for decoder layers. LN
    is a layer norm or, with config.normalization 'rmsnorm', an RMSNorm; without biases
    (--disable-bias-linear) the bias-dropout-adds become residual + dropout(x).
    """

    def __init__(
        self,
        config: TransformerConfig,
        init_method: Callable,
        output_layer_init_method: Callable,
        layer_number: int,
        layer_type: LayerType = LayerType.encoder,
        self_attn_mask_type: AttnMaskType = AttnMaskType.padding,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.layer_type = layer_type
        self.apply_residual_connection_post_layernorm = (
            config.apply_residual_connection_post_layernorm
        )
        self.bias_dropout_fusion = config.bias_dropout_fusion
        self.hidden_dropout = config.hidden_dropout

        def norm():
            return build_norm(config)

        self.input_layernorm = norm()
        self.self_attention = ParallelAttention(
            config,
            init_method,
            output_layer_init_method,
            layer_number,
            attention_type=AttnType.self_attn,
            attn_mask_type=self_attn_mask_type,
        )
        self.post_attention_layernorm = norm()
        if layer_type == LayerType.decoder:
            self.inter_attention = ParallelAttention(
                config,
                init_method,
                output_layer_init_method,
                layer_number,
                attention_type=AttnType.cross_attn,
            )
            self.post_inter_attention_layernorm = norm()
        num_experts = 1
        if max(config.num_experts or [1]) > 1 and layer_type == LayerType.encoder:
            from .moe import build_moe_mlp, num_experts_for_layer  # DeepSpeed MoE

            num_experts = num_experts_for_layer(config, layer_number)
        if num_experts > 1:
            self.mlp = build_moe_mlp(config, init_method, output_layer_init_method, num_experts)
        else:
            self.mlp = ParallelMLP(config, init_method, output_layer_init_method)

    def _bias_dropout_add_func(self) -> Callable:
        if self.bias_dropout_fusion:
            if self.training and self.hidden_dropout > 0.0:
                return bias_dropout_add_fused_train
            # no dropout to draw: the randomness-free variant, which compiles on GPU
            return bias_dropout_add_fused_inference
        return get_bias_dropout_add(self.training)

    def _add_output(self, func: Callable, output, bias, residual) -> torch.Tensor:
        """residual + dropout(output + bias); without a bias (--disable-bias-linear)
        residual + dropout(output)."""
        if bias is None:
            return residual + F.dropout(output, p=self.hidden_dropout, training=self.training)
        return func(output, bias.expand_as(residual), residual, self.hidden_dropout)

    def _residual(self, layernorm_output, layernorm_input):
        if self.apply_residual_connection_post_layernorm:
            return layernorm_output
        return layernorm_input

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_output: torch.Tensor | None = None,
        enc_dec_attn_mask: torch.Tensor | None = None,
        layer_past=None,
        get_key_value: bool = False,
        attention_mask_is_causal: bool | None = None,
    ):
        """hidden_states [s, b, h] -> [s, b, h] (and presents with get_key_value)."""
        bias_dropout_add_func = self._bias_dropout_add_func()
        layernorm_output = self.input_layernorm(hidden_states)
        attention_output, attention_bias = self.self_attention(
            layernorm_output,
            attention_mask,
            layer_past=layer_past,
            get_key_value=get_key_value,
            attention_mask_is_causal=attention_mask_is_causal,
        )
        if get_key_value:
            attention_output, presents = attention_output
        residual = self._residual(layernorm_output, hidden_states)
        layernorm_input = self._add_output(
            bias_dropout_add_func, attention_output, attention_bias, residual
        )
        layernorm_output = self.post_attention_layernorm(layernorm_input)

        if self.layer_type == LayerType.decoder:
            attention_output, attention_bias = self.inter_attention(
                layernorm_output, enc_dec_attn_mask, encoder_output=encoder_output
            )
            residual = self._residual(layernorm_output, layernorm_input)
            layernorm_input = self._add_output(
                bias_dropout_add_func, attention_output, attention_bias, residual
            )
            layernorm_output = self.post_inter_attention_layernorm(layernorm_input)

        mlp_output, mlp_bias = self.mlp(layernorm_output)
        residual = self._residual(layernorm_output, layernorm_input)
        output = self._add_output(bias_dropout_add_func, mlp_output, mlp_bias, residual)
        if get_key_value:
            output = [output, presents]
        return output


def _layers_on_this_stage(config: TransformerConfig) -> Tuple[int, int]:
    """(number of layers of this model chunk, global index of its first layer).

    Stage r of p holds layers [r L/p, (r+1) L/p); with v virtual chunks per stage
    (interleaved schedule) chunk c of stage r holds L/(p v) layers starting at
    c L/v + r L/(p v), Megatron's assignment.
    """
    pp_size = mpu.get_pipeline_model_parallel_world_size()
    if config.num_layers % pp_size != 0:
        raise ValueError(
            f"--num-layers ({config.num_layers}) is not divisible by "
            f"--pipeline-model-parallel-size ({pp_size})"
        )
    num_layers = config.num_layers // pp_size
    pp_rank = mpu.get_pipeline_model_parallel_rank()
    vpp_size = mpu.get_virtual_pipeline_model_parallel_world_size()
    if vpp_size is None:
        return num_layers, pp_rank * num_layers
    if num_layers % vpp_size != 0:
        raise ValueError(
            f"layers per pipeline stage ({num_layers}) are not divisible by "
            f"--num-layers-per-virtual-pipeline-stage chunks ({vpp_size})"
        )
    num_layers //= vpp_size
    vpp_rank = mpu.get_virtual_pipeline_model_parallel_rank() or 0
    offset = vpp_rank * (config.num_layers // vpp_size) + pp_rank * num_layers
    return num_layers, offset


class ParallelTransformer(MegatronModule):
    """The layers of this pipeline stage (or virtual chunk), plus the final layer norm on
    the last stage.

    Layer `offset + i + 1` (global, 1-based) is built under init_rng(config.seed, its
    salt): its initial weights are the same whichever stage builds it. With
    pre_process False the input comes from set_input_tensor() (pipeline receive).
    """

    def __init__(
        self,
        config: TransformerConfig,
        init_method: Callable,
        output_layer_init_method: Callable,
        layer_type: LayerType = LayerType.encoder,
        self_attn_mask_type: AttnMaskType = AttnMaskType.padding,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__()
        self.pre_process = pre_process
        self.post_process = post_process
        self.input_tensor = None
        self.self_attn_mask_type = self_attn_mask_type
        self.fp32_residual_connection = config.fp32_residual_connection
        self.use_flash_attn = config.use_flash_attn
        self.sequence_parallel = config.sequence_parallel
        self.recompute_full = config.recompute_granularity == "full"
        self.recompute_method = config.recompute_method
        self.recompute_num_layers = config.recompute_num_layers
        self.distribute_saved_activations = config.distribute_saved_activations
        self.has_moe = max(config.num_experts or [1]) > 1
        self.num_layers, offset = _layers_on_this_stage(config)
        decoder = layer_type == LayerType.decoder

        def build_layer(layer_number: int) -> ParallelTransformerLayer:
            with init_rng(config.seed, layer_init_salt(layer_number, decoder)):
                return ParallelTransformerLayer(
                    config,
                    init_method,
                    output_layer_init_method,
                    layer_number,
                    layer_type=layer_type,
                    self_attn_mask_type=self_attn_mask_type,
                )

        self.layers = torch.nn.ModuleList(
            [build_layer(i + 1 + offset) for i in range(self.num_layers)]
        )
        if self.post_process:
            self.final_layernorm = build_norm(config)

    def _get_layer(self, layer_number: int) -> ParallelTransformerLayer:
        return self.layers[layer_number]

    def set_input_tensor(self, input_tensor: torch.Tensor | None) -> None:
        """The activation received from the previous pipeline stage."""
        self.input_tensor = input_tensor

    def _moe_mlps(self, start: int, end: int) -> List[torch.nn.Module]:
        """The MoE MLPs of layers [start, end) of this chunk, in order."""
        if not self.has_moe:
            return []
        from .moe import MoEMLP

        mlps = [self._get_layer(index).mlp for index in range(start, end)]
        return [mlp for mlp in mlps if isinstance(mlp, MoEMLP)]

    def _recompute_chunks(self) -> List[Tuple[int, int, bool]]:
        """(start, end, recomputed) layer ranges of this stage: uniform recomputes chunks of
        recompute_num_layers layers; block recomputes each of the first recompute_num_layers
        layers alone and stores the activations of the others."""
        n, k = self.num_layers, self.recompute_num_layers
        if self.recompute_method == "block":
            return [(i, i + 1, i < k) for i in range(n)]
        return [(start, min(start + k, n), True) for start in range(0, n, k)]

    def _checkpointed_forward(
        self, hidden_states, attention_mask, encoder_output, enc_dec_attn_mask, is_causal
    ):
        """Run the layers by _recompute_chunks, the recomputed ones through mpu.checkpoint.

        Only tensors go through the checkpoint function (DeepSpeed's partitioned
        checkpointing cannot carry None arguments); absent inputs are closed over.

        A chunk holding MoE layers returns (hidden, l_aux_1, ..., l_aux_m): each layer's
        auxiliary loss is an output of the checkpoint function, so the loss's gradient
        with respect to it flows back through the recompute together with the hidden
        states' gradient. The layers' `l_aux` are then set to those outputs (the forward
        ran under no_grad, and the recompute must not replace them)."""
        extras = (attention_mask, encoder_output, enc_dec_attn_mask)
        given = [i for i, t in enumerate(extras) if t is not None]

        def custom(start: int, end: int, moe_mlps: List[torch.nn.Module]):
            def custom_forward(x_, *tensors):
                inputs = [None, None, None]
                for i, t in zip(given, tensors):
                    inputs[i] = t
                kept = [mlp.l_aux for mlp in moe_mlps]
                for index in range(start, end):
                    x_ = self._get_layer(index)(
                        x_,
                        inputs[0],
                        encoder_output=inputs[1],
                        enc_dec_attn_mask=inputs[2],
                        attention_mask_is_causal=is_causal,
                    )
                if not moe_mlps:
                    return x_
                losses = [mlp.l_aux for mlp in moe_mlps]
                for mlp, loss in zip(moe_mlps, kept):
                    mlp.l_aux = loss
                return (x_, *losses)

            return custom_forward

        for start, end, recomputed in self._recompute_chunks():
            if not recomputed:
                hidden_states = custom(start, end, [])(hidden_states, *[extras[i] for i in given])
                continue
            moe_mlps = self._moe_mlps(start, end)
            outputs = mpu.checkpoint(
                custom(start, end, moe_mlps),
                self.distribute_saved_activations,
                hidden_states,
                *[extras[i] for i in given],
            )
            if moe_mlps:
                hidden_states, *losses = outputs
                for mlp, loss in zip(moe_mlps, losses):
                    mlp.l_aux = loss  # part of the autograd graph through the checkpoint
            else:
                hidden_states = outputs
        return hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        layer_past: List | None = None,
        get_key_value: bool = False,
        encoder_output: torch.Tensor | None = None,
        enc_dec_attn_mask: torch.Tensor | None = None,
    ):
        """hidden_states [s, b, h] (ignored unless pre_process) -> [s, b, h]."""
        if layer_past is not None and not get_key_value:
            raise ValueError("ParallelTransformer: layer_past needs get_key_value=True")
        if get_key_value and self.recompute_full and self.training:
            raise ValueError("ParallelTransformer: get_key_value is not supported with recompute")
        if not self.pre_process:
            hidden_states = self.input_tensor
        elif self.fp32_residual_connection:
            hidden_states = hidden_states.float()

        is_causal = None
        if self.use_flash_attn and self.self_attn_mask_type == AttnMaskType.causal:
            is_causal = is_plain_causal_mask(attention_mask)  # checked once, not per layer
        presents = []
        # Under sequence parallelism each rank holds other tokens: hidden dropout draws
        # from the per-rank stream (attention dropout then does not fork again).
        rng_context = contextlib.nullcontext()
        if self.sequence_parallel and self.training:
            rng_context = mpu.get_cuda_rng_tracker().fork()
        with rng_context:
            if self.recompute_full and self.training:
                hidden_states = self._checkpointed_forward(
                    hidden_states, attention_mask, encoder_output, enc_dec_attn_mask, is_causal
                )
            else:
                for index in range(self.num_layers):
                    hidden_states = self._get_layer(index)(
                        hidden_states,
                        attention_mask,
                        encoder_output=encoder_output,
                        enc_dec_attn_mask=enc_dec_attn_mask,
                        layer_past=layer_past[index] if layer_past is not None else None,
                        get_key_value=get_key_value,
                        attention_mask_is_causal=is_causal,
                    )
                    if get_key_value:
                        hidden_states, present = hidden_states
                        presents.append(present)

        if self.post_process:
            hidden_states = self.final_layernorm(hidden_states)
        if get_key_value:
            return [hidden_states, presents]
        return hidden_states
