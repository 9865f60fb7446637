"""Flags, derived values and validation of megatron/arguments.py (no process groups)."""

import argparse
import shlex

import pytest
import torch

from megatron import arguments as A
from megatron.arguments import ArgumentError, build_parser, parse_args, validate_args

# A tiny valid GPT: every invalid case below adds or swaps flags on top of it.
BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2"
)

README_345M = (
    "--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --micro-batch-size 4 "
    "--global-batch-size 8 --seq-length 1024 --max-position-embeddings 1024 "
    "--train-iters 500000 --lr-decay-iters 320000 --save ckpt/gpt2 --load ckpt/gpt2 "
    "--data-path my-gpt2_text_document --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt "
    "--data-impl mmap --split 949,50,1 --distributed-backend nccl --lr 0.00015 --min-lr 1.0e-5 "
    "--lr-decay-style cosine --weight-decay 1e-2 --clip-grad 1.0 --lr-warmup-fraction .01 "
    "--checkpoint-activations --log-interval 10 --save-interval 500 --eval-interval 100 "
    "--eval-iters 10 --fp16"
)

GPT3_175B = (
    "--num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 "
    "--max-position-embeddings 2048 --tensor-model-parallel-size 8 "
    "--pipeline-model-parallel-size 16 --micro-batch-size 1 --global-batch-size 1536 "
    "--rampup-batch-size 16 16 5859375 --train-samples 146484375 "
    "--lr-decay-samples 126953125 --lr-warmup-samples 183105 --lr 6.0e-5 --min-lr 6.0e-6 "
    "--lr-decay-style cosine --log-interval 10 --eval-iters 40 --eval-interval 1000 "
    "--data-path my-gpt3_00_text_document --vocab-file gpt2-vocab.json "
    "--merge-file gpt2-merges.txt --save-interval 1000 --save ckpt --load ckpt --split 98,2,0 "
    "--clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 "
    "--init-method-std 0.006 --tensorboard-dir tb --fp16 --checkpoint-activations"
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module", autouse=True)
def _import_deepspeed_once():
    # DeepSpeed logs its device detection on import; do it before any test captures stderr.
    build_parser()


def _parse(flags: str) -> argparse.Namespace:
    return build_parser().parse_args(shlex.split(flags))


def _validate(flags: str, world_size: int = 1, defaults=None, rank: int = 0):
    return validate_args(_parse(flags), defaults, world_size=world_size, rank=rank)


def _replace(flags: str, flag: str, value: str) -> str:
    words = shlex.split(flags)
    words[words.index(flag) + 1] = value
    return " ".join(words)


def _drop(flags: str, flag: str) -> str:
    words = shlex.split(flags)
    i = words.index(flag)
    return " ".join(words[:i] + words[i + 2 :])


# ---------------------------------------------------------------- pure functions


def test_data_parallel_size():
    assert A.data_parallel_size(1024, 8, 16) == 8
    assert A.data_parallel_size(8, 2, 2) == 2
    assert A.data_parallel_size(1, 1, 1) == 1
    with pytest.raises(ArgumentError, match="world size \\(12\\).*tensor.*\\(8\\).*pipeline"):
        A.data_parallel_size(12, 8, 1)
    with pytest.raises(ArgumentError, match="must be >= 1"):
        A.data_parallel_size(4, 0, 1)


def test_num_microbatches():
    assert A.num_microbatches(1536, 1, 8) == 192
    assert A.num_microbatches(8, 4, 1) == 2
    assert A.num_microbatches(16, 2, 4) == 2
    with pytest.raises(ArgumentError, match="--global-batch-size \\(10\\).*--micro-batch-size"):
        A.num_microbatches(10, 4, 1)
    with pytest.raises(ArgumentError, match="data-parallel size \\(4\\)"):
        A.num_microbatches(12, 2, 4)


def test_ffn_hidden_size_and_kv_channels():
    assert A.ffn_hidden_size(1024) == 4096
    assert A.ffn_hidden_size(12288) == 49152
    assert A.kv_channels(1024, 16) == 64
    assert A.kv_channels(12288, 96) == 128
    with pytest.raises(ArgumentError, match="--hidden-size \\(1000\\).*--num-attention-heads"):
        A.kv_channels(1000, 16)


def test_virtual_pipeline_size():
    assert A.virtual_pipeline_size(24, 4, 3) == 2  # 6 layers per stage, chunks of 3
    assert A.virtual_pipeline_size(16, 2, 1) == 8
    with pytest.raises(ArgumentError, match="layers per pipeline stage \\(6"):
        A.virtual_pipeline_size(24, 4, 4)
    with pytest.raises(ArgumentError, match="--pipeline-model-parallel-size > 1"):
        A.virtual_pipeline_size(24, 1, 2)
    with pytest.raises(ArgumentError, match="--num-layers \\(25\\)"):
        A.virtual_pipeline_size(25, 2, 1)


def test_num_moe_layers():
    assert A.num_moe_layers(24, 2) == 12
    assert A.num_moe_layers(24, 1) == 24
    assert A.num_moe_layers(5, 2) == 2
    with pytest.raises(ArgumentError, match="--expert-interval"):
        A.num_moe_layers(24, 0)


# ---------------------------------------------------------------- invalid combinations

INVALID = [
    # (flags added to / replacing BASE, world size, substrings the message must name)
    ("--tensor-model-parallel-size 4", 6, ["world size (6)", "--tensor-model-parallel-size (4)"]),
    ("--pipeline-model-parallel-size 4", 6, ["world size (6)", "--pipeline-model-parallel-size"]),
    ("--tensor-model-parallel-size 8", 8, ["--num-attention-heads (4)", "(8)"]),
    ("--hidden-size 66", 1, ["--hidden-size (66)", "--num-attention-heads (4)"]),
    ("--num-layers 5 --pipeline-model-parallel-size 2", 2, ["--num-layers (5)", "size (2)"]),
    (
        "--num-layers 8 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3",
        2,
        ["--num-layers-per-virtual-pipeline-stage (3)", "layers per pipeline stage (4"],
    ),
    ("--num-layers-per-virtual-pipeline-stage 2", 1, ["--pipeline-model-parallel-size > 1"]),
    ("--tp-comm-overlap-chunks 0", 1, ["--tp-comm-overlap-chunks", "(got 0)"]),
    (
        "--tensor-model-parallel-size 2 --sequence-parallel --tp-comm-overlap-chunks 2",
        2,
        ["--tp-comm-overlap-chunks", "--sequence-parallel"],
    ),
    (
        "--tensor-model-parallel-size 2 --tp-comm-overlap",
        2,
        ["--tp-comm-overlap", "add --sequence-parallel"],
    ),
    ("--global-batch-size 6 --micro-batch-size 4", 1, ["--global-batch-size (6)", "size (4)"]),
    ("--global-batch-size 6", 2, ["--global-batch-size (6)", "data-parallel size (2)"]),
    ("--fp16 --bf16", 1, ["--fp16", "--bf16"]),
    ("--max-position-embeddings 16", 1, ["--max-position-embeddings (16)", "--seq-length (32)"]),
    ("--decoder-seq-length 64", 1, ["--max-position-embeddings (32)", "--decoder-seq-length"]),
    ("--seq-length 32 --encoder-seq-length 64", 1, ["--seq-length (32)", "--encoder-seq-length"]),
    ("--train-iters 10 --train-samples 100", 1, ["--train-iters (10)", "--train-samples (100)"]),
    ("--lr-warmup-fraction .01 --lr-warmup-iters 10", 1, ["--lr-warmup-fraction", "iters (10)"]),
    ("--lr-warmup-fraction .01 --lr-warmup-samples 9", 1, ["--lr-warmup-fraction", "ples (9)"]),
    ("--train-iters 10 --lr-decay-samples 100", 1, ["--train-iters 10", "--lr-decay-samples"]),
    ("--train-iters 10 --lr-warmup-samples 5", 1, ["--train-iters 10", "--lr-warmup-samples"]),
    ("--train-samples 100 --lr-decay-iters 10", 1, ["--train-samples 100", "--lr-decay-iters"]),
    ("--train-samples 100 --lr-warmup-iters 5", 1, ["--train-samples 100", "--lr-warmup-iters"]),
    ("--rampup-batch-size 16 16", 1, ["--rampup-batch-size", "3 values", "16 16"]),
    ("--rampup-batch-size 2 2 100 --train-iters 10", 1, ["--rampup-batch-size", "--train-iters"]),
    (
        "--distribute-checkpointed-activations",
        1,
        ["--distribute-checkpointed-activations", "--checkpoint-activations"],
    ),
    (
        "--deepspeed-activation-checkpointing",
        1,
        ["--deepspeed-activation-checkpointing", "--checkpoint-activations"],
    ),
    ("--bf16 --fp16-lm-cross-entropy", 1, ["--fp16-lm-cross-entropy", "--bf16"]),
    ("--fp32-residual-connection", 1, ["--fp32-residual-connection", "--fp16"]),
    ("--num-experts 4 4 4", 1, ["--num-experts has 3 values", "--expert-interval 2"]),
    ("--moe-expert-parallel-size 2", 1, ["--moe-expert-parallel-size (2)", "size (1)"]),
    ("--num-experts 3 --moe-expert-parallel-size 2", 2, ["(2)", "--num-experts (3)"]),
    ("--lr 1e-4 --min-lr 1e-3", 1, ["--min-lr (0.001)", "--lr (0.0001)"]),
    ("--ffn-hidden-size 90 --tensor-model-parallel-size 4", 4, ["--ffn-hidden-size (90)"]),
    ("--model-parallel-size 2 --tensor-model-parallel-size 4", 8, ["--model-parallel-size (2)"]),
    ("--batch-size 4", 1, ["--batch-size (4)", "--micro-batch-size (2)"]),
    ("--warmup 0.1 --lr-warmup-fraction 0.2", 1, ["--warmup (0.1)", "--lr-warmup-fraction"]),
    ("--accumulate-allreduce-grads-in-fp32 --DDP-impl torch", 1, ["--DDP-impl torch"]),
    # values that used to fail deep inside the run (ZeroDivisionError, a built model)
    ("--num-layers 0", 1, ["--num-layers must be >= 1 (got 0)"]),
    ("--hidden-size -64", 1, ["--hidden-size must be >= 1 (got -64)"]),
    ("--seq-length 0", 1, ["--seq-length must be >= 1 (got 0)"]),
    ("--eval-interval 0", 1, ["--eval-interval must be >= 1 (got 0)"]),
    ("--train-iters 0", 1, ["--train-iters must be >= 1 (got 0)"]),
    ("--save-interval 0", 1, ["--save-interval must be >= 1 (got 0)"]),
    ("--eval-iters -1", 1, ["--eval-iters must be >= 0 (got -1)"]),
    ("--keep-last-checkpoints 0", 1, ["--keep-last-checkpoints must be >= 1 (got 0)"]),
    ("--distributed-timeout-minutes 0", 1, ["--distributed-timeout-minutes must be > 0"]),
    ("--train-iters 10 --lr-warmup-iters 10", 1,
     ["--lr-warmup-iters (10) must be smaller than --train-iters (10)"]),
    ("--train-iters 10 --lr-decay-iters 8 --lr-warmup-iters 8", 1,
     ["--lr-warmup-iters (8) must be smaller than --lr-decay-iters (8)"]),
    ("--train-samples 100 --lr-warmup-samples 100", 1,
     ["--lr-warmup-samples (100) must be smaller than --train-samples (100)"]),
    ("--lr-warmup-fraction 1.0", 1, ["--lr-warmup-fraction (1.0) must be in [0, 1)"]),
]


@pytest.mark.parametrize("extra,world_size,names", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_combination_names_the_flags(extra, world_size, names):
    # A repeated flag overrides BASE's value (argparse keeps the last one).
    with pytest.raises(ArgumentError) as info:
        _validate(f"{BASE} {extra}", world_size=world_size)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


@pytest.mark.parametrize(
    "flag",
    [
        "--num-layers",
        "--hidden-size",
        "--num-attention-heads",
        "--seq-length",
        "--max-position-embeddings",
        "--micro-batch-size",
    ],
)
def test_required_flags(flag):
    with pytest.raises(ArgumentError, match=f"^{flag}.* is required"):
        _validate(_drop(BASE, flag))
    # ... unless the entry script supplies it through `defaults`.
    dest = flag[2:].replace("-", "_")
    value = int(shlex.split(BASE)[shlex.split(BASE).index(flag) + 1])
    args = _validate(_drop(BASE, flag), defaults={dest: value})
    assert getattr(args, dest) == value


def test_valid_combinations_that_look_suspicious():
    # --kv-channels lifts the hidden / heads divisibility requirement.
    args = _validate(_replace(BASE, "--hidden-size", "66") + " --kv-channels 16")
    assert args.kv_channels == 16 and args.ffn_hidden_size == 264
    # Flash attention with attention dropout is fine.
    args = _validate(BASE + " --use-flash-attn --attention-dropout 0.1")
    assert args.use_flash_attn and args.attention_dropout == 0.1
    # DeepSpeed's pipeline engine partitions uneven layer counts itself.
    args = _validate(
        _replace(BASE, "--num-layers", "5") + " --deepspeed --pipeline-model-parallel-size 2",
        world_size=2,
    )
    assert args.ds_pipeline_enabled
    # Ramp-up skips the constant global-batch check (the calculator checks each step).
    args = _validate(
        BASE + " --global-batch-size 6 --micro-batch-size 4 "
        "--rampup-batch-size 4 2 100 --train-samples 1000"
    )
    assert args.rampup_batch_size == [4, 2, 100]
    # MoE with recompute: the aux losses are outputs of the checkpointed chunks.
    args = _validate(BASE + " --num-experts 2 --checkpoint-activations")
    assert args.num_experts == [2] and args.checkpoint_activations


# ---------------------------------------------------------------- parse_args behaviour


def test_parse_args_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(args_list=shlex.split(BASE + " --fp16 --bf16"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "error: --fp16 and --bf16" in err[0]


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(args_list=shlex.split(BASE + " --tensor-model-parallel-size two"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "--tensor-model-parallel-size" in err[0]


def test_parse_args_unknown_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(args_list=shlex.split(BASE + " --no-such-flag"))
    assert "--no-such-flag" in capsys.readouterr().err
    args = parse_args(args_list=shlex.split(BASE + " --no-such-flag"), ignore_unknown_args=True)
    assert args.num_layers == 4


def test_extra_args_provider():
    def provider(parser):
        group = parser.add_argument_group(title="task")
        group.add_argument("--task", type=str, default="LAMBADA")
        return parser

    args = parse_args(provider, args_list=shlex.split(BASE + " --task WIKITEXT103"))
    assert args.task == "WIKITEXT103"


@pytest.mark.parametrize("spelling", ["--local_rank=3", "--local-rank 3", "--local_rank 3"])
def test_local_rank_both_spellings(spelling):
    assert _validate(f"{BASE} {spelling}").local_rank == 3


def test_local_rank_from_env_and_world_from_env(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    args = validate_args(_parse(BASE + " --tensor-model-parallel-size 2"))
    assert (args.local_rank, args.world_size, args.rank, args.data_parallel_size) == (5, 4, 2, 2)
    assert _validate(BASE + " --local-rank 1").local_rank == 1  # the flag wins


def test_deprecated_flags_are_folded_in(capsys):
    args = _validate(_drop(BASE, "--micro-batch-size") + " --batch-size 4")
    assert args.micro_batch_size == 4 and not hasattr(args, "batch_size")
    args = _validate(BASE + " --model-parallel-size 2", world_size=4)
    assert args.tensor_model_parallel_size == 2 and args.data_parallel_size == 2
    assert not hasattr(args, "model_parallel_size")
    args = _validate(BASE + " --warmup 0.05")
    assert args.lr_warmup_fraction == 0.05 and not hasattr(args, "warmup")
    out = capsys.readouterr().out
    for flag in ("--batch-size", "--model-parallel-size", "--warmup"):
        assert f"WARNING: {flag} is deprecated" in out


def test_defaults_apply_only_where_no_flag_was_given():
    defaults = {
        "tokenizer_type": "GPT2BPETokenizer",
        "make_vocab_size_divisible_by": 64,
        "no_load_rng": True,
    }
    args = parse_args(defaults=defaults, args_list=shlex.split(BASE))
    assert args.tokenizer_type == "GPT2BPETokenizer"
    assert args.make_vocab_size_divisible_by == 64
    assert args.no_load_rng is True
    flags = BASE + " --tokenizer-type BertWordPieceCase --make-vocab-size-divisible-by 128"
    args = parse_args(defaults=defaults, args_list=shlex.split(flags))
    assert args.tokenizer_type == "BertWordPieceCase"
    assert args.make_vocab_size_divisible_by == 128
    assert args.no_load_rng is True


def test_validate_args_defaults_megatron_semantics(capsys):
    args = _parse(BASE + " --tokenizer-type BertWordPieceCase")
    validate_args(
        args, {"tokenizer_type": "GPT2BPETokenizer", "no_load_optim": True}, world_size=1, rank=0
    )
    assert args.tokenizer_type == "BertWordPieceCase"  # the user's value stays
    assert args.no_load_optim is True  # unset (None): the default applies
    assert "overriding default argument tokenizer_type" in capsys.readouterr().out


def test_deepspeed_flags_present():
    args = _validate(BASE + " --deepspeed --deepspeed_config ds_config.json --zero-stage 2")
    assert args.deepspeed is True and args.deepspeed_config == "ds_config.json"
    assert args.zero_stage == 2 and args.ds_pipeline_enabled
    args = _validate(BASE + " --deepspeed --no-pipeline-parallel")
    assert args.no_pipeline_parallel and not args.ds_pipeline_enabled
    args = _validate(BASE)
    assert args.deepspeed is False and not args.ds_pipeline_enabled and args.zero_stage is None


def test_flag_spellings_and_defaults():
    parser = build_parser()
    options = {s for action in parser._actions for s in action.option_strings}
    for flag in (
        "--no-log-learnig-rate-to-tensorboard",
        "--contigious-checkpointing",
        "--zero-contigious-gradients",
        "--cpu_torch_adam",
        "--DDP-impl",
        "--local_rank",
        "--local-rank",
        "--universal-checkpoint",
        "--curriculum-learning",
        "--deepspeed",
        "--deepspeed_config",
        "--scatter-gather-tensors-in-pipeline",
        "--no-scatter-gather-tensors-in-pipeline",
        "--memory-centric-tiled-linear",
        "--lr-warmup-tokens",
        "--train-tokens",
        "--exit-signal-handler",
        "--finetune",
    ):
        assert flag in options, flag
    args = _validate(BASE)
    expected = {
        "make_vocab_size_divisible_by": 128,
        "num_experts": [1],
        "expert_interval": 2,
        "moe_min_capacity": 4,
        "moe_loss_coeff": 0.1,
        "attention_dropout": 0.1,
        "hidden_dropout": 0.1,
        "weight_decay": 0.01,
        "clip_grad": 1.0,
        "adam_beta2": 0.999,
        "adam_eps": 1e-8,
        "sgd_momentum": 0.9,
        "checkpoint_num_layers": 1,
        "log_interval": 100,
        "seed": 1234,
        "init_method_std": 0.02,
        "lr_decay_style": "linear",
        "lr_warmup_iters": 0,
        "lr_warmup_samples": 0,
        "min_lr": 0.0,
        "initial_loss_scale": 2**32,
        "min_loss_scale": 1.0,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "DDP_impl": "local",
        "distributed_backend": None,
        "eval_iters": 100,
        "eval_interval": 1000,
        "vocab_extra_ids": 0,
        "mask_prob": 0.15,
        "short_seq_prob": 0.1,
        "num_workers": 2,
        "data_impl": "infer",
        "optimizer": "adam",
        "dataloader_type": "single",
        "remote_device": "none",
        "zero_stage": None,
        "masked_softmax_fusion": True,
        "bias_gelu_fusion": True,
        "bias_dropout_fusion": True,
        "apply_query_key_layer_scaling": True,
        "use_contiguous_buffers_in_local_ddp": True,
        "log_learning_rate_to_tensorboard": True,
        "log_loss_scale_to_tensorboard": True,
        "scatter_gather_tensors_in_pipeline": True,
        "bert_binary_head": True,
    }
    assert {k: getattr(args, k) for k in expected} == expected
    assert [float(x) for x in args.split.split(",")] == [969, 30, 1]


def test_negative_flags_store_false():
    args = _validate(
        BASE + " --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion "
        "--no-query-key-layer-scaling --no-contiguous-buffers-in-local-ddp "
        "--no-log-learnig-rate-to-tensorboard --no-log-loss-scale-to-tensorboard "
        "--no-scatter-gather-tensors-in-pipeline --bert-no-binary-head"
    )
    for dest in (
        "masked_softmax_fusion",
        "bias_gelu_fusion",
        "bias_dropout_fusion",
        "apply_query_key_layer_scaling",
        "use_contiguous_buffers_in_local_ddp",
        "log_learning_rate_to_tensorboard",
        "log_loss_scale_to_tensorboard",
        "scatter_gather_tensors_in_pipeline",
        "bert_binary_head",
    ):
        assert getattr(args, dest) is False, dest
    assert args.attention_softmax_in_fp32 is False  # only forced on by q-k layer scaling


def test_derived_values():
    args = _validate(BASE)
    assert (args.ffn_hidden_size, args.kv_channels) == (256, 16)
    assert args.global_batch_size == 2 and args.data_parallel_size == 1
    assert (args.consumed_train_samples, args.consumed_valid_samples) == (0, 0)
    assert args.params_dtype == torch.float32 and args.attention_softmax_in_fp32
    assert args.virtual_pipeline_model_parallel_size is None
    assert args.encoder_seq_length == 32
    assert _validate(BASE + " --fp16").params_dtype == torch.half
    args = _validate(BASE + " --bf16")
    assert args.params_dtype == torch.bfloat16 and args.accumulate_allreduce_grads_in_fp32
    args = _validate(
        _replace(BASE, "--num-layers", "8") + " --pipeline-model-parallel-size 2 "
        "--num-layers-per-virtual-pipeline-stage 2 --global-batch-size 8",
        world_size=4,
    )
    assert args.virtual_pipeline_model_parallel_size == 2 and args.data_parallel_size == 2
    args = _validate(
        _drop(BASE, "--seq-length") + " --encoder-seq-length 32 --decoder-seq-length 16"
    )
    assert args.seq_length == 32 and args.decoder_seq_length == 16
    assert _validate(BASE + " --sequence-parallel").sequence_parallel is False  # TP == 1
    args = _validate(BASE + " --sequence-parallel --tensor-model-parallel-size 2", world_size=2)
    assert args.sequence_parallel is True and args.tp_comm_overlap is False
    args = _validate(
        BASE + " --sequence-parallel --tp-comm-overlap --tensor-model-parallel-size 2",
        world_size=2,
    )
    assert args.sequence_parallel is True and args.tp_comm_overlap is True
    assert _validate(BASE + " --tp-comm-overlap").tp_comm_overlap is False  # TP == 1
    args = _validate(BASE + " --DDP-impl torch")
    assert args.use_contiguous_buffers_in_local_ddp is False


def test_readme_345m_gpt_command():
    args = _validate(README_345M)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (24, 1024, 16)
    assert (args.ffn_hidden_size, args.kv_channels) == (4096, 64)
    assert (args.micro_batch_size, args.global_batch_size) == (4, 8)
    assert args.lr == 0.00015 and args.lr_decay_style == "cosine"
    assert (args.train_iters, args.lr_decay_iters, args.lr_warmup_fraction) == (
        500000,
        320000,
        0.01,
    )
    assert args.fp16 and args.params_dtype == torch.half and args.checkpoint_activations
    assert (args.log_interval, args.save_interval, args.eval_interval, args.eval_iters) == (
        10,
        500,
        100,
        10,
    )
    assert (
        A.num_microbatches(args.global_batch_size, args.micro_batch_size, args.data_parallel_size)
        == 2
    )


def test_gpt3_175b_slurm_flags_with_1024_gpus():
    args = _validate(GPT3_175B, world_size=1024, rank=5)
    assert args.data_parallel_size == 8
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (8, 16)
    assert args.rampup_batch_size == [16, 16, 5859375]
    assert (args.train_samples, args.lr_decay_samples, args.lr_warmup_samples) == (
        146484375,
        126953125,
        183105,
    )
    assert args.train_iters is None and args.split == "98,2,0"
    assert (args.lr, args.min_lr) == (6.0e-5, 6.0e-6)
    assert (args.kv_channels, args.ffn_hidden_size) == (128, 49152)
    assert A.num_microbatches(1536, 1, args.data_parallel_size) == 192
    with pytest.raises(ArgumentError, match="world size \\(1000\\)"):
        _validate(GPT3_175B, world_size=1000)


def test_print_args_banner_on_rank_0_only(capsys):
    args = _validate(BASE)
    capsys.readouterr()
    A.print_args(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "------------------------ arguments ------------------------"
    assert lines[-1] == "-------------------- end of arguments ---------------------"
    assert "  num_layers " + "." * (48 - len("num_layers")) + " 4" in lines
    body = lines[1:-1]
    assert body == sorted(body, key=str.lower) and len(body) == len(vars(args))
    args.rank = 1
    A.print_args(args)
    assert capsys.readouterr().out == ""



RECOMPUTE_CASES = [
    # flags -> (granularity, method, num_layers, checkpoint_activations)
    ("", (None, None, 1, False)),
    ("--recompute-activations", ("selective", None, 1, False)),
    ("--recompute-granularity selective", ("selective", None, 1, False)),
    ("--checkpoint-activations --checkpoint-num-layers 2", ("full", "uniform", 2, True)),
    ("--recompute-granularity full --recompute-method block --recompute-num-layers 3",
     ("full", "block", 3, True)),
]


@pytest.mark.parametrize("flags,want", RECOMPUTE_CASES)
def test_recompute_flags_resolve_as_megatron_deepspeed(flags, want):
    args = _validate(f"{BASE} {flags}")
    got = (args.recompute_granularity, args.recompute_method, args.recompute_num_layers,
           args.checkpoint_activations)
    assert got == want
    # validating again (tools/plan_parallelism.py does) changes nothing
    again = validate_args(args, world_size=1, rank=0)
    assert (again.recompute_granularity, again.recompute_method, again.recompute_num_layers,
            again.checkpoint_activations) == want


@pytest.mark.parametrize(
    "flags,world,words",
    [
        ("--recompute-granularity full", 1, ["--recompute-method uniform|block"]),
        ("--recompute-activations --recompute-method block", 1, ["--recompute-method", "selec"]),
        ("--recompute-activations --checkpoint-activations", 1, ["--checkpoint-activations"]),
        ("--checkpoint-activations --distribute-saved-activations", 1,
         ["--distribute-saved-activations", "--tensor-model-parallel-size"]),
        ("--recompute-activations --distribute-saved-activations --tensor-model-parallel-size 2",
         2, ["--distribute-saved-activations", "full recompute"]),
    ],
)
def test_recompute_flags_refused(flags, world, words):
    with pytest.raises(ArgumentError) as err:
        _validate(f"{BASE} {flags}", world_size=world)
    for word in words:
        assert word in str(err.value), str(err.value)
