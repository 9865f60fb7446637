"""Build the optimizer from the command-line flags: param groups, Adam/SGD, precision wrapper."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from megatron import get_args, print_rank_0

from .clip_grads import clip_grad_norm_fp32, count_zeros_fp32
from .distrib_optimizer import DistributedOptimizer
from .grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler
from .optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer, MegatronOptimizer

__all__ = [
    "get_megatron_optimizer",
    "get_param_groups",
    "clip_grad_norm_fp32",
    "count_zeros_fp32",
    "ConstantGradScaler",
    "DynamicGradScaler",
    "MegatronGradScaler",
    "MegatronOptimizer",
    "FP32Optimizer",
    "Float16OptimizerWithFloat16Params",
    "DistributedOptimizer",
]

ParamCond = Callable[[str, torch.nn.Parameter], bool]


def _default_no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and every 1-D param (layer-norm weights and biases) get no weight decay."""
    return name.endswith(".bias") or param.dim() == 1


def get_param_groups(
    model_chunks: torch.nn.Module | List[torch.nn.Module],
    no_weight_decay_cond: ParamCond | None = None,
    scale_lr_cond: ParamCond | None = None,
    lr_mult: float = 1.0,
    weight_decay: float = 0.0,
) -> List[Dict]:
    """Param groups keyed by (weight decay or not, lr scaled or not), empty groups dropped.

    A param gets ``weight_decay`` unless ``no_weight_decay_cond(name, param)`` (default:
    biases and 1-D params); its group has ``lr_mult`` when ``scale_lr_cond(name, param)``,
    else 1.0 (the lr scheduler multiplies each group's lr by its ``lr_mult``).
    """
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    no_wd = no_weight_decay_cond or _default_no_weight_decay
    buckets: Dict[tuple, List[torch.nn.Parameter]] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            decay = not no_wd(name, param)
            scaled = scale_lr_cond is not None and scale_lr_cond(name, param)
            buckets.setdefault((decay, scaled), []).append(param)
    groups = []
    for decay, scaled in ((True, False), (False, False), (True, True), (False, True)):
        params = buckets.get((decay, scaled))
        if not params:
            continue
        name = "weight_decay_params" if decay else "no_weight_decay_params"
        groups.append(
            {
                "name": name + ("_lr_mult" if scaled else ""),
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_mult": lr_mult if scaled else 1.0,
            }
        )
    return groups


def _get_params_for_weight_decay_optimization(
    modules: torch.nn.Module | List[torch.nn.Module], weight_decay: float = 0.0
) -> List[Dict]:
    """Megatron's name: weight-decay and no-weight-decay (biases, norms) groups."""
    return get_param_groups(modules, weight_decay=weight_decay)


def _is_moe_param(param: torch.Tensor) -> bool:
    """Expert params are marked ``allreduce=False`` (reduced over expert-data-parallel)."""
    return getattr(param, "allreduce", True) is False


def split_moe_param_groups(param_groups: List[Dict]) -> List[Dict]:
    """Move expert params of each group into a copy of it marked ``'moe': True``.

    Expert params with different ``group_name`` (expert-parallel layouts) go to separate
    groups, each named after it, as DeepSpeed's MoE-aware optimizers expect.
    """
    out = []
    for group in param_groups:
        dense, experts = [], {}
        for param in group["params"]:
            if _is_moe_param(param):
                experts.setdefault(getattr(param, "group_name", "moe"), []).append(param)
            else:
                dense.append(param)
        if dense:
            out.append({**group, "params": dense})
        for group_name, params in experts.items():
            name = f"{group.get('name', 'params')}_moe_{group_name}"
            out.append({**group, "params": params, "moe": True, "name": name})
    return out


def _build_inner_optimizer(args, param_groups: List[Dict]) -> torch.optim.Optimizer:
    """Adam (apex FusedAdam when it imports on a GPU, else torch AdamW) or SGD."""
    from megatron.accelerator import is_gpu

    if args.optimizer == "adam":
        betas = (args.adam_beta1, args.adam_beta2)
        if getattr(args, "cpu_optimizer", False):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(
                param_groups,
                lr=args.lr,
                weight_decay=args.weight_decay,
                betas=betas,
                eps=args.adam_eps,
                adamw_mode=True,
            )
        if is_gpu():
            try:
                from apex.optimizers import FusedAdam
            except ImportError:
                FusedAdam = None
            if FusedAdam is not None:
                return FusedAdam(
                    param_groups,
                    lr=args.lr,
                    weight_decay=args.weight_decay,
                    betas=betas,
                    eps=args.adam_eps,
                )
        # Decoupled weight decay, like apex FusedAdam's default adam_w_mode.
        return torch.optim.AdamW(
            param_groups,
            lr=args.lr,
            weight_decay=args.weight_decay,
            betas=betas,
            eps=args.adam_eps,
            fused=True if is_gpu() else None,
            foreach=None if is_gpu() else True,
        )
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=args.lr,
            weight_decay=args.weight_decay,
            momentum=args.sgd_momentum,
        )
    raise ValueError(f"optimizer/__init__.py: --optimizer {args.optimizer!r} is not adam or sgd")


def _build_grad_scaler(args) -> MegatronGradScaler | None:
    """--loss-scale gives a constant scaler; fp16 without it a dynamic one; bf16 none."""
    if getattr(args, "loss_scale", None):
        return ConstantGradScaler(args.loss_scale)
    if args.fp16:
        return DynamicGradScaler(
            initial_scale=args.initial_loss_scale,
            min_scale=args.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=args.loss_scale_window,
            hysteresis=args.hysteresis,
        )
    return None


def get_megatron_optimizer(
    model_chunks: torch.nn.Module | List[torch.nn.Module],
    no_weight_decay_cond: ParamCond | None = None,
    scale_lr_cond: ParamCond | None = None,
    lr_mult: float = 1.0,
    bare: bool | None = None,
    moe_param_groups: bool | None = None,
):
    """The optimizer for ``model_chunks`` as the flags ask for.

    With ``bare`` (default: under --deepspeed) the torch optimizer itself (DeepSpeed's
    engine wraps it); with --use-distributed-optimizer a :class:`DistributedOptimizer`
    (``model_chunks`` must then be the DDP-wrapped chunks); otherwise an
    :class:`FP32Optimizer` or, with --fp16/--bf16, a
    :class:`Float16OptimizerWithFloat16Params`. With the local DDP (--DDP-impl local) the
    grads are read from ``param.main_grad``. Expert parameters get their own param groups
    with --create-moe-param-group or ``moe_param_groups``.
    """
    from megatron.utils import unwrap_model

    args = get_args()
    wrapped = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    param_groups = get_param_groups(
        unwrap_model(wrapped), no_weight_decay_cond, scale_lr_cond, lr_mult, args.weight_decay
    )
    if moe_param_groups or getattr(args, "create_moe_param_group", False):
        param_groups = split_moe_param_groups(param_groups)
    optimizer = _build_inner_optimizer(args, param_groups)

    if bare or (bare is None and getattr(args, "deepspeed", False)):
        return optimizer

    params_have_main_grad = getattr(args, "DDP_impl", "local") == "local"
    log_num_zeros = getattr(args, "log_num_zeros_in_grad", False)
    if getattr(args, "use_distributed_optimizer", False):
        scaler = _build_grad_scaler(args) if (args.fp16 or args.bf16) else None
        return DistributedOptimizer(optimizer, args.clip_grad, log_num_zeros, scaler, wrapped)
    if args.fp16 or args.bf16:
        grad_scaler = _build_grad_scaler(args)
        if grad_scaler is not None:
            print_rank_0(f"> loss scale: {type(grad_scaler).__name__}")
        return Float16OptimizerWithFloat16Params(
            optimizer,
            args.clip_grad,
            log_num_zeros,
            params_have_main_grad,
            args.bf16,
            grad_scaler,
        )
    return FP32Optimizer(optimizer, args.clip_grad, log_num_zeros, params_have_main_grad)
