"""Knowledge distillation (--kd) and Mixture-of-Students (--mos), as Megatron-DeepSpeed has them.

A teacher GPT of its own shape (--num-layers-teacher, --hidden-size-teacher,
--num-attention-heads-teacher, --num-experts-teacher) is built next to the student, loaded
from --load-teacher and kept in eval mode without gradients. Each training micro-batch
runs it on the student's tokens, and the student's loss becomes

    loss = alpha_ce * LM + moe + beta_ce * T^2 * mean_{b,s} KL(softmax(z_t/T) || softmax(z_s/T))

(Megatron-DeepSpeed's KLDivLoss(reduction="batchmean") over [b, s, V], divided by the
sequence length: the mean over every token, with no loss mask). alpha_ce defaults to 1;
Megatron-DeepSpeed parses it but always weighs the LM loss by 1. --mos is the same loss
(its teacher typically a larger MoE), logged as "mos loss" instead of "kd loss".
Evaluation runs the student alone.

Under tensor parallelism both logits are split over the vocabulary, [b, s, V/p] on each
rank. The KL needs the full softmax, so it is computed like the vocab-parallel cross
entropy, from per-token scalars all-reduced over the tensor-parallel group:

    log p(v) = z_v/T - m - log(sum_u exp(z_u/T - m)),   m = max_u z_u/T  (MAX, SUM reduces)
    KL       = sum_v p_t(v) (log p_t(v) - log p_s(v))                    (SUM reduce)

and the gradient with respect to the local student logits is (p_s - p_t)[f_r:l_r] / T.
"""

from __future__ import annotations

import copy
import os
import re

import torch

from . import mpu
from .mpu.initialize import get_tensor_model_parallel_group, get_tensor_model_parallel_world_size

__all__ = ["vocab_parallel_kl_div", "distillation_loss", "teacher_args", "get_teacher",
           "teacher_logits", "kd_log_key"]


def _all_reduce(tensor: torch.Tensor, op) -> None:
    if get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=op, group=get_tensor_model_parallel_group())


def _vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the whole (split) vocabulary of [..., V/p] fp32 logits."""
    logits_max = logits.max(dim=-1)[0]  # [...]
    _all_reduce(logits_max, torch.distributed.ReduceOp.MAX)
    shifted = logits - logits_max.unsqueeze(-1)  # [..., V/p], <= 0
    sum_exp = shifted.exp().sum(dim=-1)  # [...]
    _all_reduce(sum_exp, torch.distributed.ReduceOp.SUM)
    return shifted - sum_exp.log().unsqueeze(-1)  # [..., V/p]


class _VocabParallelKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature):
        # student_logits, teacher_logits: [b, s, V/p] this rank's vocabulary slice, in
        # fp32 at least (half-precision logits are upcast)
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        log_p_s = _vocab_parallel_log_softmax(student_logits.to(dtype) / temperature)
        log_p_t = _vocab_parallel_log_softmax(teacher_logits.to(dtype) / temperature)
        p_t = log_p_t.exp()  # [b, s, V/p]
        kl = (p_t * (log_p_t - log_p_s)).sum(dim=-1)  # [b, s], this rank's share
        _all_reduce(kl, torch.distributed.ReduceOp.SUM)
        ctx.save_for_backward(log_p_s.exp_().sub_(p_t))  # p_s - p_t, [b, s, V/p]
        ctx.temperature = temperature
        ctx.dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_output):
        (diff,) = ctx.saved_tensors
        grad = diff.mul_(grad_output.unsqueeze(-1) / ctx.temperature)  # [b, s, V/p]
        return grad.to(ctx.dtype), None, None


def vocab_parallel_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(softmax(teacher/T) || softmax(student/T)) of vocabulary-split logits
    [b, s, V/p]: [b, s], the same on every tensor-parallel rank. The teacher gets no
    gradient."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher and student logits differ in shape: student "
                         f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}")
    return _VocabParallelKLDiv.apply(student_logits, teacher_logits.detach(), float(temperature))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, beta: float) -> torch.Tensor:
    """beta * T^2 * the mean over all b*s tokens of the per-token KL (a scalar)."""
    kl = vocab_parallel_kl_div(student_logits, teacher_logits, temperature)  # [b, s]
    return kl.mean() * (beta * temperature * temperature)


def kd_log_key(args) -> str:
    """The log column of the distillation term: "mos loss" under --mos, else "kd loss"."""
    return "mos loss" if args.mos else "kd loss"


def _teacher_shape(args) -> dict:
    """The teacher's model-shape overrides of the student's args. Widths the teacher
    flags do not name follow the student where the teacher has the student's width and
    heads, else their defaults (4h MLP, h/heads per head, one KV head per head)."""
    from .model.config import default_ffn_hidden_size

    hidden, heads = args.hidden_size_teacher, args.num_attention_heads_teacher
    same_width = hidden == args.hidden_size
    same_heads = same_width and heads == args.num_attention_heads
    experts = args.num_experts_teacher
    return {
        "num_layers": args.num_layers_teacher,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_experts": list(experts) if isinstance(experts, (list, tuple)) else [experts],
        "ffn_hidden_size": (args.ffn_hidden_size if same_width
                            else default_ffn_hidden_size(hidden, args.swiglu)),
        "kv_channels": args.kv_channels if same_heads else hidden // heads,
        "num_key_value_heads": args.num_key_value_heads if same_heads else heads,
    }


def teacher_args(args):
    """A copy of args with the teacher's shape (args itself is left as it is)."""
    t_args = copy.copy(args)
    for name, value in _teacher_shape(args).items():
        setattr(t_args, name, value)
    return t_args


def build_teacher(args) -> torch.nn.Module:
    """The teacher GPT of the teacher shape, loaded from --load-teacher (a Megatron
    checkpoint, or a DeepSpeed one), in eval mode, frozen, on this rank's device
    (fp16/bf16 as the student)."""
    from .accelerator import current_device
    from .checkpointing import CheckpointError, load_model_weights_only
    from .model import GPTModel
    from .model.config import config_from_args
    from .utils import print_rank_0

    print_rank_0(f"building the distillation teacher ({args.num_layers_teacher} layers, "
                 f"hidden {args.hidden_size_teacher}, {args.num_attention_heads_teacher} "
                 f"heads, experts {args.num_experts_teacher}) from {args.load_teacher} ...")
    # no gradients flow through the teacher: nothing to recompute
    config = config_from_args(args, **_teacher_shape(args), recompute_granularity=None,
                              recompute_method=None)
    teacher = GPTModel(config, num_tokentypes=0, parallel_output=True)
    for param in teacher.parameters():
        mpu.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    teacher.to(current_device())
    if args.fp16 or args.bf16:
        from .model import Float16Module

        teacher = Float16Module(teacher, args.params_dtype)
    try:
        if _is_deepspeed_checkpoint(args.load_teacher):
            iteration = _load_deepspeed_teacher(teacher, args.load_teacher, teacher_args(args))
        else:
            iteration = load_model_weights_only(teacher, args.load_teacher,
                                                model_args=teacher_args(args))
    except CheckpointError as exc:
        # the shape flags of the teacher are the *-teacher ones
        text = re.sub(r"(--num-layers|--hidden-size|--num-attention-heads)\b(?!-)",
                      r"\1-teacher", str(exc))
        raise CheckpointError(f"--load-teacher {args.load_teacher}: {text}") from None
    print_rank_0(f" > distillation teacher loaded at iteration {iteration}")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _is_deepspeed_checkpoint(load_dir: str) -> bool:
    """A DeepSpeed save folder (a `latest` tag file, no Megatron iter_* folders)."""
    from .checkpointing import iteration_folders

    return (os.path.isfile(os.path.join(load_dir, "latest"))
            and not iteration_folders(load_dir))


def _load_deepspeed_teacher(teacher: torch.nn.Module, load_dir: str, t_args) -> int:
    """The weights of the DeepSpeed checkpoint `latest` names; returns its iteration."""
    from .deepspeed_engine import load_deepspeed_module_weights

    return load_deepspeed_module_weights(teacher, load_dir, t_args)


_TEACHER: list[torch.nn.Module] = []


def get_teacher(args) -> torch.nn.Module:
    """This process's teacher, built and loaded on first use (every rank reaches its first
    training micro-batch together)."""
    if not _TEACHER:
        _TEACHER.append(build_teacher(args))
    return _TEACHER[0]


def teacher_logits(teacher: torch.nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The teacher's vocabulary-split logits [b, s, V/p] of a micro-batch, without
    gradients (an MoE teacher's aux loss is dropped)."""
    with torch.no_grad():
        output = teacher(tokens, position_ids, attention_mask)
    return output[0] if isinstance(output, tuple) else output
