"""Pretrain GPT."""

from functools import partial

import torch

from megatron import get_args, get_timers, get_tokenizer, mpu, print_rank_0
from megatron.accelerator import current_device
from megatron.data.dataset_utils import DataPathError
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.data.mock_dataset import build_mock_train_valid_test_datasets
from megatron.distillation import distillation_loss, get_teacher, kd_log_key, teacher_logits
from megatron.model import GPTModel
from megatron.model.config import config_from_args
from megatron.model.ulysses import masked_mean_over_sequence, slice_sequence
from megatron.training import pretrain
from megatron.utils import (
    average_losses_across_data_parallel_group,
    get_ltor_masks_and_position_ids,
)


def model_provider(pre_process=True, post_process=True):
    """Build the GPT model for this pipeline stage (GPTModelPipe under DeepSpeed's
    pipeline engine)."""
    print_rank_0("building GPT model ...")
    args = get_args()
    config = config_from_args(args)
    if args.deepspeed and args.pipeline_model_parallel_size > 1 and args.ds_pipeline_enabled:
        from megatron.model.gpt_model_pipe import GPTModelPipe

        model = GPTModelPipe(config, num_tokentypes=0, parallel_output=True)
        model._megatron_batch_fn = get_batch_pipe
        return model
    # under --zero-stage 3 the DeepSpeed backend calls this inside deepspeed.zero.Init
    return GPTModel(config, num_tokentypes=0, parallel_output=True,
                    pre_process=pre_process, post_process=post_process)


def _stage_reads_data(args) -> bool:
    """First stages need tokens, last stages labels; middle pipeline stages read no data
    unless the attention mask depends on it (--reset-attention-mask)."""
    return (mpu.is_pipeline_first_stage() or mpu.is_pipeline_last_stage()
            or args.reset_attention_mask)


def get_batch(data_iterator):
    """Tokens, labels, loss mask, attention mask and position ids of one micro-batch,
    broadcast from tensor-parallel rank 0. Under flash attention with a plain causal mask
    the mask is None (is_causal attention; no [s, s] tensor). With
    --ds-sequence-parallel-size N each rank keeps its contiguous s/N slice of the tokens,
    labels, loss mask and positions (the mask stays [s, s]: attention sees all tokens)."""
    args = get_args()
    tokenizer = get_tokenizer()
    skip_mask = args.use_flash_attn and not args.reset_attention_mask
    if not _stage_reads_data(args):
        if skip_mask:
            return None, None, None, None, None
        seq = args.seq_length
        causal = torch.ones((1, 1, seq, seq), device=torch.device(current_device()))
        attention_mask = torch.tril(causal) < 0.5  # [1, 1, s, s], True = masked
        return None, None, None, attention_mask, None
    keys = ["text"]
    data = next(data_iterator) if data_iterator is not None else None
    data_b = mpu.broadcast_data(keys, data, torch.int64)
    tokens_ = data_b["text"].long()  # [b, s+1]
    labels = tokens_[:, 1:].contiguous()
    tokens = tokens_[:, :-1].contiguous()
    attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
        tokens, tokenizer.eod, args.reset_position_ids, args.reset_attention_mask,
        args.eod_mask_loss, skip_mask=skip_mask)
    if mpu.get_sequence_parallel_world_size() > 1:
        tokens, labels, loss_mask, position_ids = slice_sequence(
            (tokens, labels, loss_mask, position_ids), mpu.get_sequence_parallel_rank(),
            mpu.get_sequence_parallel_world_size())  # [b, s/N] each
    return tokens, labels, loss_mask, attention_mask, position_ids


def get_batch_pipe(data, train_state=None):
    """DeepSpeed pipeline inputs of one micro-batch: ((tokens, position_ids,
    attention_mask), (labels, loss_mask)), cut to the curriculum length (train_state's,
    bound by the training loop)."""
    args = get_args()
    tokenizer = get_tokenizer()
    data_b = mpu.broadcast_data(["text"], data, torch.int64)
    tokens_ = data_b["text"].long()  # [b, s+1]
    labels = tokens_[:, 1:].contiguous()
    tokens = tokens_[:, :-1].contiguous()
    attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
        tokens, tokenizer.eod, args.reset_position_ids, args.reset_attention_mask,
        args.eod_mask_loss)
    seqlen = train_state.curriculum_seqlen if train_state is not None else None
    if seqlen is not None and seqlen < args.seq_length:
        tokens, position_ids, labels, loss_mask = (
            t[:, :seqlen].contiguous() for t in (tokens, position_ids, labels, loss_mask))
        attention_mask = attention_mask[:, :, :seqlen, :seqlen].contiguous()
    return (tokens, position_ids, attention_mask), (labels, loss_mask)


def loss_func(loss_mask, output_tensor, moe_loss=None, kd_loss=None):
    """Masked mean of the per-token losses (plus --moe-loss-coeff x the MoE aux loss;
    under --kd / --mos, --kd-alpha-ce x that mean plus the distillation term); the
    data-parallel means for logging."""
    if mpu.get_sequence_parallel_world_size() > 1:  # the mean over all s tokens
        loss = masked_mean_over_sequence(
            output_tensor, loss_mask, mpu.get_sequence_parallel_group())
    else:
        losses = output_tensor.float()
        loss_mask = loss_mask.view(-1).float()
        loss = torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()
    if kd_loss is not None:
        return _distillation_total(loss, moe_loss, kd_loss)
    if moe_loss is None:
        averaged_loss = average_losses_across_data_parallel_group([loss])
        return loss, {"lm loss": averaged_loss[0]}
    moe_loss = moe_loss * get_args().moe_loss_coeff
    averaged = average_losses_across_data_parallel_group([loss, moe_loss])
    return loss + moe_loss, {"lm loss": averaged[0], "moe loss": averaged[1]}


def _distillation_total(loss, moe_loss, kd_loss):
    """alpha_ce x LM + moe + the KD term; "kd loss" (or "mos loss") is its own column."""
    args = get_args()
    moe_loss = torch.zeros_like(loss) if moe_loss is None else moe_loss * args.moe_loss_coeff
    averaged = average_losses_across_data_parallel_group([loss, moe_loss, kd_loss])
    logged = {"lm loss": averaged[0], kd_log_key(args): averaged[2]}
    if max(args.num_experts) > 1:
        logged["moe loss"] = averaged[1]
    return args.kd_alpha_ce * loss + moe_loss + kd_loss, logged


def forward_step(data_iterator, model, train_state=None):
    """Forward one micro-batch; returns the per-token loss and the loss function. The
    training loop binds train_state, whose curriculum length cuts the sequences."""
    timers = get_timers()
    timers("batch-generator").start()
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    timers("batch-generator").stop()
    args = get_args()
    curriculum_seqlen = train_state.curriculum_seqlen if train_state is not None else None
    if curriculum_seqlen is not None and curriculum_seqlen < args.seq_length:
        def cut(t):
            return None if t is None else t[:, :curriculum_seqlen].contiguous()

        tokens, position_ids, labels, loss_mask = (
            cut(tokens), cut(position_ids), cut(labels), cut(loss_mask))
        if attention_mask is not None:  # None: causal flash attention
            attention_mask = attention_mask[:, :, :curriculum_seqlen, :curriculum_seqlen]
    # distillation in training steps only (evaluation runs without gradients)
    if (args.kd or args.mos) and model.training and torch.is_grad_enabled():
        return _distillation_forward(args, model, tokens, labels, loss_mask, attention_mask,
                                     position_ids)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    moe_loss = None
    if isinstance(output_tensor, tuple):  # MoE: (per-token loss, summed aux loss)
        output_tensor, moe_loss = output_tensor
    return output_tensor, partial(loss_func, loss_mask, moe_loss=moe_loss)


def _distillation_forward(args, model, tokens, labels, loss_mask, attention_mask,
                          position_ids):
    """--kd / --mos training step: the student's logits give both its LM loss and, with
    the teacher's logits on the same tokens, the distillation term."""
    output = model(tokens, position_ids, attention_mask)  # [b, s, V/p]
    moe_loss = None
    if isinstance(output, tuple):
        output, moe_loss = output
    output_tensor = mpu.vocab_parallel_cross_entropy(output.float(), labels)  # [b, s]
    teacher = get_teacher(args)
    kd_loss = distillation_loss(output, teacher_logits(teacher, tokens, position_ids,
                                                       attention_mask),
                                args.kd_temp, args.kd_beta_ce)
    return output_tensor, partial(loss_func, loss_mask, moe_loss=moe_loss, kd_loss=kd_loss)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Build train, validation and test datasets from --data-path (or --train-data-path,
    --valid-data-path, --test-data-path), or random tokens with --mock-data."""
    args = get_args()
    if getattr(args, "mock_data", False):
        return _mock_datasets(args, train_val_test_num_samples)
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    _require_data_flags(args)
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        data_prefix=args.data_path,
        data_impl=args.data_impl,
        splits_string=args.split,
        train_valid_test_num_samples=train_val_test_num_samples,
        seq_length=args.seq_length,
        seed=args.seed,
        skip_warmup=(not args.mmap_warmup),
        train_data_prefix=args.train_data_path,
        valid_data_prefix=args.valid_data_path,
        test_data_prefix=args.test_data_path,
    )
    print_rank_0("> finished creating GPT datasets ...")
    return train_ds, valid_ds, test_ds


_SPLIT_FLAGS = (("--train-data-path", "train_data_path"), ("--valid-data-path", "valid_data_path"),
                ("--test-data-path", "test_data_path"))


def _require_data_flags(args) -> None:
    if args.data_path or any(getattr(args, attr) for _, attr in _SPLIT_FLAGS):
        return
    raise DataPathError("no training data: give --data-path (or --train-data-path, "
                        "--valid-data-path, --test-data-path), or --mock-data for random tokens")


def _mock_datasets(args, train_val_test_num_samples):
    """Random-token datasets over the tokenizer's ids (eod excluded), seeded by --seed."""
    for flag, attr in _SPLIT_FLAGS:
        if getattr(args, attr):
            raise DataPathError(f"--mock-data and {flag} both given; give one of them")
    tokenizer = get_tokenizer()
    print_rank_0(f"> building mock GPT datasets (random tokens over {tokenizer.vocab_size} "
                 f"ids, seed {args.seed}) ...")
    return build_mock_train_valid_test_datasets(
        train_val_test_num_samples, args.seq_length, tokenizer.vocab_size, args.seed,
        eod=_eod_or_none(tokenizer))


def _eod_or_none(tokenizer):
    try:
        return int(tokenizer.eod)
    except (AttributeError, NotImplementedError):
        return None


if __name__ == "__main__":
    pretrain(train_valid_test_datasets_provider, model_provider, forward_step,
             args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
