"""Pretrain BERT (masked LM + sentence-order prediction)."""

from functools import partial

import torch
import torch.nn.functional as F

from megatron import get_args, get_timers, mpu, print_rank_0
from megatron.data.dataset_utils import build_train_valid_test_datasets
from megatron.model import BertModel
from megatron.model.config import config_from_args
from megatron.training import pretrain
from megatron.utils import average_losses_across_data_parallel_group

BATCH_KEYS = ["text", "types", "labels", "is_random", "loss_mask", "padding_mask"]


def model_provider(pre_process=True, post_process=True):
    """Build the BERT model for this pipeline stage (token types and the pooler come with
    the binary head; --bert-no-binary-head drops all three)."""
    print_rank_0("building BERT model ...")
    args = get_args()
    pp = args.pipeline_model_parallel_size
    if args.deepspeed and pp > 1:
        raise ValueError(
            f"pretrain_bert.py: --deepspeed with --pipeline-model-parallel-size {pp} is not "
            "supported (DeepSpeed's pipeline engine has no BERT module); use "
            "--pipeline-model-parallel-size 1 or train without --deepspeed"
        )
    config = config_from_args(args)
    num_tokentypes = 2 if args.bert_binary_head else 0

    # under --zero-stage 3 the DeepSpeed backend calls this inside deepspeed.zero.Init
    return BertModel(
        config,
        num_tokentypes=num_tokentypes,
        add_binary_head=args.bert_binary_head,
        parallel_output=True,
        pre_process=pre_process,
        post_process=post_process,
    )


def get_batch(data_iterator):
    """tokens, token types, sentence order (is_random), loss mask, labels and padding
    mask of one micro-batch ([b, s], [b] for sentence order), broadcast from
    tensor-parallel rank 0."""
    data = next(data_iterator) if data_iterator is not None else None
    data_b = mpu.broadcast_data(BATCH_KEYS, data, torch.int64)
    tokens = data_b["text"].long()  # [b, s]
    types = data_b["types"].long()  # [b, s]
    sentence_order = data_b["is_random"].long()  # [b]
    loss_mask = data_b["loss_mask"].float()  # [b, s]
    lm_labels = data_b["labels"].long()  # [b, s], -1 where nothing is predicted
    padding_mask = data_b["padding_mask"].long()  # [b, s], 1 = real token
    return tokens, types, sentence_order, loss_mask, lm_labels, padding_mask


def loss_func(loss_mask, sentence_order, output_tensor):
    """Masked-LM loss averaged over the masked positions, plus the sentence-order cross
    entropy when the binary head is on; data-parallel means for logging."""
    lm_loss_, sop_logits = output_tensor
    loss_mask = loss_mask.float().reshape(-1)
    # a micro-batch without masked tokens contributes 0 instead of 0/0
    lm_loss = torch.sum(lm_loss_.float().view(-1) * loss_mask) / loss_mask.sum().clamp(min=1.0)
    if sop_logits is None:
        averaged = average_losses_across_data_parallel_group([lm_loss])
        return lm_loss, {"lm loss": averaged[0]}
    sop_loss = F.cross_entropy(
        sop_logits.view(-1, 2).float(), sentence_order.view(-1), ignore_index=-1
    )
    averaged = average_losses_across_data_parallel_group([lm_loss, sop_loss])
    return lm_loss + sop_loss, {"lm loss": averaged[0], "sop loss": averaged[1]}


def forward_step(data_iterator, model):
    """Forward one micro-batch; returns ((per-token lm loss, binary logits), loss_func)."""
    args = get_args()
    timers = get_timers()
    timers("batch-generator").start()
    tokens, types, sentence_order, loss_mask, lm_labels, padding_mask = get_batch(data_iterator)
    timers("batch-generator").stop()
    if not args.bert_binary_head:
        types = None
    output_tensor = model(tokens, padding_mask, tokentype_ids=types, lm_labels=lm_labels)
    return output_tensor, partial(loss_func, loss_mask, sentence_order)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Build train, validation and test BERT datasets from --data-path."""
    args = get_args()
    print_rank_0("> building train, validation, and test datasets for BERT ...")
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        data_prefix=args.data_path,
        data_impl=args.data_impl,
        splits_string=args.split,
        train_valid_test_num_samples=train_val_test_num_samples,
        max_seq_length=args.seq_length,
        masked_lm_prob=args.mask_prob,
        short_seq_prob=args.short_seq_prob,
        seed=args.seed,
        skip_warmup=(not args.mmap_warmup),
        binary_head=args.bert_binary_head,
        dataset_type="standard_bert",
    )
    print_rank_0("> finished creating BERT datasets ...")
    return train_ds, valid_ds, test_ds


if __name__ == "__main__":
    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        forward_step,
        args_defaults={"tokenizer_type": "BertWordPieceLowerCase"},
    )
