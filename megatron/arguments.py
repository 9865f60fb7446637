"""Megatron arguments: every command-line flag, in groups, and their validation.

`parse_args()` builds the parser (one `_add_*_args` function per flag group, then the
caller's extra flags, then DeepSpeed's own), parses, and runs `validate_args()`, which
fills in the derived values (data-parallel size, ffn and kv widths, params dtype, ...)
and rejects invalid combinations with `ArgumentError`. The derived values come from the
small pure functions below (numbers in, numbers out), so they can be tested without any
process group.

Flag spellings and defaults are Megatron-DeepSpeed's, including its misspellings
(`--no-log-learnig-rate-to-tensorboard`, `--contigious-checkpointing`), because users'
launch scripts depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence


class ArgumentError(ValueError):
    """An invalid flag or combination of flags; the message is one line naming them."""


# ----------------------------------------------------------------------------------------
# Derived values: pure functions of numbers.
# ----------------------------------------------------------------------------------------


def data_parallel_size(world_size: int, tp: int, pp: int, sp: int = 1) -> int:
    """dp = world_size / (tp * pp * sp); every rank holds one (tp, sp, dp, pp) coordinate
    (sp: the DeepSpeed-Ulysses sequence-parallel size, whose ranks share their samples)."""
    if tp < 1 or pp < 1:
        raise ArgumentError(
            f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) "
            "must be >= 1"
        )
    if sp < 1:
        raise ArgumentError(f"--ds-sequence-parallel-size must be >= 1 (got {sp})")
    if world_size % (tp * pp * sp) != 0:
        with_sp = f" x --ds-sequence-parallel-size ({sp})" if sp > 1 else ""
        raise ArgumentError(
            f"world size ({world_size}) is not divisible by --tensor-model-parallel-size "
            f"({tp}) x --pipeline-model-parallel-size ({pp}){with_sp}"
        )
    return world_size // (tp * pp * sp)


def num_microbatches(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches per iteration: global_batch / (micro_batch * dp)."""
    if micro_batch < 1 or global_batch < 1:
        raise ArgumentError(
            f"--micro-batch-size ({micro_batch}) and --global-batch-size ({global_batch}) "
            "must be >= 1"
        )
    if global_batch % (micro_batch * dp) != 0:
        raise ArgumentError(
            f"--global-batch-size ({global_batch}) is not divisible by --micro-batch-size "
            f"({micro_batch}) x data-parallel size ({dp})"
        )
    return global_batch // (micro_batch * dp)


def ffn_hidden_size(hidden: int) -> int:
    """The MLP inner width when --ffn-hidden-size is not given: 4h."""
    return 4 * hidden


def swiglu_ffn_hidden_size(hidden: int) -> int:
    """The SwiGLU MLP inner width when --ffn-hidden-size is not given: 2/3 of 4h (two
    input projections keep the parameter count of a 4h MLP), rounded down to a multiple
    of 64 as Megatron-DeepSpeed does: int(4h * 2/3 / 64) * 64."""
    ffn = int((4 * hidden * 2 / 3) / 64) * 64
    if ffn < 1:
        raise ArgumentError(
            f"--swiglu with --hidden-size ({hidden}) rounds the MLP width down to 0; "
            "give --ffn-hidden-size"
        )
    return ffn


def num_key_value_heads(heads: int, kv_heads: int | None, tp: int) -> int:
    """Key/value heads of grouped-query attention (heads when not given): they must
    divide the attention heads (each serves heads / kv_heads query heads) and split
    evenly across the tensor-parallel ranks."""
    if kv_heads is None:
        return heads
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ArgumentError(
            f"--num-attention-heads ({heads}) is not divisible by --num-key-value-heads "
            f"({kv_heads})"
        )
    if kv_heads % tp != 0:
        raise ArgumentError(
            f"--num-key-value-heads ({kv_heads}) is not divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    return kv_heads


def rotary_channels(kv_channels: int, rotary_percent: float) -> int:
    """Channels of each head that RoPE rotates: int(kv_channels * rotary_percent), which
    must be even (they are rotated in pairs) and at least 2."""
    if not 0.0 < rotary_percent <= 1.0:
        raise ArgumentError(f"--rotary-percent must be in (0, 1] (got {rotary_percent})")
    dim = int(kv_channels * rotary_percent)
    if dim < 2 or dim % 2 != 0:
        raise ArgumentError(
            f"--rotary-percent ({rotary_percent}) of --kv-channels ({kv_channels}) rotates "
            f"{dim} channels per head; it must be an even number >= 2"
        )
    return dim


def swiglu_ffn_split(ffn: int, tp: int) -> None:
    """The fused SwiGLU gate/up projection gives each tensor-parallel rank ffn / tp
    channels of the gate and of the up projection: ffn must divide by tp."""
    if ffn % tp != 0:
        raise ArgumentError(
            f"--swiglu with --ffn-hidden-size ({ffn}) is not divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )


def kv_channels(hidden: int, heads: int) -> int:
    """The per-head width when --kv-channels is not given: h / heads."""
    if heads < 1 or hidden % heads != 0:
        raise ArgumentError(
            f"--hidden-size ({hidden}) is not divisible by --num-attention-heads ({heads}); "
            "give --kv-channels to choose the per-head width"
        )
    return hidden // heads


def virtual_pipeline_size(num_layers: int, pp: int, layers_per_virtual_stage: int) -> int:
    """Model chunks per pipeline rank for interleaved 1F1B.

    Each of the pp stages holds num_layers / pp layers, cut into chunks of
    layers_per_virtual_stage layers: v = (num_layers / pp) / layers_per_virtual_stage.
    """
    if pp < 2:
        raise ArgumentError(
            f"--num-layers-per-virtual-pipeline-stage ({layers_per_virtual_stage}) needs "
            f"--pipeline-model-parallel-size > 1 (got {pp})"
        )
    if num_layers % pp != 0:
        raise ArgumentError(
            f"--num-layers ({num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})"
        )
    per_stage = num_layers // pp
    if layers_per_virtual_stage < 1 or per_stage % layers_per_virtual_stage != 0:
        raise ArgumentError(
            f"layers per pipeline stage ({per_stage} = --num-layers {num_layers} / "
            f"--pipeline-model-parallel-size {pp}) is not divisible by "
            f"--num-layers-per-virtual-pipeline-stage ({layers_per_virtual_stage})"
        )
    return per_stage // layers_per_virtual_stage


def num_moe_layers(num_layers: int, expert_interval: int) -> int:
    """Layers that are MoE layers: every expert_interval-th one, so num_layers // interval."""
    if expert_interval < 1:
        raise ArgumentError(f"--expert-interval ({expert_interval}) must be >= 1")
    return num_layers // expert_interval


# ----------------------------------------------------------------------------------------
# Parsing.
# ----------------------------------------------------------------------------------------

RECOMPUTE_METHODS = ["uniform", "block"]

# Megatron-DeepSpeed's flash-attention flags (--use-flash-attn is -v1's other spelling).
# Every one runs torch's scaled_dot_product_attention here.
FLASH_ATTN_FLAGS = ("--use-flash-attn", "--use-flash-attn-v1", "--use-flash-attn-v2",
                    "--use-flash-attn-triton", "--use-flash-attn-builder")

_TRUE_WORDS = ("true", "t", "yes", "y", "on", "1")
_FALSE_WORDS = ("false", "f", "no", "n", "off", "0")


def bool_value(text: str) -> bool:
    """The value of a flag Megatron-DeepSpeed declares type=bool (--onnx-safe True):
    true/false, yes/no, on/off or 1/0. (type=bool there reads any word, even False, as
    True; here False means False and another word is an error.)"""
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")



class _MegatronArgumentParser(argparse.ArgumentParser):
    """argparse, but errors are one line (the usage of ~200 flags helps no one)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(
    extra_args_provider: Callable[[argparse.ArgumentParser], object] | None = None,
    defaults: dict | None = None,
    ignore_unknown_args: bool = False,
    args_list: Sequence[str] | None = None,
) -> argparse.Namespace:
    """Parse (args_list or sys.argv[1:]), validate, print the arguments on rank 0.

    `defaults` maps dests to values used where the user gave no flag (entry scripts set
    e.g. tokenizer_type this way). An invalid combination exits with code 2 and one
    `error:` line on stderr, like any argparse error.
    """
    defaults = dict(defaults or {})
    parser = build_parser(extra_args_provider)
    # Caller defaults become parser defaults, so they apply exactly where no flag was given.
    parser.set_defaults(**defaults)
    argv = list(args_list) if args_list is not None else None
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    try:
        if args.use_checkpoint_args:
            _apply_checkpoint_args(args, given_dests(parser, argv))
        validate_args(args, defaults)
    except ArgumentError as exc:
        parser.error(str(exc))
    print_args(args)
    return args


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests that argv (None: sys.argv[1:]) sets by a flag, as opposed to a default
    (the parser's, or one of an entry script's `defaults`)."""
    actions = [(action, action.default) for action in parser._actions]
    defaults = dict(parser._defaults)
    try:
        parser._defaults.clear()
        for action, _ in actions:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        parser._defaults.update(defaults)
        for action, default in actions:
            action.default = default
    return set(vars(namespace))


def _apply_checkpoint_args(args: argparse.Namespace, given: set[str]) -> None:
    """--use-checkpoint-args: the model flags of the --load checkpoint, before validation."""
    from .checkpointing import CheckpointError, load_args_from_checkpoint

    if args.load is None:
        raise ArgumentError("--use-checkpoint-args needs --load (the checkpoint folder)")
    try:
        load_args_from_checkpoint(args, given=given)
    except CheckpointError as exc:
        raise ArgumentError(f"--use-checkpoint-args: {exc}") from None


def build_parser(
    extra_args_provider: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.ArgumentParser:
    """The full Megatron parser: every group, the caller's flags, then DeepSpeed's."""
    parser = _MegatronArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    for add_group in (
        _add_network_size_args,
        _add_regularization_args,
        _add_training_args,
        _add_initialization_args,
        _add_learning_rate_args,
        _add_checkpointing_args,
        _add_mixed_precision_args,
        _add_distributed_args,
        _add_validation_args,
        _add_data_args,
        _add_autoresume_args,
        _add_logging_args,
        _add_profiler_args,
        _add_zero_args,
        _add_activation_checkpoint_args,
        _add_curriculum_args,
        _add_universal_checkpoint_args,
        _add_distillation_args,
        _add_run_control_args,
    ):
        add_group(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    _add_deepspeed_args(parser)
    return parser


def _add_deepspeed_args(parser: argparse.ArgumentParser) -> None:
    """--deepspeed, --deepspeed_config, ... from DeepSpeed itself (imported here: it is slow)."""
    import deepspeed

    deepspeed.add_config_arguments(parser)


def _group(parser: argparse.ArgumentParser, title: str) -> Callable[..., argparse.Action]:
    """The add_argument of a new titled group (flags without a default default to None)."""
    return parser.add_argument_group(title=title).add_argument


_TRUE, _FALSE = "store_true", "store_false"


def _add_network_size_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "network size")
    add("--num-layers", type=int, help="Number of transformer layers.")
    add("--hidden-size", type=int, help="Transformer hidden size h.")
    add("--ffn-hidden-size", type=int, help="MLP inner width; 4h if unset.")
    add("--num-attention-heads", type=int, help="Number of attention heads.")
    add("--kv-channels", type=int, help="Per-head width; h / heads if unset.")
    add("--max-position-embeddings", type=int, help="Position embeddings (>= seq length).")
    add("--make-vocab-size-divisible-by", type=int, default=128, help="Vocab padding (x TP).")
    add("--num-key-value-heads", type=int, help="Key/value heads (GQA); heads if unset.")
    add("--use-rotary-position-embeddings", action=_TRUE, help="Rotary position embeddings.")
    add(
        "--rotary-position-embeddings-theta",
        type=int,
        default=10000,
        dest="rope_theta",
        help="Rotary base theta.",
    )
    add("--rotary-percent", type=float, default=1.0, help="Fraction of head channels rotated.")
    add(
        "--no-position-embedding",
        action=_FALSE,
        dest="add_position_embedding",
        help="No learned absolute position embeddings.",
    )
    add(
        "--normalization",
        default="layernorm",
        choices=["layernorm", "rmsnorm"],
        help="Normalisation layers.",
    )
    add("--layernorm-epsilon", type=float, default=1e-5, help="Layer-norm epsilon.")
    add("--swiglu", action=_TRUE, help="SwiGLU MLP (gated linear unit with SiLU).")
    add(
        "--untie-embeddings-and-output-weights",
        action=_TRUE,
        help="An output layer of its own instead of the word embeddings.",
    )
    add(
        "--disable-bias-linear",
        action=_FALSE,
        dest="add_bias_linear",
        help="No biases in the linear layers.",
    )
    add("--apply-residual-connection-post-layernorm", action=_TRUE, help="Original BERT order.")
    add("--openai-gelu", action=_TRUE, help="OpenAI's tanh GeLU approximation.")
    add("--onnx-safe", type=bool_value, nargs="?", const=True, default=False,
        help="ONNX-exportable GeLU (erf form); takes a value as Megatron-DeepSpeed's "
        "(--onnx-safe True), or none.")
    add(
        "--bert-no-binary-head",
        action=_FALSE,
        dest="bert_binary_head",
        help="BERT without the sentence-order (binary) head.",
    )
    # Mixture of Experts (DeepSpeed MoE).
    add(
        "--num-experts",
        type=int,
        nargs="+",
        default=[1],
        help="Experts per MoE layer: one value, or one per MoE layer.",
    )
    add("--mlp-type", default="standard", choices=["standard", "residual"], help="MoE or PR-MoE.")
    add("--topk", type=int, default=1, help="Experts each token is routed to.")
    add("--expert-interval", type=int, default=2, help="Every n-th layer is a MoE layer.")
    add("--moe-expert-parallel-size", type=int, default=1, help="Expert-parallel size.")
    add("--moe-train-capacity-factor", type=float, default=1.0, help="Capacity in training.")
    add("--moe-eval-capacity-factor", type=float, default=1.0, help="Capacity in evaluation.")
    add("--moe-min-capacity", type=int, default=4, help="Minimum expert capacity.")
    add("--moe-loss-coeff", type=float, default=0.1, help="Load-balancing loss weight.")
    add("--create-moe-param-group", action=_TRUE, help="Experts in their own optimizer group.")
    add("--disable-moe-token-dropping", action=_TRUE, help="Never drop tokens over capacity.")


def _add_regularization_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "regularization")
    add("--attention-dropout", type=float, default=0.1, help="Dropout on attention probs.")
    add("--hidden-dropout", type=float, default=0.1, help="Dropout on hidden states.")
    add("--weight-decay", type=float, default=0.01, help="Decoupled weight decay.")
    add("--clip-grad", type=float, default=1.0, help="Gradient norm clipping (0: off).")
    add("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    add("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    add("--adam-eps", type=float, default=1e-08, help="Adam epsilon.")
    add("--sgd-momentum", type=float, default=0.9, help="SGD momentum.")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "training")
    add("--micro-batch-size", type=int, help="Samples per model replica per step.")
    add("--batch-size", type=int, help="Deprecated: use --micro-batch-size.")
    add("--global-batch-size", type=int, help="Samples per iteration; micro x dp if unset.")
    add("--rampup-batch-size", type=int, nargs="*", help="<start> <increment> <samples>.")
    add("--checkpoint-activations", action=_TRUE,
        help="Full recompute: = --recompute-granularity full --recompute-method uniform "
        "--recompute-num-layers <--checkpoint-num-layers>.")
    add("--distribute-checkpointed-activations", action=_TRUE,
        help="= --distribute-saved-activations (the older spelling).")
    add("--checkpoint-num-layers", type=int, default=1,
        help="Layers per recomputed chunk with --checkpoint-activations.")
    add("--recompute-activations", action=_TRUE,
        help="= --recompute-granularity selective.")
    add("--recompute-granularity", choices=["full", "selective"], default=None,
        help="full: recompute whole transformer layers in the backward; selective: only "
        "the attention core (scores, softmax, dropout, probabilities x V). With "
        "--use-flash-attn the attention core keeps nothing quadratic already, so selective "
        "stores what flash attention stores.")
    add("--recompute-method", choices=RECOMPUTE_METHODS, default=None,
        help="With full granularity: uniform recomputes chunks of --recompute-num-layers "
        "layers (storing each chunk's input); block recomputes only the first "
        "--recompute-num-layers layers of each pipeline stage and stores the rest.")
    add("--activations-checkpoint-method", choices=RECOMPUTE_METHODS, default=None,
        help="The older spelling of --recompute-method; alone it means full recompute "
        "(--recompute-granularity full), as it did in the release that spelled it so.")
    add("--recompute-num-layers", type=int, default=None,
        help="Layers per chunk (uniform) or recomputed layers per stage (block); default 1.")
    add("--distribute-saved-activations", action=_TRUE,
        help="Full recompute under TP: each tensor-parallel rank keeps 1/TP of every "
        "stored chunk input, all-gathered for the recompute.")
    add("--train-iters", type=int, help="Iterations to train for.")
    add("--train-samples", type=int, help="Samples to train for.")
    add("--train-tokens", type=int,
        help="Stop once this many tokens were consumed (samples x sequence length, the "
        "curriculum length where one is used); --train-iters/--train-samples still apply.")
    add("--log-interval", type=int, default=100, help="Iterations between log lines.")
    add("--exit-interval", type=int, help="Exit at an iteration divisible by this.")
    add("--exit-duration-in-mins", type=int, help="Exit after this many minutes.")
    add("--exit-signal-handler", action=_TRUE, help="Save and exit on SIGTERM.")
    add("--tensorboard-dir", type=str, help="TensorBoard log folder.")
    add(
        "--no-masked-softmax-fusion",
        action=_FALSE,
        dest="masked_softmax_fusion",
        help="Plain torch scaled masked softmax.",
    )
    add(
        "--no-bias-gelu-fusion", action=_FALSE, dest="bias_gelu_fusion", help="Unfused bias + GeLU."
    )
    add(
        "--no-bias-dropout-fusion",
        action=_FALSE,
        dest="bias_dropout_fusion",
        help="Separate bias add, dropout and residual add.",
    )
    add("--optimizer", default="adam", choices=["adam", "sgd"], help="Optimizer.")
    add("--dataloader-type", choices=["single", "cyclic"], help="Sampler; single if unset.")
    add("--cpu-optimizer", action=_TRUE, help="DeepSpeed's CPU Adam.")
    add("--cpu_torch_adam", action=_TRUE, help="torch's Adam on CPU.")
    add("--no-pipeline-parallel", action=_TRUE, help="No DeepSpeed pipeline engine.")
    add("--random-ltd", action=_TRUE, help="Random layer-token drop (refused: not here).")
    add("--use-flash-attn", "--use-flash-attn-v1", action=_TRUE, dest="use_flash_attn",
        help="Attention via torch's scaled_dot_product_attention (flash, cuDNN or "
        "memory-efficient kernels as the device has them).")
    for name in FLASH_ATTN_FLAGS[2:]:
        add(name, action=_TRUE,
            help="Megatron-DeepSpeed's spelling of one flash-attention build; here the same "
            "scaled_dot_product_attention as --use-flash-attn.")
    add(
        "--empty-unused-memory-level",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="Empty the accelerator's cache to reduce fragmentation: 0 never, 1 after each "
        "forward-backward (training and evaluation), 2 also after each optimizer step.",
    )


def _add_initialization_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "initialization")
    add("--seed", type=int, default=1234, help="Random seed.")
    add("--init-method-std", type=float, default=0.02, help="Std of the normal init.")
    add("--init-method-xavier-uniform", action=_TRUE,
        help="Xavier uniform init of the weights the normal init would draw (linear layers "
        "and embeddings), as Megatron-DeepSpeed does.")


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "learning rate")
    add("--lr", type=float, help="Peak learning rate.")
    add(
        "--lr-decay-style",
        default="linear",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
        help="Learning-rate decay function after warm-up (inverse-square-root: "
        "lr * sqrt(warmup) / sqrt(step), at least --min-lr).",
    )
    add("--lr-decay-iters", type=int, help="Iterations to decay over.")
    add("--lr-decay-samples", type=int, help="Samples to decay over.")
    add("--lr-decay-tokens", type=int,
        help="Tokens to decay over; the decay then follows consumed tokens, not steps.")
    add("--lr-warmup-fraction", type=float, help="Warm-up as a fraction of the decay span.")
    add("--lr-warmup-iters", type=int, default=0, help="Warm-up iterations.")
    add("--lr-warmup-samples", type=int, default=0, help="Warm-up samples.")
    add("--lr-warmup-tokens", type=int, help="Warm-up tokens (with --lr-decay-tokens).")
    add("--warmup", type=float, help="Deprecated: use --lr-warmup-fraction.")
    add("--min-lr", type=float, default=0.0, help="Floor of the decayed learning rate.")
    add("--override-opt_param-scheduler", "--override-lr-scheduler", action=_TRUE,
        dest="override_lr_scheduler",
        help="Learning-rate schedule (lr, min lr, warm-up, decay span and style) from the "
        "flags, not from the checkpoint.")
    add("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-lr-scheduler", action=_TRUE,
        dest="use_checkpoint_lr_scheduler",
        help="Learning-rate schedule from the checkpoint, not from the flags.")


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "checkpointing")
    add("--save", type=str, help="Folder to save checkpoints to.")
    add("--save-interval", type=int, help="Iterations between checkpoints.")
    # default None, not False, so that entry scripts can default them through `defaults`.
    add("--no-save-optim", action=_TRUE, default=None, help="Do not save optimizer state.")
    add("--no-save-rng", action=_TRUE, default=None, help="Do not save RNG state.")
    add("--load", type=str, help="Folder to load checkpoints from.")
    add("--no-load-optim", action=_TRUE, default=None, help="Do not load optimizer state.")
    add("--no-load-rng", action=_TRUE, default=None, help="Do not load RNG state.")
    add("--finetune", action=_TRUE, help="Load the model only; start at iteration 0.")
    add("--load-tag", type=str,
        help="Checkpoint to load instead of the tracker's: an iteration (4), its folder "
        "name (iter_0000004) or release; for DeepSpeed checkpoints the tag (global_step4).")
    add("--use-checkpoint-args", action=_TRUE,
        help="Take the model flags (sizes, LLaMA options, tokenizer, parallel layout) from "
        "the saved args of the --load checkpoint; model-size flags given as well must agree "
        "with it, other flags given win.")
    add("--keep-last-checkpoints", type=int,
        help="Keep only the newest K iter_* checkpoints under --save (default: keep all).")


def _add_mixed_precision_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "mixed precision")
    add("--fp16", action=_TRUE, help="fp16 parameters and activations.")
    add("--bf16", action=_TRUE, help="bfloat16 parameters and activations.")
    add("--loss-scale", type=float, help="Static loss scale; dynamic if unset.")
    add("--initial-loss-scale", type=float, default=2**32, help="Initial dynamic scale.")
    add("--min-loss-scale", type=float, default=1.0, help="Dynamic scale floor.")
    add("--loss-scale-window", type=float, default=1000, help="Clean steps before growing.")
    add("--hysteresis", type=int, default=2, help="Overflows tolerated before shrinking.")
    add("--max-consecutive-skipped-iterations", type=int, default=100,
        help="Stop the run when this many iterations in a row were skipped for fp16 "
        "overflow (it also stops when the loss scale is at --min-loss-scale and still "
        "overflows); 0 never stops.")
    add("--fp32-residual-connection", action=_TRUE, help="Residual stream in fp32.")
    add(
        "--no-query-key-layer-scaling",
        action=_FALSE,
        dest="apply_query_key_layer_scaling",
        help="Do not scale Q.K^T by 1/layer-number (fp16 range safety).",
    )
    add("--attention-softmax-in-fp32", action=_TRUE, help="Attention softmax in fp32.")
    add("--accumulate-allreduce-grads-in-fp32", action=_TRUE, help="fp32 grads and all-reduce.")
    add("--fp16-lm-cross-entropy", action=_TRUE, help="LM cross entropy on fp16 logits.")


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "distributed")
    add("--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel size.")
    add("--model-parallel-size", type=int, help="Deprecated: --tensor-model-parallel-size.")
    add("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel size.")
    add("--num-layers-per-virtual-pipeline-stage", type=int, help="Layers per chunk.")
    add("--distributed-backend", choices=["nccl", "gloo"], help="Backend; by device if unset.")
    add("--distributed-timeout-minutes", type=float, default=10,
        help="Minutes a collective waits for the other ranks before the run stops "
        "(fractions allowed).")
    add("--DDP-impl", default="local", choices=["local", "torch"], help="Data-parallel wrapper.")
    add(
        "--no-contiguous-buffers-in-local-ddp",
        action=_FALSE,
        dest="use_contiguous_buffers_in_local_ddp",
        help="Local DDP without one contiguous gradient buffer.",
    )
    add(
        "--use-distributed-optimizer",
        action=_TRUE,
        help="Shard the fp32 master weights and optimizer state over the data-parallel "
        "ranks (Megatron's distributed optimizer; gradients reduce-scattered, params "
        "all-gathered). Needs --DDP-impl local; not with --deepspeed (use ZeRO there).",
    )
    add(
        "--no-gradient-accumulation-fusion",
        action=_FALSE,
        dest="gradient_accumulation_fusion",
        help="Linear layers return their weight gradient instead of adding it into the "
        "local DDP's main_grad buffer in the GEMM.",
    )
    add(
        "--scatter-gather-tensors-in-pipeline",
        action=_TRUE,
        default=True,
        help="Split p2p messages over TP.",
    )
    add(
        "--no-scatter-gather-tensors-in-pipeline",
        action=_FALSE,
        dest="scatter_gather_tensors_in_pipeline",
        help="Every TP rank sends whole pipeline messages.",
    )
    # torch.distributed.launch passes --local_rank=N, torchrun-era launchers --local-rank=N.
    add(
        "--local_rank", "--local-rank", type=int, dest="local_rank", help="Env LOCAL_RANK if unset."
    )
    add("--lazy-mpu-init", type=bool_value, nargs="?", const=True, default=False,
        help="No process groups yet (takes a value, as Megatron-DeepSpeed's).")
    add("--use-cpu-initialization", action=_TRUE, default=None, help="Init on CPU, then shard.")
    add("--enable-zbh1-pipeline", action=_TRUE,
        help="Zero-bubble pipeline schedule (refused: not here).")
    add("--enable-zbh1-exact-semantics", action=_TRUE,
        help="Zero-bubble schedule's exact semantics (refused: not here).")
    add("--sequence-parallel", action=_TRUE, help="Split norm/dropout regions along the sequence.")
    add(
        "--ds-sequence-parallel-size",
        type=int,
        default=1,
        help="DeepSpeed-Ulysses sequence parallelism: split every sample's tokens over this "
        "many ranks; around the core attention an all-to-all trades the sequence split for "
        "a split of the heads (DeepSpeed's DistributedAttention). Cannot be combined with "
        "--sequence-parallel (Megatron's).",
    )
    add(
        "--no-async-tensor-model-parallel-allreduce",
        action="store_false",
        dest="async_tensor_model_parallel_allreduce",
        help="Wait for each column-parallel input-gradient all-reduce (or reduce-scatter) "
        "instead of overlapping it with the weight-gradient GEMM.",
    )
    add(
        "--tp-comm-overlap",
        action=_TRUE,
        help="With --sequence-parallel: split each tensor-parallel GEMM along the sequence "
        "and move the pieces between GPUs by copy engines (CUDA symmetric memory, NCCL "
        "group) while the other pieces compute, instead of all-gathering / "
        "reduce-scattering before or after the GEMM.",
    )
    add(
        "--tp-comm-overlap-chunks",
        type=int,
        default=1,
        help="Compute each row-parallel GEMM in this many pieces along the sequence, "
        "all-reducing one piece while the next computes (tensor parallelism without "
        "--sequence-parallel; 1 = one GEMM, then one all-reduce).",
    )


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "validation")
    add("--eval-iters", type=int, default=100, help="Iterations per evaluation.")
    add("--eval-interval", type=int, default=1000, help="Iterations between evaluations.")


_TOKENIZERS = [
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HFTokenizer",
    "NullTokenizer",
]


def _add_run_control_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-DeepSpeed's checkpoint-loading and run-control switches."""
    add = _group(parser, "run control")
    add("--no-load-lr-state", action=_TRUE,
        help="Load the checkpoint but not its learning-rate scheduler state: the schedule "
        "starts over (warmup included) from the loaded iteration.")
    add("--reset-iteration", action=_TRUE,
        help="Load the checkpoint (weights, optimizer, lr state, RNG) but count from "
        "iteration 0 with no consumed samples or tokens, as a new run.")
    add("--exit-on-missing-checkpoint", action=_TRUE,
        help="With --load given and no checkpoint there (e.g. a typo in the path), stop "
        "with an error instead of starting from random.")
    add("--skip-train", action=_TRUE,
        help="No training: load, evaluate on the validation and test splits, and exit.")
    add("--kill-switch-file", type=str,
        help="When this file exists (checked at start-up and after every iteration), "
        "save a checkpoint (with --save) and exit.")
    add("--data-cache-path", type=str,
        help="Folder for the datasets' index caches (.npy) instead of beside the data.")
    add("--repeated-dataloader", action=_TRUE,
        help="Start the training data loader over when it runs out, instead of ending.")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="data and dataloader")
    add = group.add_argument
    # argparse reports both flags by name when they are given together.
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--data-path", nargs="*", help="Dataset prefix, or 'weight1 prefix1 weight2 ...'."
    )
    source.add_argument(
        "--mock-data",
        action=_TRUE,
        help="Train on random tokens (seeded by --seed) instead of --data-path files.",
    )
    add("--split", type=str, default="969, 30, 1", help="Train,valid,test proportions.")
    add("--train-data-path", nargs="*", help="Training data only.")
    add("--valid-data-path", nargs="*", help="Validation data only.")
    add("--test-data-path", nargs="*", help="Test data only.")
    add("--vocab-file", type=str, help="Vocabulary file.")
    add("--merge-file", type=str, help="BPE merges file.")
    add("--vocab-extra-ids", type=int, default=0, help="Sentinel tokens (T5).")
    add("--seq-length", type=int, help="Sequence length.")
    add("--encoder-seq-length", type=int, help="Encoder sequence length (sets --seq-length).")
    add("--decoder-seq-length", type=int, help="Decoder sequence length (T5).")
    add("--retriever-seq-length", type=int, default=256, help="Retriever sequence length.")
    add("--sample-rate", type=float, default=1.0, help="Fraction of the data to sample.")
    add("--mask-prob", type=float, default=0.15, help="Masking probability (BERT/T5).")
    add("--short-seq-prob", type=float, default=0.1, help="Short-sequence probability (BERT).")
    add("--mmap-warmup", action=_TRUE, help="Touch the mmap pages at start.")
    add("--num-workers", type=int, default=2, help="Dataloader workers.")
    add("--tokenizer-type", choices=_TOKENIZERS, help="Tokenizer.")
    add("--tokenizer-model", type=str,
        help="SentencePiece .model (SentencePieceTokenizer, GPTSentencePieceTokenizer) or "
             "tokenizer.json / its folder (HFTokenizer).")
    add("--vocab-size", type=int, default=None,
        help="Vocabulary size of the NullTokenizer (ids are whitespace-separated integers).")
    add(
        "--data-impl",
        default="infer",
        choices=["lazy", "cached", "mmap", "infer"],
        help="Indexed dataset format; infer reads it from the .idx header.",
    )
    add("--reset-position-ids", action=_TRUE, help="Restart positions after end-of-document.")
    add("--reset-attention-mask", action=_TRUE, help="No attention across documents.")
    add("--eod-mask-loss", action=_TRUE, help="No loss on end-of-document tokens.")
    add("--data-efficiency-curriculum-learning", action=_TRUE,
        help="DeepSpeed data-efficiency curriculum (refused: not here).")


def _add_autoresume_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "autoresume")
    add("--adlr-autoresume", action=_TRUE, help="Cluster auto-resume (userlib module).")
    add("--adlr-autoresume-interval", type=int, default=1000, help="Steps between checks.")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "logging")
    add("--log-params-norm", action=_TRUE, help="Log the parameter norm.")
    add("--log-num-zeros-in-grad", action=_TRUE, help="Log the zeros in the gradient.")
    add("--tensorboard-log-interval", type=int, default=1, help="Steps between TB writes.")
    add("--tensorboard-queue-size", type=int, default=1000, help="TB events before a flush.")
    add("--log-timers-to-tensorboard", action=_TRUE,
        help="Step timers and iteration time to TensorBoard.")
    add("--log-batch-size-to-tensorboard", action=_TRUE, help="Batch size to TensorBoard.")
    add(
        "--no-log-learnig-rate-to-tensorboard",
        action=_FALSE,
        dest="log_learning_rate_to_tensorboard",
        help="Do not log the learning rate to TensorBoard.",
    )
    add(
        "--no-log-loss-scale-to-tensorboard",
        action=_FALSE,
        dest="log_loss_scale_to_tensorboard",
        help="Do not log the loss scale to TensorBoard.",
    )
    add("--log-validation-ppl-to-tensorboard", action=_TRUE, help="Validation perplexity.")
    add("--log-memory-to-tensorboard", action=_TRUE, help="Device memory to TensorBoard.")
    add("--log-optimizer-states-to-tensorboard", action=_TRUE, help="Optimizer state norms.")
    add("--log-world-size-to-tensorboard", action=_TRUE,
        help="The world size to TensorBoard (and wandb), per iteration and vs samples.")
    add("--timing-log-level", type=int, default=0, choices=[0, 1, 2],
        help="Timers recorded: 0 the iteration time and the setup/load/save times (no "
        "extra synchronisation); 1 also the step's phases (forward-backward, gradient "
        "all-reduces, optimizer); 2 also the finest ones (batch generator).")
    add("--timing-log-option", default="minmax", choices=["max", "minmax", "all"],
        help="How the timers printed at each log line are reduced over the ranks: the "
        "slowest rank, the fastest and the slowest, or every rank.")
    add("--wandb-project", type=str, default="",
        help="Weights & Biases project: log the TensorBoard scalars there too (last rank).")
    add("--wandb-exp-name", type=str, default="", help="Weights & Biases run name.")
    add("--wandb-save-dir", type=str, default="",
        help="Folder for the wandb run files; <--save>/wandb if unset.")


def _add_profiler_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "profiling")
    add("--profile", choices=["pt", "pt-full"], default=None,
        help="torch.profiler traces of the --profile_steps window (pt-full: with Python "
        "stacks), written under --tensorboard-dir for TensorBoard or Perfetto.")
    add("--profile_steps", type=str, default="2,3",
        help="<first>,<last>: the steps of this run to profile (from 1, both included).")
    add("--profile-step-start", type=int, default=None,
        help="Megatron-LM's window: profile the iterations after this one ...")
    add("--profile-step-end", type=int, default=None,
        help="... up to this one (with --profile-step-start; replaces --profile_steps).")
    add("--profile-ranks", type=int, nargs="+", default=None,
        help="Ranks that profile (all if unset).")


def _add_zero_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "ZeRO")
    add("--zero-stage", type=int, help="ZeRO stage; the DeepSpeed config decides if unset.")
    add("--zero-reduce-scatter", action=_TRUE, help="Reduce-scatter instead of all-reduce.")
    add("--zero-contigious-gradients", action=_TRUE, help="Contiguous gradient buffer.")
    add("--zero-reduce-bucket-size", type=int, default=0, help="Reduce bucket (elements).")
    add("--zero-allgather-bucket-size", type=int, default=0, help="All-gather bucket size.")
    add("--remote-device", default="none", choices=["none", "cpu", "nvme"], help="Offload target.")
    add("--use-pin-memory", action=_TRUE, help="Pin offloaded memory.")
    add("--scattered-embeddings", action=_TRUE, help="Split embeddings (ZeRO-3).")
    add("--split-transformers", action=_TRUE, help="Split transformer layers (ZeRO-3).")
    add("--memory-centric-tiled-linear", action=_TRUE, help="DeepSpeed TiledLinear.")
    add("--tile-factor", type=int, default=1, help="Tiles per TiledLinear.")


def _add_activation_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "activation checkpointing (DeepSpeed)")
    add("--deepspeed-activation-checkpointing", action=_TRUE, help="DeepSpeed's checkpointing.")
    add("--partition-activations", action=_TRUE, help="Partition over model-parallel ranks.")
    add("--contigious-checkpointing", action=_TRUE, help="Contiguous checkpoint memory.")
    add("--checkpoint-in-cpu", action=_TRUE, help="Move checkpoints to CPU.")
    add("--synchronize-each-layer", action=_TRUE, help="Synchronise at each layer.")
    add("--profile-backward", action=_TRUE, help="Profile the recomputation.")


def _add_curriculum_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "curriculum learning")
    add("--curriculum-learning", action=_TRUE, help="Seq-length curriculum (DeepSpeed config).")


def _add_universal_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "universal checkpoint")
    add("--universal-checkpoint", action=_TRUE, help="Load a DeepSpeed universal checkpoint.")


def _add_distillation_args(parser: argparse.ArgumentParser) -> None:
    add = _group(parser, "knowledge distillation")
    add("--kd", action=_TRUE, help="Knowledge distillation from the --load-teacher model.")
    add("--mos", action=_TRUE,
        help="Mixture-of-Students: distillation from an (MoE) teacher, logged as mos loss.")
    add("--kd-alpha-ce", type=float, default=1.0, help="Weight of the student's LM loss.")
    add("--kd-beta-ce", type=float, default=1.0, help="Weight of the distillation KL term.")
    add("--kd-temp", type=float, default=1.0, help="Softmax temperature T of the KL (x T^2).")
    add("--load-teacher", type=str, help="Folder of the teacher's Megatron checkpoint.")
    add("--num-layers-teacher", type=int, help="Transformer layers of the teacher.")
    add("--hidden-size-teacher", type=int, help="Hidden size of the teacher.")
    add("--num-attention-heads-teacher", type=int, help="Attention heads of the teacher.")
    add("--num-experts-teacher", type=int, nargs="+", default=[1],
        help="Experts of the teacher's MoE layers (one value, or one per MoE layer).")


def check_distillation(args: argparse.Namespace) -> None:
    """--kd / --mos: the teacher's checkpoint and shape flags, and a layout it runs in."""
    flag = "--mos" if getattr(args, "mos", False) else "--kd"
    if not (getattr(args, "kd", False) or getattr(args, "mos", False)):
        return
    if args.load_teacher is None:
        raise ArgumentError(f"{flag} needs --load-teacher (the teacher's checkpoint folder)")
    shape = (("num_layers_teacher", "--num-layers-teacher"),
             ("hidden_size_teacher", "--hidden-size-teacher"),
             ("num_attention_heads_teacher", "--num-attention-heads-teacher"))
    missing = [f for dest, f in shape if getattr(args, dest) is None]
    if missing:
        raise ArgumentError(f"{flag} needs the teacher's shape: give {', '.join(missing)}")
    hidden, heads = args.hidden_size_teacher, args.num_attention_heads_teacher
    if hidden % heads != 0:
        raise ArgumentError(f"--hidden-size-teacher ({hidden}) is not a multiple of "
                            f"--num-attention-heads-teacher ({heads})")
    tp = args.tensor_model_parallel_size
    if heads % tp != 0:
        raise ArgumentError(f"--num-attention-heads-teacher ({heads}) is not divisible by "
                            f"--tensor-model-parallel-size ({tp})")
    moe_layers = num_moe_layers(args.num_layers_teacher, args.expert_interval)
    if len(args.num_experts_teacher) not in (1, moe_layers):
        raise ArgumentError(
            f"--num-experts-teacher has {len(args.num_experts_teacher)} values; give 1 or one "
            f"per MoE layer of the teacher ({moe_layers})")
    if args.kd_temp <= 0:
        raise ArgumentError(f"--kd-temp must be > 0 (got {args.kd_temp})")
    if args.pipeline_model_parallel_size > 1:
        raise ArgumentError(f"{flag} with --pipeline-model-parallel-size > 1 is not "
                            "supported: the teacher runs whole on each rank")
    if getattr(args, "ds_sequence_parallel_size", 1) > 1:
        raise ArgumentError(f"{flag} with --ds-sequence-parallel-size > 1 is not supported")


# ----------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------

_REQUIRED = (
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("num_attention_heads", "--num-attention-heads"),
    ("max_position_embeddings", "--max-position-embeddings"),
    ("micro_batch_size", "--micro-batch-size"),
)


def validate_args(
    args: argparse.Namespace,
    defaults: dict | None = None,
    world_size: int | None = None,
    rank: int | None = None,
) -> argparse.Namespace:
    """Check the flags, fold in deprecated ones and fill in derived values, in place.

    World size and rank default to env WORLD_SIZE / RANK, else 1 / 0. `defaults` are set
    where the value is still None (a different user value is kept, with a warning).
    Raises ArgumentError (one line naming the flags) on any invalid combination.
    """
    args.world_size = int(os.getenv("WORLD_SIZE", "1")) if world_size is None else world_size
    args.rank = int(os.getenv("RANK", "0")) if rank is None else rank
    if getattr(args, "local_rank", None) is None:
        args.local_rank = int(os.getenv("LOCAL_RANK", "0"))
    _apply_defaults(args, defaults or {})
    _fold_deprecated(args)
    _refuse_unsupported(args)
    for dest, flag in _REQUIRED:
        if getattr(args, dest, None) is None:
            raise ArgumentError(f"{flag} is required")
    _check_positive(args)
    _set_sequence_lengths(args)
    _set_parallel_layout(args)
    _set_model_shape(args)
    check_ds_sequence_parallel(args)
    _set_batch_sizes(args)
    _set_precision(args)
    _check_distributed_optimizer(args)
    _check_training_schedule(args)
    _check_token_schedule(args)
    _check_moe(args)
    check_distillation(args)
    _check_activation_checkpointing(args)
    _set_flash_attention(args)
    _check_logging_and_profiling(args)
    args.consumed_train_samples = 0
    args.consumed_train_tokens = 0
    args.consumed_valid_samples = 0
    if args.dataloader_type is None:
        args.dataloader_type = "single"
    args.ds_pipeline_enabled = _uses_deepspeed_pipeline(args)
    return args


def _uses_deepspeed_pipeline(args: argparse.Namespace) -> bool:
    """--deepspeed without --no-pipeline-parallel trains through DeepSpeed's PipelineEngine."""
    return bool(getattr(args, "deepspeed", False)) and not args.no_pipeline_parallel


def _warn(args: argparse.Namespace, message: str) -> None:
    if args.rank == 0:
        print(f"WARNING: {message}", flush=True)


def _apply_defaults(args: argparse.Namespace, defaults: dict) -> None:
    for key, value in defaults.items():
        current = getattr(args, key, None)
        if current is None:
            setattr(args, key, value)
        elif current != value:
            _warn(args, f"overriding default argument {key}={value!r} with {key}={current!r}")


def _fold_deprecated(args: argparse.Namespace) -> None:
    """--model-parallel-size, --batch-size, --warmup, --deepscale and --deepscale_config
    become their new flags."""
    if getattr(args, "model_parallel_size", None) is not None:
        if args.tensor_model_parallel_size not in (1, args.model_parallel_size):
            raise ArgumentError(
                f"--model-parallel-size ({args.model_parallel_size}) and "
                f"--tensor-model-parallel-size ({args.tensor_model_parallel_size}) disagree; "
                "give only --tensor-model-parallel-size"
            )
        args.tensor_model_parallel_size = args.model_parallel_size
        _warn(args, "--model-parallel-size is deprecated, use --tensor-model-parallel-size")
    if getattr(args, "batch_size", None) is not None:
        if args.micro_batch_size not in (None, args.batch_size):
            raise ArgumentError(
                f"--batch-size ({args.batch_size}) and --micro-batch-size "
                f"({args.micro_batch_size}) disagree; give only --micro-batch-size"
            )
        args.micro_batch_size = args.batch_size
        _warn(args, "--batch-size is deprecated, use --micro-batch-size")
    if getattr(args, "warmup", None) is not None:
        if args.lr_warmup_fraction is not None:
            raise ArgumentError(
                f"--warmup ({args.warmup}) and --lr-warmup-fraction "
                f"({args.lr_warmup_fraction}) both given; give only --lr-warmup-fraction"
            )
        args.lr_warmup_fraction = args.warmup
        _warn(args, "--warmup is deprecated, use --lr-warmup-fraction")
    # DeepSpeed's own deprecated spellings, which its config reading here does not look at.
    if getattr(args, "deepscale", False):
        args.deepspeed = True
        _warn(args, "--deepscale is deprecated, use --deepspeed")
    if getattr(args, "deepscale_config", None) is not None:
        if getattr(args, "deepspeed_config", None) not in (None, args.deepscale_config):
            raise ArgumentError(
                f"--deepscale_config ({args.deepscale_config}) and --deepspeed_config "
                f"({args.deepspeed_config}) disagree; give only --deepspeed_config")
        args.deepspeed_config = args.deepscale_config
        _warn(args, "--deepscale_config is deprecated, use --deepspeed_config")
    for name in ("model_parallel_size", "batch_size", "warmup"):
        if hasattr(args, name):
            delattr(args, name)


# Flags that must be >= 1 when given (0 or a negative value would fail later, deep inside).
_POSITIVE = (
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("num_attention_heads", "--num-attention-heads"),
    ("max_position_embeddings", "--max-position-embeddings"),
    ("ffn_hidden_size", "--ffn-hidden-size"),
    ("kv_channels", "--kv-channels"),
    ("seq_length", "--seq-length"),
    ("encoder_seq_length", "--encoder-seq-length"),
    ("decoder_seq_length", "--decoder-seq-length"),
    ("train_iters", "--train-iters"),
    ("train_samples", "--train-samples"),
    ("train_tokens", "--train-tokens"),
    ("lr_decay_tokens", "--lr-decay-tokens"),
    ("log_interval", "--log-interval"),
    ("eval_interval", "--eval-interval"),
    ("save_interval", "--save-interval"),
    ("tensorboard_log_interval", "--tensorboard-log-interval"),
    ("keep_last_checkpoints", "--keep-last-checkpoints"),
    ("make_vocab_size_divisible_by", "--make-vocab-size-divisible-by"),
)

# Flags that must be >= 0 when given.
_NON_NEGATIVE = (
    ("eval_iters", "--eval-iters"),
    ("lr_warmup_iters", "--lr-warmup-iters"),
    ("lr_warmup_samples", "--lr-warmup-samples"),
    ("lr_warmup_tokens", "--lr-warmup-tokens"),
    ("max_consecutive_skipped_iterations", "--max-consecutive-skipped-iterations"),
)


def _check_positive(args: argparse.Namespace) -> None:
    for bound, names in ((1, _POSITIVE), (0, _NON_NEGATIVE)):
        for dest, flag in names:
            value = getattr(args, dest, None)
            if value is not None and value < bound:
                raise ArgumentError(f"{flag} must be >= {bound} (got {value})")
    if args.distributed_timeout_minutes <= 0:
        raise ArgumentError(
            f"--distributed-timeout-minutes must be > 0 (got {args.distributed_timeout_minutes})")


def _set_sequence_lengths(args: argparse.Namespace) -> None:
    if args.encoder_seq_length is not None:
        if args.seq_length not in (None, args.encoder_seq_length):
            raise ArgumentError(
                f"--seq-length ({args.seq_length}) and --encoder-seq-length "
                f"({args.encoder_seq_length}) disagree; give one of them"
            )
        args.seq_length = args.encoder_seq_length
    elif args.seq_length is None:
        raise ArgumentError("--seq-length (or --encoder-seq-length) is required")
    else:
        args.encoder_seq_length = args.seq_length
    for flag, length in (
        ("--seq-length", args.seq_length),
        ("--decoder-seq-length", args.decoder_seq_length),
    ):
        if length is not None and args.max_position_embeddings < length:
            raise ArgumentError(
                f"--max-position-embeddings ({args.max_position_embeddings}) is smaller "
                f"than {flag} ({length})"
            )


def _set_parallel_layout(args: argparse.Namespace) -> None:
    """data_parallel_size, virtual pipeline size; layers and heads must split evenly."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    args.data_parallel_size = data_parallel_size(
        args.world_size, tp, pp, args.ds_sequence_parallel_size
    )
    if args.num_attention_heads % tp != 0:
        raise ArgumentError(
            f"--num-attention-heads ({args.num_attention_heads}) is not divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if args.decoder_seq_length is not None and pp > 1:  # an encoder-decoder (T5) run
        raise ArgumentError(
            f"--pipeline-model-parallel-size ({pp}) must be 1 for T5 (encoder-decoder models "
            "with --decoder-seq-length)"
        )
    # DeepSpeed's pipeline engine balances uneven stages itself; Megatron's needs equal ones.
    if args.num_layers % pp != 0 and not _uses_deepspeed_pipeline(args):
        raise ArgumentError(
            f"--num-layers ({args.num_layers}) is not divisible by "
            f"--pipeline-model-parallel-size ({pp})"
        )
    if args.num_layers_per_virtual_pipeline_stage is not None:
        args.virtual_pipeline_model_parallel_size = virtual_pipeline_size(
            args.num_layers, pp, args.num_layers_per_virtual_pipeline_stage
        )
    else:
        args.virtual_pipeline_model_parallel_size = None
    if tp > 1 and args.tp_comm_overlap and not args.sequence_parallel:
        raise ArgumentError(
            "--tp-comm-overlap overlaps the all-gathers and reduce-scatters of sequence "
            "parallelism with the GEMMs: add --sequence-parallel (or use "
            "--tp-comm-overlap-chunks N for the all-reduce of plain tensor parallelism)"
        )
    if args.sequence_parallel and args.ds_sequence_parallel_size > 1:
        raise ArgumentError(
            f"--ds-sequence-parallel-size ({args.ds_sequence_parallel_size}) cannot be "
            "combined with --sequence-parallel (Megatron's sequence parallelism)"
        )
    if tp == 1 and args.sequence_parallel:
        args.sequence_parallel = False  # nothing to split the sequence across
    if not args.sequence_parallel:
        args.tp_comm_overlap = False
    if args.tp_comm_overlap_chunks < 1:
        raise ArgumentError(
            f"--tp-comm-overlap-chunks must be at least 1 (got {args.tp_comm_overlap_chunks})"
        )
    if args.tp_comm_overlap_chunks > 1 and args.sequence_parallel:
        raise ArgumentError(
            "--tp-comm-overlap-chunks applies to the all-reduce of tensor parallelism "
            "without --sequence-parallel"
        )


def _set_model_shape(args: argparse.Namespace) -> None:
    if args.ffn_hidden_size is None:
        if args.swiglu:
            args.ffn_hidden_size = swiglu_ffn_hidden_size(args.hidden_size)
        else:
            args.ffn_hidden_size = ffn_hidden_size(args.hidden_size)
    if args.kv_channels is None:
        args.kv_channels = kv_channels(args.hidden_size, args.num_attention_heads)
    tp = args.tensor_model_parallel_size
    args.num_key_value_heads = num_key_value_heads(
        args.num_attention_heads, args.num_key_value_heads, tp
    )
    if args.use_rotary_position_embeddings:
        rotary_channels(args.kv_channels, args.rotary_percent)
        args.add_position_embedding = False  # RoPE replaces absolute positions
    elif not 0.0 < args.rotary_percent <= 1.0:
        raise ArgumentError(f"--rotary-percent must be in (0, 1] (got {args.rotary_percent})")
    if args.swiglu:
        swiglu_ffn_split(args.ffn_hidden_size, tp)
    if args.ffn_hidden_size % tp != 0:
        raise ArgumentError(
            f"--ffn-hidden-size ({args.ffn_hidden_size}) is not divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )


def _set_batch_sizes(args: argparse.Namespace) -> None:
    dp = args.data_parallel_size
    if args.micro_batch_size < 1:
        raise ArgumentError(f"--micro-batch-size ({args.micro_batch_size}) must be >= 1")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
        if args.rank == 0:
            print(f"setting global batch size to {args.global_batch_size}", flush=True)
    if args.rampup_batch_size is not None:
        if len(args.rampup_batch_size) != 3:
            raise ArgumentError(
                "--rampup-batch-size expects 3 values (<start batch size> <increment> "
                f"<ramp-up samples>), got {len(args.rampup_batch_size)}: "
                f"{' '.join(str(v) for v in args.rampup_batch_size)}"
            )
        if args.train_iters is not None:
            raise ArgumentError(
                "--rampup-batch-size needs sample-based training (--train-samples), "
                f"got --train-iters ({args.train_iters})"
            )
    else:
        num_microbatches(args.global_batch_size, args.micro_batch_size, dp)


def _set_precision(args: argparse.Namespace) -> None:
    import torch

    if args.fp16 and args.bf16:
        raise ArgumentError("--fp16 and --bf16 are mutually exclusive; give one")
    if args.fp16_lm_cross_entropy and not args.fp16:
        got = " (got --bf16)" if args.bf16 else ""
        raise ArgumentError(f"--fp16-lm-cross-entropy requires --fp16{got}")
    if args.fp32_residual_connection and not (args.fp16 or args.bf16):
        raise ArgumentError("--fp32-residual-connection requires --fp16 or --bf16")
    args.params_dtype = torch.float
    if args.fp16:
        args.params_dtype = torch.half
    if args.bf16:
        args.params_dtype = torch.bfloat16
        # bf16 gradients lose too much when summed in bf16; Megatron's DDP sums in fp32.
        if args.DDP_impl == "local":
            args.accumulate_allreduce_grads_in_fp32 = True
    if args.apply_query_key_layer_scaling:
        args.attention_softmax_in_fp32 = True
    uses_deepspeed = bool(getattr(args, "deepspeed", False))
    if args.accumulate_allreduce_grads_in_fp32 and not uses_deepspeed:
        if args.DDP_impl != "local":
            raise ArgumentError(
                "--accumulate-allreduce-grads-in-fp32 requires --DDP-impl local "
                f"(got --DDP-impl {args.DDP_impl})"
            )
        args.use_contiguous_buffers_in_local_ddp = True
    if args.DDP_impl == "torch":
        args.use_contiguous_buffers_in_local_ddp = False


def check_ds_sequence_parallel(args: argparse.Namespace) -> None:
    """--ds-sequence-parallel-size N: each of N ranks holds seq/N tokens of every sample
    and, inside attention, all tokens of heads/N of its tensor-parallel heads, so N must
    divide both; the combinations it does not support are refused by name."""
    sp = args.ds_sequence_parallel_size
    if sp == 1:
        return
    flag = f"--ds-sequence-parallel-size ({sp})"
    tp = args.tensor_model_parallel_size
    if args.seq_length % sp != 0:
        raise ArgumentError(f"--seq-length ({args.seq_length}) is not divisible by {flag}")
    for heads, name in ((args.num_attention_heads, "--num-attention-heads"),
                        (args.num_key_value_heads, "--num-key-value-heads")):
        if (heads // tp) % sp != 0:
            per_rank = f" / --tensor-model-parallel-size ({tp})" if tp > 1 else ""
            raise ArgumentError(f"{name} ({heads}){per_rank} is not divisible by {flag}")
    refused = (
        (args.pipeline_model_parallel_size > 1,
         f"--pipeline-model-parallel-size ({args.pipeline_model_parallel_size})"),
        (args.decoder_seq_length is not None, "--decoder-seq-length (encoder-decoder models)"),
        (args.DDP_impl == "torch", "--DDP-impl torch (gradients must be summed over the "
         "sequence ranks; use --DDP-impl local)"),
        (args.use_distributed_optimizer, "--use-distributed-optimizer (use --deepspeed with "
         "ZeRO stage 1 or 2)"),
        (getattr(args, "curriculum_learning", False), "--curriculum-learning"),
    )
    for given, other in refused:
        if given:
            raise ArgumentError(f"{flag} cannot be combined with {other}")


def _check_distributed_optimizer(args: argparse.Namespace) -> None:
    """--use-distributed-optimizer shards the local DDP's contiguous gradient buffers."""
    if not args.use_distributed_optimizer:
        return
    if getattr(args, "deepspeed", False):
        raise ArgumentError(
            "--use-distributed-optimizer is Megatron's own optimizer sharding and cannot be "
            "combined with --deepspeed; under DeepSpeed shard the optimizer with ZeRO "
            "(zero_optimization.stage >= 1 in --deepspeed_config)"
        )
    if args.DDP_impl != "local":
        raise ArgumentError(
            f"--use-distributed-optimizer requires --DDP-impl local (got --DDP-impl {args.DDP_impl})"
        )
    if not args.use_contiguous_buffers_in_local_ddp:
        raise ArgumentError(
            "--use-distributed-optimizer requires contiguous gradient buffers "
            "(drop --no-contiguous-buffers-in-local-ddp)"
        )
    if getattr(args, "cpu_optimizer", False):
        raise ArgumentError("--use-distributed-optimizer and --cpu-optimizer cannot be combined")
    if any(n > 1 for n in args.num_experts):
        raise ArgumentError(
            "--use-distributed-optimizer does not shard expert params (--num-experts > 1); "
            "train Mixture-of-Experts models with --deepspeed"
        )


def _check_training_schedule(args: argparse.Namespace) -> None:
    """Iteration-based and sample-based schedules must not be mixed."""
    if args.train_iters is not None and args.train_samples is not None:
        raise ArgumentError(
            f"--train-iters ({args.train_iters}) and --train-samples ({args.train_samples}) "
            "both given; give one"
        )
    if args.train_iters is not None:
        for flag, value in (
            ("--lr-decay-samples", args.lr_decay_samples),
            ("--lr-warmup-samples", args.lr_warmup_samples or None),
        ):
            if value is not None:
                raise ArgumentError(
                    f"iteration-based training (--train-iters {args.train_iters}) "
                    f"cannot use {flag} ({value}); use the -iters flag"
                )
    if args.train_samples is not None:
        for flag, value in (
            ("--lr-decay-iters", args.lr_decay_iters),
            ("--lr-warmup-iters", args.lr_warmup_iters or None),
        ):
            if value is not None:
                raise ArgumentError(
                    f"sample-based training (--train-samples {args.train_samples}) "
                    f"cannot use {flag} ({value}); use the -samples flag"
                )
    if args.lr_warmup_fraction is not None:
        for flag, value in (
            ("--lr-warmup-iters", args.lr_warmup_iters),
            ("--lr-warmup-samples", args.lr_warmup_samples),
        ):
            if value:
                raise ArgumentError(
                    f"--lr-warmup-fraction ({args.lr_warmup_fraction}) and {flag} ({value}) "
                    "both given; give one"
                )
    _check_warmup_span(args)
    if args.lr is not None and args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr ({args.min_lr}) is larger than --lr ({args.lr})")


def _check_warmup_span(args: argparse.Namespace) -> None:
    """Warm-up must end before the decay span does (the decay would divide by zero)."""
    for unit, total in (("iters", args.train_iters), ("samples", args.train_samples)):
        warmup = getattr(args, f"lr_warmup_{unit}")
        if total is None or not warmup:
            continue
        decay = getattr(args, f"lr_decay_{unit}")
        span_flag = f"--lr-decay-{unit}" if decay is not None else f"--train-{unit}"
        span = decay if decay is not None else total
        if warmup >= span:
            raise ArgumentError(
                f"--lr-warmup-{unit} ({warmup}) must be smaller than {span_flag} ({span}): "
                "the learning rate decays over the steps after warm-up"
            )
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction < 1:
        raise ArgumentError(
            f"--lr-warmup-fraction ({args.lr_warmup_fraction}) must be in [0, 1)")


def _check_token_schedule(args: argparse.Namespace) -> None:
    """--train-tokens stops a run that --train-iters/--train-samples bounds as well; the
    token warm-up is part of a token decay."""
    if args.train_tokens is not None and args.train_iters is None and args.train_samples is None:
        raise ArgumentError(
            "--train-tokens needs --train-iters or --train-samples as well (they size the "
            "datasets; the run stops at whichever limit comes first)")
    if args.lr_warmup_tokens is not None:
        if args.lr_decay_tokens is None:
            raise ArgumentError(
                f"--lr-warmup-tokens ({args.lr_warmup_tokens}) needs --lr-decay-tokens")
        for flag, value in (("--lr-warmup-fraction", args.lr_warmup_fraction),
                            ("--lr-warmup-iters", args.lr_warmup_iters or None),
                            ("--lr-warmup-samples", args.lr_warmup_samples or None)):
            if value is not None:
                raise ArgumentError(
                    f"--lr-warmup-tokens ({args.lr_warmup_tokens}) and {flag} ({value}) "
                    "both given; give one")
        if args.lr_warmup_tokens >= args.lr_decay_tokens:
            raise ArgumentError(
                f"--lr-warmup-tokens ({args.lr_warmup_tokens}) must be smaller than "
                f"--lr-decay-tokens ({args.lr_decay_tokens})")


# Flags Megatron-DeepSpeed accepts whose feature this implementation does not have: giving
# one (with a value other than its inert default) is an error rather than a silent no-op.
UNSUPPORTED_FLAGS = (
    ("adlr_autoresume", "--adlr-autoresume", False,
     "ADLR's cluster auto-resume (userlib); use --exit-signal-handler or "
     "--exit-duration-in-mins"),
    ("adlr_autoresume_interval", "--adlr-autoresume-interval", 1000,
     "ADLR's cluster auto-resume (userlib)"),
    ("cpu_torch_adam", "--cpu_torch_adam", False,
     "torch's Adam on CPU; use --cpu-optimizer or DeepSpeed's offload config"),
    ("lazy_mpu_init", "--lazy-mpu-init", False, "deferred process-group creation"),
    ("memory_centric_tiled_linear", "--memory-centric-tiled-linear", False,
     "DeepSpeed TiledLinear"),
    ("tile_factor", "--tile-factor", 1, "DeepSpeed TiledLinear"),
    ("scattered_embeddings", "--scattered-embeddings", False, "ZeRO-3 scattered embeddings"),
    ("split_transformers", "--split-transformers", False, "ZeRO-3 split transformer layers"),
    ("profile_backward", "--profile-backward", False, "profiling the recomputation"),
    ("retriever_seq_length", "--retriever-seq-length", 256, "the ICT/REALM retriever"),
    ("sample_rate", "--sample-rate", 1.0, "data sub-sampling"),
    ("enable_zbh1_pipeline", "--enable-zbh1-pipeline", False,
     "the zero-bubble (ZB-H1) pipeline schedule; use the 1F1B or interleaved schedule"),
    ("enable_zbh1_exact_semantics", "--enable-zbh1-exact-semantics", False,
     "the zero-bubble (ZB-H1) pipeline schedule"),
    ("random_ltd", "--random-ltd", False,
     "random layer-token drop (random-LTD, DeepSpeed's data-efficiency library)"),
    ("data_efficiency_curriculum_learning", "--data-efficiency-curriculum-learning", False,
     "DeepSpeed's data-efficiency library curriculum learning; use --curriculum-learning "
     "(the sequence-length curriculum of the DeepSpeed config)"),
)

# Sections of a --deepspeed_config that select features this implementation does not have.
UNSUPPORTED_DEEPSPEED_CONFIG = (
    ("compression_training", "DeepSpeed compression (compression_training)"),
    ("data_efficiency", "DeepSpeed's data-efficiency library (data_efficiency: data "
     "sampling, random-LTD)"),
)


def _refuse_unsupported(args: argparse.Namespace) -> None:
    for dest, flag, inert, feature in UNSUPPORTED_FLAGS:
        value = getattr(args, dest, inert)
        if value is not None and value != inert:
            raise ArgumentError(f"{flag}: {feature} is not supported here")
    _refuse_unsupported_deepspeed_config(args)


def _refuse_unsupported_deepspeed_config(args: argparse.Namespace) -> None:
    """A --deepspeed_config that enables compression or the data-efficiency library."""
    import json

    path = getattr(args, "deepspeed_config", None)
    if not getattr(args, "deepspeed", False) or not isinstance(path, str) or not os.path.isfile(
            path):
        return  # no file yet: the engine reports a missing config
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ArgumentError(f"--deepspeed_config {path}: not a JSON file ({exc})") from None
    for key, feature in UNSUPPORTED_DEEPSPEED_CONFIG:
        section = config.get(key) if isinstance(config, dict) else None
        if section and (not isinstance(section, dict) or section.get("enabled", True)):
            raise ArgumentError(
                f"--deepspeed_config {path}: {feature} is not supported here (remove "
                f"the {key!r} section)")


def _check_moe(args: argparse.Namespace) -> None:
    experts = list(args.num_experts)
    moe_layers = num_moe_layers(args.num_layers, args.expert_interval)
    if len(experts) not in (1, moe_layers):
        raise ArgumentError(
            f"--num-experts has {len(experts)} values; give 1 or one per MoE layer "
            f"({moe_layers} = --num-layers {args.num_layers} // --expert-interval "
            f"{args.expert_interval})"
        )
    ep = args.moe_expert_parallel_size
    if ep < 1 or args.data_parallel_size % ep != 0:
        raise ArgumentError(
            f"--moe-expert-parallel-size ({ep}) does not divide the data-parallel size "
            f"({args.data_parallel_size})"
        )
    for n in experts:
        if n > 1 and n % ep != 0:
            raise ArgumentError(
                f"--moe-expert-parallel-size ({ep}) does not divide --num-experts ({n})"
            )


def _check_activation_checkpointing(args: argparse.Namespace) -> None:
    """Resolve the recompute flags into recompute_granularity / recompute_method /
    recompute_num_layers / distribute_saved_activations, as Megatron-DeepSpeed does:
    --recompute-activations is selective, --checkpoint-activations full and uniform with
    --checkpoint-num-layers layers per chunk; checkpoint_activations then says whether
    whole layers are recomputed. --activations-checkpoint-method is --recompute-method by
    its older name, and alone asks for full recompute."""
    old_method = args.activations_checkpoint_method
    if old_method is not None:
        if args.recompute_method not in (None, old_method):
            raise ArgumentError(
                f"--activations-checkpoint-method ({old_method}) and --recompute-method "
                f"({args.recompute_method}) disagree; give only --recompute-method")
        if args.recompute_activations or args.recompute_granularity == "selective":
            raise ArgumentError(
                f"--activations-checkpoint-method ({old_method}) applies to full recompute, "
                "not selective (--recompute-activations / --recompute-granularity selective)")
        args.recompute_method = old_method
        if args.recompute_granularity is None:
            args.recompute_granularity = "full"
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            raise ArgumentError(
                "--recompute-activations (selective) contradicts --recompute-granularity full"
            )
        args.recompute_granularity = "selective"
    if args.checkpoint_activations:
        if args.recompute_granularity == "selective":
            raise ArgumentError(
                "--checkpoint-activations (full recompute) contradicts selective recompute "
                "(--recompute-activations / --recompute-granularity selective)"
            )
        args.recompute_granularity = "full"
        args.recompute_method = args.recompute_method or "uniform"
        if args.recompute_num_layers is None:
            args.recompute_num_layers = args.checkpoint_num_layers
    if args.recompute_granularity == "full" and args.recompute_method is None:
        raise ArgumentError(
            "--recompute-granularity full needs --recompute-method uniform|block"
        )
    if args.recompute_granularity == "selective" and args.recompute_method is not None:
        raise ArgumentError(
            "--recompute-method applies to --recompute-granularity full, not selective"
        )
    if args.recompute_num_layers is None:
        args.recompute_num_layers = 1
    if args.recompute_num_layers < 1:
        raise ArgumentError(f"--recompute-num-layers must be >= 1, got {args.recompute_num_layers}")
    args.checkpoint_activations = args.recompute_granularity == "full"
    args.checkpoint_num_layers = args.recompute_num_layers
    flag = "--distribute-saved-activations"
    if args.distribute_checkpointed_activations and not args.distribute_saved_activations:
        flag = "--distribute-checkpointed-activations"  # the older spelling: TP=1 allowed
    args.distribute_saved_activations = (
        args.distribute_saved_activations or args.distribute_checkpointed_activations
    )
    args.distribute_checkpointed_activations = args.distribute_saved_activations
    if args.distribute_saved_activations:
        if args.recompute_granularity != "full":
            raise ArgumentError(
                f"{flag} applies to full recompute (--checkpoint-activations or "
                "--recompute-granularity full)"
            )
        if flag == "--distribute-saved-activations" and args.tensor_model_parallel_size == 1:
            raise ArgumentError(
                "--distribute-saved-activations splits over tensor-parallel ranks: it needs "
                "--tensor-model-parallel-size > 1"
            )
    if args.deepspeed_activation_checkpointing and args.recompute_granularity is None:
        raise ArgumentError(
            "--deepspeed-activation-checkpointing requires recompute (--checkpoint-activations, "
            "--recompute-granularity full|selective or --recompute-activations)"
        )


def _check_logging_and_profiling(args: argparse.Namespace) -> None:
    """wandb needs a folder; --profile a window, ranks that exist and a trace folder."""
    if (args.wandb_project or args.wandb_exp_name) and not (args.wandb_save_dir or args.save):
        raise ArgumentError(
            "--wandb-project / --wandb-exp-name need --wandb-save-dir or --save (the run "
            "files go to <--save>/wandb)")
    start, end = args.profile_step_start, args.profile_step_end
    if (start is None) != (end is None):
        raise ArgumentError("--profile-step-start and --profile-step-end go together")
    if args.profile is None:
        if start is not None or args.profile_ranks is not None:
            flag = "--profile-step-start" if start is not None else "--profile-ranks"
            raise ArgumentError(f"{flag} needs --profile pt|pt-full")
        return
    if start is not None:
        if not 0 <= start < end:
            raise ArgumentError(
                f"--profile-step-start ({start}) must be >= 0 and smaller than "
                f"--profile-step-end ({end})")
    else:
        parts = args.profile_steps.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not (
                1 <= int(parts[0]) <= int(parts[1])):
            raise ArgumentError(
                f"--profile_steps {args.profile_steps!r}: expected <first>,<last> with "
                "1 <= first <= last (e.g. 2,3)")
    for rank in args.profile_ranks or ():
        if not 0 <= rank < args.world_size:
            raise ArgumentError(
                f"--profile-ranks {rank}: no such rank (world size {args.world_size})")
    if not args.tensorboard_dir:
        raise ArgumentError(f"--profile {args.profile} writes its traces under "
                            "--tensorboard-dir: give one")


def _set_flash_attention(args: argparse.Namespace) -> None:
    """Fold Megatron-DeepSpeed's flash-attention flags into use_flash_attn (once: a second
    validation keeps what the first decided) and say on rank 0 which kernel runs."""
    if hasattr(args, "flash_attn_flag"):
        return
    given = [flag for flag in FLASH_ATTN_FLAGS[2:]
             if getattr(args, flag[2:].replace("-", "_"), False)]
    if args.use_flash_attn:
        given.insert(0, "--use-flash-attn")
    args.use_flash_attn = bool(given)
    args.flash_attn_flag = given[0] if given else None
    if given and args.rank == 0:
        print(f"> flash attention: {' '.join(given)} runs torch scaled_dot_product_attention "
              "(flash/cuDNN/efficient backends as available)", flush=True)


def print_args(args: argparse.Namespace) -> None:
    """Print every argument, sorted, between Megatron's banner lines (rank 0 only)."""
    if getattr(args, "rank", 0) != 0:
        return
    lines = [f"  {name} {'.' * (48 - len(name))} {value}" for name, value in vars(args).items()]
    print("------------------------ arguments ------------------------", flush=True)
    for line in sorted(lines, key=str.lower):
        print(line, flush=True)
    print("-------------------- end of arguments ---------------------", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m megatron.arguments <flags>`: validate a launch command and print it."""
    parse_args(args_list=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
