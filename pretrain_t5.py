"""Pretrain T5."""

from functools import partial

import torch

from megatron import get_args, get_timers, mpu, print_rank_0
from megatron.data.dataset_utils import build_train_valid_test_datasets
from megatron.model.config import config_from_args
from megatron.model.t5_model import T5Model
from megatron.training import pretrain
from megatron.utils import average_losses_across_data_parallel_group


def model_provider(pre_process=True, post_process=True):
    """Build the T5 model (one pipeline stage: T5 runs with pipeline size 1)."""
    print_rank_0("building T5 model ...")
    args = get_args()
    if args.decoder_seq_length is None:
        raise ValueError("pretrain_t5.py: --decoder-seq-length is required for T5")
    config = config_from_args(args)
    return T5Model(
        config,
        num_tokentypes=0,
        parallel_output=True,
        pre_process=pre_process,
        post_process=post_process,
    )


def get_batch(data_iterator):
    """Encoder/decoder tokens, labels, loss mask and the three attention masks of one
    micro-batch, broadcast from tensor-parallel rank 0. Masks come as 1 = attend and
    leave as bool, True = masked: enc [b, se, se], dec [b, sd, sd], enc_dec [b, sd, se]."""
    keys = ["text_enc", "text_dec", "labels", "loss_mask", "enc_mask", "dec_mask", "enc_dec_mask"]
    data = next(data_iterator) if data_iterator is not None else None
    data_b = mpu.broadcast_data(keys, data, torch.int64)
    tokens_enc = data_b["text_enc"].long()  # [b, se]
    tokens_dec = data_b["text_dec"].long()  # [b, sd]
    labels = data_b["labels"].long()  # [b, sd], -1 on padding
    loss_mask = data_b["loss_mask"].float()  # [b, sd]
    enc_mask = data_b["enc_mask"] < 0.5
    dec_mask = data_b["dec_mask"] < 0.5
    enc_dec_mask = data_b["enc_dec_mask"] < 0.5
    return tokens_enc, tokens_dec, loss_mask, labels, enc_mask, dec_mask, enc_dec_mask


def loss_func(loss_mask, output_tensor):
    """Mean of the per-token losses over the real decoder tokens (loss_mask); the
    data-parallel mean for logging as 'lm loss'."""
    lm_loss_ = output_tensor.float()  # [b, sd]
    lm_loss = torch.sum(lm_loss_.view(-1) * loss_mask.reshape(-1)) / loss_mask.sum()
    averaged_losses = average_losses_across_data_parallel_group([lm_loss])
    return lm_loss, {"lm loss": averaged_losses[0]}


def forward_step(data_iterator, model):
    """Forward one micro-batch; returns the per-token loss and the loss function."""
    timers = get_timers()
    timers("batch-generator").start()
    tokens_enc, tokens_dec, loss_mask, lm_labels, enc_mask, dec_mask, enc_dec_mask = get_batch(
        data_iterator
    )
    timers("batch-generator").stop()
    output_tensor = model(
        tokens_enc,
        tokens_dec,
        enc_mask,
        dec_mask,
        enc_dec_mask,
        tokentype_ids=None,
        lm_labels=lm_labels,
    )
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """Build span-corruption train, validation and test datasets from --data-path
    (sentence-split data, e.g. my-t5_text_sentence)."""
    args = get_args()
    print_rank_0("> building train, validation, and test datasets for T5 ...")
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        data_prefix=args.data_path,
        data_impl=args.data_impl,
        splits_string=args.split,
        train_valid_test_num_samples=train_val_test_num_samples,
        max_seq_length=args.encoder_seq_length,
        max_seq_length_dec=args.decoder_seq_length,
        masked_lm_prob=args.mask_prob,
        short_seq_prob=args.short_seq_prob,
        seed=args.seed,
        skip_warmup=(not args.mmap_warmup),
        dataset_type="t5",
    )
    print_rank_0("> finished creating T5 datasets ...")
    return train_ds, valid_ds, test_ds


if __name__ == "__main__":
    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        forward_step,
        args_defaults={"tokenizer_type": "BertWordPieceLowerCase"},
    )
