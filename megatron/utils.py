"""Small utilities shared by training, entry scripts and tasks."""

from __future__ import annotations

import torch

from . import print_rank_0


def unwrap_model(model, module_instances=None):
    """Strip DDP / Float16Module / DeepSpeed wrappers (a model or a list of chunks)."""
    from .model import Float16Module
    from .model.distributed import DistributedDataParallel as LocalDDP

    if module_instances is None:
        module_instances = (torch.nn.parallel.DistributedDataParallel, LocalDDP, Float16Module)
    return_list = isinstance(model, list)
    models = model if return_list else [model]
    unwrapped = []
    for m in models:
        while isinstance(m, module_instances) or type(m).__name__ == "DeepSpeedEngine":
            m = m.module
        unwrapped.append(m)
    return unwrapped if return_list else unwrapped[0]


def average_losses_across_data_parallel_group(losses):
    """Mean of each loss over the data-parallel group (for logging)."""
    from . import mpu

    averaged = torch.cat([loss.clone().detach().view(1) for loss in losses])
    torch.distributed.all_reduce(averaged, group=mpu.get_data_parallel_group())
    return averaged / torch.distributed.get_world_size(group=mpu.get_data_parallel_group())


def get_ltor_masks_and_position_ids(data, eod_token: int, reset_position_ids: bool,
                                    reset_attention_mask: bool, eod_mask_loss: bool,
                                    skip_mask: bool = False):
    """Left-to-right masks and position ids for a [b, s] batch of token ids.

    Returns (attention_mask [b or 1, 1, s, s] bool, True = masked out; loss_mask [b, s]
    float; position_ids [b, s]). With reset_position_ids / reset_attention_mask, positions
    restart and attention is blocked after every end-of-document token, so documents packed
    into one sample do not attend to each other. `skip_mask` (plain causal attention
    through is_causal, no reset_attention_mask) returns None for the mask: no [s, s]
    tensor is built.
    """
    micro_batch_size, seq_length = data.size()
    if skip_mask and reset_attention_mask:
        raise ValueError("get_ltor_masks_and_position_ids: skip_mask with reset_attention_mask")
    att_mask_batch = micro_batch_size if reset_attention_mask else 1
    attention_mask = None
    if not skip_mask:
        attention_mask = torch.tril(
            torch.ones((att_mask_batch, seq_length, seq_length), device=data.device)
        ).view(att_mask_batch, 1, seq_length, seq_length)

    loss_mask = torch.ones(data.size(), dtype=torch.float, device=data.device)
    if eod_mask_loss:
        loss_mask[data == eod_token] = 0.0

    position_ids = torch.arange(seq_length, dtype=torch.long, device=data.device)
    position_ids = position_ids.unsqueeze(0).expand_as(data)
    if reset_position_ids:
        position_ids = position_ids.clone()

    if reset_position_ids or reset_attention_mask:
        for b in range(micro_batch_size):
            eod_index = position_ids[b, data[b] == eod_token]
            if reset_position_ids:
                eod_index = eod_index.clone()
            prev_index = 0
            for j in range(eod_index.size(0)):
                i = int(eod_index[j])
                if reset_attention_mask:
                    attention_mask[b, 0, (i + 1):, : (i + 1)] = 0
                if reset_position_ids:
                    position_ids[b, (i + 1):] -= i + 1 - prev_index
                    prev_index = i + 1

    if attention_mask is not None:
        attention_mask = attention_mask < 0.5
    return attention_mask, loss_mask, position_ids


def num_floating_point_operations(batch_size: int, seq_length: int, num_layers: int,
                                  hidden_size: int, vocab_size: int,
                                  recompute: bool = False, *,
                                  num_attention_heads: int | None = None,
                                  kv_channels: int | None = None,
                                  num_key_value_heads: int | None = None,
                                  ffn_hidden_size: int | None = None,
                                  swiglu: bool = False) -> float:
    """Model FLOPs of one iteration (forward + backward, and with full activation recompute
    one more forward of the layers), counting the GEMMs and the attention products.

    Per layer and token, the forward pass costs 2·h·(a·d + 2·g·d) for the query and
    key/value projections (a heads, g key/value heads, d = kv_channels), 4·s·a·d for the
    scores and the weighted sum, 2·a·d·h for the output projection and 4·h·f for the MLP
    (6·h·f with SwiGLU's extra gate GEMM). The layer total is scaled by c/24 and the
    logits add c·B·s·h·V/16, with c = 72, or 96 with recompute. For GPT (a·d = h, g = a,
    f = 4h) this is the Megatron paper's c·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))."""
    c = 96 if recompute else 72
    h, s = hidden_size, seq_length
    heads = num_attention_heads
    d = kv_channels or (h // heads if heads else None)
    if heads is None or d is None:  # the GPT shape: a·d = h, g = a
        projection, groups = h, None
    else:
        projection, groups = heads * d, (num_key_value_heads or heads)
    kv_projection = projection if groups is None else groups * d
    ffn = ffn_hidden_size or 4 * h
    per_token = (
        2 * h * (projection + 2 * kv_projection)
        + 4 * s * projection
        + 2 * projection * h
        + (6 if swiglu else 4) * h * ffn
    )
    tokens = batch_size * s
    return (c / 24.0) * num_layers * tokens * per_token + c * tokens * h * vocab_size / 16.0


def model_flops_per_iteration(args, batch_size: int, seq_length: int) -> float:
    """num_floating_point_operations for the model the flags in `args` describe."""
    return num_floating_point_operations(
        batch_size, seq_length, args.num_layers, args.hidden_size, args.padded_vocab_size,
        recompute=getattr(args, "checkpoint_activations", False),
        num_attention_heads=args.num_attention_heads,
        kv_channels=getattr(args, "kv_channels", None),
        num_key_value_heads=getattr(args, "num_key_value_heads", None),
        ffn_hidden_size=getattr(args, "ffn_hidden_size", None),
        swiglu=getattr(args, "swiglu", False),
    )


def calc_params_l2_norm(model) -> float:
    """L2 norm of the parameters across the model-parallel group (duplicates counted once)."""
    from . import mpu
    from .mpu.layers import param_is_not_tensor_parallel_duplicate

    models = model if isinstance(model, list) else [model]
    params = []
    for m in models:
        for p in m.parameters():
            if not getattr(p, "shared", False) and param_is_not_tensor_parallel_duplicate(p):
                params.append(p.detach().float())
    norm = torch.zeros((), dtype=torch.float, device=params[0].device if params else "cpu")
    for p in params:
        norm += p.norm() ** 2
    torch.distributed.all_reduce(norm, group=mpu.get_model_parallel_group())
    return norm.item() ** 0.5


def _named_tensors(models) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the model chunks (ZeRO-3: its partition)."""
    named = []
    for i, m in enumerate(models):
        prefix = f"model{i}." if len(models) > 1 else ""
        for name, p in m.named_parameters():
            tensor = getattr(p, "ds_tensor", None)
            named.append((prefix + name, (p if tensor is None else tensor).detach()))
    return named


def first_non_finite(models) -> str | None:
    """This rank's first parameter holding NaN or inf (one isfinite reduction each)."""
    named = [(n, t) for n, t in _named_tensors(models) if t.numel()]
    if not named:
        return None
    from .accelerator import current_device

    device = current_device()
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def first_non_finite_parameter(model) -> str | None:
    """The name of the first parameter holding NaN or inf on any rank, or None; every rank
    must call it (one all-reduce over the world)."""
    from .accelerator import current_device

    bad_name = first_non_finite(model if isinstance(model, list) else [model])
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    flag = torch.tensor([rank if bad_name is not None else -1], device=current_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if int(flag.item()) < 0:
        return None
    return bad_name if bad_name is not None else f"a parameter on rank {int(flag.item())}"


def report_memory(name: str) -> str:
    """One line of device memory use in MB (allocated, max allocated, reserved)."""
    from .accelerator import get_accelerator, is_gpu

    if not is_gpu():
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        string = f"{name} memory (MB) | max rss: {rss:.1f}"
    else:
        acc = get_accelerator()
        mb = 1024.0 * 1024.0
        string = (f"{name} memory (MB) | allocated: {acc.memory_allocated() / mb:.1f} | "
                  f"max allocated: {acc.max_memory_allocated() / mb:.1f} | "
                  f"reserved: {acc.memory_reserved() / mb:.1f} | "
                  f"max reserved: {acc.max_memory_reserved() / mb:.1f}")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    print(f"[Rank {rank}] {string}", flush=True)
    return string


def print_params_min_max_norm(optimizer, iteration: int) -> None:
    """Debug print of every parameter's min, max and norm."""
    index = 0
    rank = torch.distributed.get_rank()
    for group in optimizer.param_groups:
        for p in group["params"]:
            index += 1
            print(f"iteration {iteration} rank {rank} param {index} "
                  f"min {p.min().item():.6E} max {p.max().item():.6E} "
                  f"norm {torch.linalg.norm(p.data).item():.6E}", flush=True)


__all__ = [
    "unwrap_model",
    "average_losses_across_data_parallel_group",
    "get_ltor_masks_and_position_ids",
    "model_flops_per_iteration",
    "num_floating_point_operations",
    "calc_params_l2_norm",
    "report_memory",
    "print_params_min_max_norm",
    "print_rank_0",
]
