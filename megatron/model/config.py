"""The transformer configuration: built once from args, passed down to every layer.

Layers never call get_args(); they read this dataclass. `config_from_args(args)` is the
single place where flags become model configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from megatron.arguments import ffn_hidden_size as _ffn_hidden_size
from megatron.arguments import swiglu_ffn_hidden_size
from megatron.mpu.layers import ParallelConfig


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """4h, or with SwiGLU int(4h * 2/3 / 64) * 64 (Megatron-DeepSpeed's rounding)."""
    return swiglu_ffn_hidden_size(hidden_size) if swiglu else _ffn_hidden_size(hidden_size)


@dataclass
class TransformerConfig:
    """Shape, regularisation, precision and parallel layout of a Megatron transformer."""

    num_layers: int
    """Number of transformer layers in the whole model (all pipeline stages)."""
    hidden_size: int
    """Width h of the residual stream."""
    num_attention_heads: int
    """Attention heads in the whole model (split across tensor-parallel ranks)."""
    padded_vocab_size: int = 0
    """Vocabulary size padded to a multiple of make-vocab-size-divisible-by x TP."""
    max_position_embeddings: int = 0
    """Number of learned position embeddings (>= seq length)."""
    ffn_hidden_size: int | None = None
    """MLP inner width; 4h when None."""
    kv_channels: int | None = None
    """Per-head projection width; h / heads when None."""
    hidden_dropout: float = 0.1
    """Dropout after attention / MLP output projections and on embeddings."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    init_method_std: float = 0.02
    """Std of the normal initialisation; output layers are scaled by 1/sqrt(2 * layers)."""
    init_method_xavier_uniform: bool = False
    """Xavier-uniform initialisation of every weight instead (--init-method-xavier-uniform)."""
    apply_residual_connection_post_layernorm: bool = False
    """Take the residual from after the layer norm (original BERT) instead of before it."""
    openai_gelu: bool = False
    """Use the tanh approximation of GeLU that OpenAI's GPT-2 used."""
    onnx_safe: bool = False
    """Use the erf GeLU written out for ONNX export."""
    bias_gelu_fusion: bool = True
    """Fuse the MLP bias add into the GeLU."""
    bias_dropout_fusion: bool = True
    """Fuse bias add, dropout and residual add."""
    masked_softmax_fusion: bool = True
    """Use the fused scaled masked softmax kernels where they apply."""
    apply_query_key_layer_scaling: bool = True
    """Scale Q.K^T by 1/layer_number and the softmax input back (fp16 range safety)."""
    attention_softmax_in_fp32: bool = False
    """Compute the attention softmax in fp32 when running in half precision."""
    use_flash_attn: bool = False
    """Core attention through torch's scaled_dot_product_attention (flash kernels on GPU)."""
    fp16: bool = False
    """Half precision (fp16) parameters and activations."""
    bf16: bool = False
    """bfloat16 parameters and activations."""
    fp32_residual_connection: bool = False
    """Keep the residual stream in fp32 under fp16/bf16."""
    fp16_lm_cross_entropy: bool = False
    """Compute the LM cross entropy on half-precision logits."""
    recompute_granularity: str | None = None
    """Activation recompute: None, "full" (whole layers) or "selective" (attention core)."""
    recompute_method: str | None = None
    """Full recompute: "uniform" (chunks of recompute_num_layers) or "block" (the first
    recompute_num_layers layers of the stage, the rest stored)."""
    recompute_num_layers: int = 1
    """Layers per recomputed chunk (uniform) or recomputed layers per stage (block)."""
    distribute_saved_activations: bool = False
    """Full recompute: split each stored chunk input across tensor-parallel ranks."""
    sequence_parallel: bool = False
    """Split layer-norm and dropout regions along the sequence in the TP group."""
    async_tensor_model_parallel_allreduce: bool = True
    """Overlap column-parallel input-gradient communication with the weight-gradient GEMM."""
    tp_comm_overlap: bool = False
    """With sequence parallelism, overlap each TP GEMM with its all-gather / reduce-scatter."""
    tp_comm_overlap_chunks: int = 1
    """Pieces of each row-parallel GEMM whose all-reduces overlap the next piece's GEMM."""
    use_cpu_initialization: bool = False
    """Initialise the full weight on CPU and copy this rank's shard (parity with TP=1)."""
    perform_initialization: bool = True
    """Run the init methods (off when weights will be loaded anyway)."""
    seed: int = 1234
    """Base seed (--seed): each transformer layer, the embedding and the pooler initialise
    their weights from a generator seeded from (seed, component), see model/utils.py."""
    num_experts: list = field(default_factory=lambda: [1])
    """Experts per MoE layer ([1] = dense; one value, or one per MoE layer)."""
    expert_interval: int = 2
    """Every expert_interval-th layer is a MoE layer."""
    mlp_type: str = "standard"
    """'standard' MoE or 'residual' (PR-MoE)."""
    topk: int = 1
    """Experts each token is routed to."""
    moe_expert_parallel_size: int = 1
    """Expert-parallel degree."""
    moe_train_capacity_factor: float = 1.0
    """Tokens an expert takes in training, as a multiple of an even share."""
    moe_eval_capacity_factor: float = 1.0
    """The same in evaluation."""
    moe_min_capacity: int = 4
    """Least number of tokens an expert takes, whatever the capacity factor."""
    moe_token_dropping: bool = True
    """Drop the tokens over an expert's capacity (off with --disable-moe-token-dropping)."""
    use_rotary_position_embeddings: bool = False
    """Rotate q and k by their positions (RoPE) instead of learned absolute positions."""
    rope_theta: float = 10000
    """RoPE base theta (--rotary-position-embeddings-theta)."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that RoPE rotates (partial rotary), in (0, 1]."""
    add_position_embedding: bool = True
    """Learned absolute position embeddings (off with --no-position-embedding or RoPE)."""
    swiglu: bool = False
    """MLP silu(X G) * (X U) W_2 (gated linear unit) instead of gelu(X A) B."""
    normalization: str = "layernorm"
    """'layernorm' or 'rmsnorm' for every norm of the transformer."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention); num_attention_heads when None."""
    untie_embeddings_and_output_weights: bool = False
    """Output layer with its own weight (language_model.output_layer) instead of E^T."""
    add_bias_linear: bool = True
    """Biases in the attention and MLP linear layers (off with --disable-bias-linear)."""

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.hidden_size, self.swiglu)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.use_rotary_position_embeddings:
            self.add_position_embedding = False  # RoPE replaces absolute positions
        if self.normalization not in ("layernorm", "rmsnorm"):
            raise ValueError(
                f"--normalization must be layernorm or rmsnorm (got {self.normalization!r})"
            )
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"--hidden-size ({self.hidden_size}) is not divisible by "
                    f"--num-attention-heads ({self.num_attention_heads})"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"recompute_granularity {self.recompute_granularity!r}")
        if self.recompute_granularity == "full" and self.recompute_method is None:
            self.recompute_method = "uniform"
        if self.recompute_method not in (None, "uniform", "block"):
            raise ValueError(f"recompute_method {self.recompute_method!r}")

    @property
    def params_dtype(self) -> torch.dtype:
        """fp16, bf16 or fp32, from the fp16 / bf16 flags."""
        if self.fp16:
            return torch.half
        if self.bf16:
            return torch.bfloat16
        return torch.float32

    @property
    def parallel_config(self) -> ParallelConfig:
        """What the tensor-parallel layers (mpu/layers.py) take from this configuration."""
        return ParallelConfig(
            params_dtype=self.params_dtype,
            use_cpu_initialization=self.use_cpu_initialization,
            perform_initialization=self.perform_initialization,
            sequence_parallel=self.sequence_parallel,
            async_tensor_model_parallel_allreduce=self.async_tensor_model_parallel_allreduce,
            tp_comm_overlap=self.tp_comm_overlap,
            tp_comm_overlap_chunks=self.tp_comm_overlap_chunks,
        )


def config_from_args(args, **overrides) -> TransformerConfig:
    """Build the model configuration from parsed Megatron arguments."""
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if hasattr(args, "disable_moe_token_dropping"):
        values["moe_token_dropping"] = not args.disable_moe_token_dropping
    if isinstance(values.get("num_experts"), int):
        values["num_experts"] = [values["num_experts"]]
    if values.get("num_experts") is None:
        values["num_experts"] = [1]
    values.update(overrides)
    return TransformerConfig(**values)
