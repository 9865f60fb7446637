"""The DeepSpeed config agrees with Megatron's flags: missing keys are filled, a
contradiction is one error naming both (megatron/deepspeed_engine.py)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from megatron.deepspeed_engine import (
    DeepSpeedConfigError,
    build_deepspeed_config,
    reconcile_deepspeed_config,
)

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _args(**overrides):
    values = dict(
        micro_batch_size=4,
        global_batch_size=32,
        data_parallel_size=2,
        fp16=False,
        bf16=False,
        zero_stage=None,
        clip_grad=1.0,
        loss_scale=None,
        initial_loss_scale=2**32,
        loss_scale_window=1000,
        hysteresis=2,
        min_loss_scale=1.0,
        zero_reduce_scatter=False,
        zero_contigious_gradients=False,
        zero_reduce_bucket_size=0,
        zero_allgather_bucket_size=0,
        remote_device="none",
        use_pin_memory=False,
        cpu_optimizer=False,
        deepspeed_activation_checkpointing=False,
        partition_activations=False,
        contigious_checkpointing=False,
        checkpoint_in_cpu=False,
        synchronize_each_layer=False,
        num_layers=4,
        curriculum_learning=False,
        seq_length=1024,
        universal_checkpoint=False,
        deepspeed_config=None,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def test_missing_values_come_from_the_flags():
    args = _args(fp16=True, loss_scale=None, initial_loss_scale=2**16)
    config = reconcile_deepspeed_config({}, args)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["train_batch_size"] == 32
    assert config["gradient_accumulation_steps"] == 4  # 32 / (4 x 2)
    assert config["fp16"] == {
        "enabled": True,
        "loss_scale": 0.0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1.0,
    }
    assert config["bf16"] == {"enabled": False}
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] == 0 and args.zero_stage == 0
    assert args.ds_curriculum is None


@pytest.mark.parametrize(
    "config, args, message",
    [
        (
            {"train_micro_batch_size_per_gpu": 2},
            {},
            "--micro-batch-size 4 contradicts train_micro_batch_size_per_gpu 2 in ds.json",
        ),
        (
            {"train_batch_size": 16},
            {},
            "--global-batch-size 32 contradicts train_batch_size 16 in ds.json",
        ),
        (
            {"gradient_accumulation_steps": 1},
            {},
            "4 micro-batches (--global-batch-size 32 / (--micro-batch-size 4 x data-parallel size "
            "2)) contradicts gradient_accumulation_steps 1 in ds.json",
        ),
        ({"fp16": {"enabled": True}}, {}, "no --fp16 contradicts fp16.enabled true in ds.json"),
        (
            {"bf16": {"enabled": False}},
            {"bf16": True},
            "--bf16 contradicts bf16.enabled false in ds.json",
        ),
        (
            {"zero_optimization": {"stage": 2}},
            {"zero_stage": 3},
            "--zero-stage 3 contradicts zero_optimization.stage 2 in ds.json",
        ),
        (
            {"gradient_clipping": 0.5},
            {},
            "--clip-grad 1.0 contradicts gradient_clipping 0.5 in ds.json",
        ),
        (
            {"curriculum_learning": {"enabled": True}},
            {},
            "no --curriculum-learning contradicts curriculum_learning.enabled true in ds.json",
        ),
        (
            {},
            {"curriculum_learning": True},
            "--curriculum-learning needs a curriculum_learning block",
        ),
    ],
)
def test_contradictions_name_both_sides(config, args, message):
    with pytest.raises(DeepSpeedConfigError) as e:
        reconcile_deepspeed_config(config, _args(**args), "ds.json")
    assert message in str(e.value)


def test_zero_stage_from_the_config_and_offload():
    args = _args(cpu_optimizer=True)
    config = reconcile_deepspeed_config({"zero_optimization": {"stage": 2}}, args)
    assert args.zero_stage == 2
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_allow_untested_optimizer"] is True
    # offload in the JSON with torch's AdamW (no --cpu-optimizer)
    config = reconcile_deepspeed_config(
        {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}, _args()
    )
    assert config["zero_force_ds_cpu_optimizer"] is False


def test_curriculum_block_is_taken_out():
    """This DeepSpeed rejects the top-level block: it is removed and kept in args."""
    block = {
        "enabled": True,
        "curriculum_type": "seqlen",
        "min_difficulty": 8,
        "max_difficulty": 1024,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": 100, "difficulty_step": 8},
    }
    args = _args(curriculum_learning=True)
    config = reconcile_deepspeed_config({"curriculum_learning": block}, args)
    assert "curriculum_learning" not in config
    assert args.ds_curriculum["max_difficulty"] == 1024
    args = _args(curriculum_learning=True, seq_length=512)
    with pytest.raises(DeepSpeedConfigError, match="exceeds --seq-length 512"):
        reconcile_deepspeed_config({"curriculum_learning": block}, args)


def test_activation_checkpointing_and_universal():
    args = _args(
        deepspeed_activation_checkpointing=True,
        partition_activations=True,
        checkpoint_in_cpu=True,
        universal_checkpoint=True,
    )
    config = reconcile_deepspeed_config({}, args)
    assert config["activation_checkpointing"]["partition_activations"] is True
    assert config["activation_checkpointing"]["cpu_checkpointing"] is True
    assert config["activation_checkpointing"]["number_checkpoints"] == 4
    assert config["checkpoint"] == {"load_universal": True}


def test_input_is_not_modified(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    args = _args(deepspeed_config=str(path))
    config = build_deepspeed_config(args)
    assert config["zero_optimization"]["stage"] == 1
    assert json.loads(path.read_text()) == {"zero_optimization": {"stage": 1}}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="cannot read --deepspeed_config .*bad.json"):
        build_deepspeed_config(_args(deepspeed_config=str(bad)))


@pytest.mark.parametrize(
    "name",
    sorted(n for n in os.listdir(EXAMPLES) if n.startswith("ds_config_gpt") and n.endswith(".json"))
    if os.path.isdir(EXAMPLES)
    else [],
)
def test_example_configs_agree_with_their_scripts_flags(name):
    """The example JSONs hold only values that the example scripts' flags agree with
    (micro-batch 4, global batch 32 at data-parallel 8)."""
    with open(os.path.join(EXAMPLES, name)) as f:
        config = json.load(f)
    args = _args(
        micro_batch_size=4,
        global_batch_size=32,
        data_parallel_size=8,
        fp16=config.get("fp16", {}).get("enabled", False),
        bf16=config.get("bf16", {}).get("enabled", False),
        curriculum_learning="curriculum_learning" in config,
    )
    out = reconcile_deepspeed_config(config, args, name)
    assert out["train_batch_size"] == 32


def _optimizer_args(**overrides):
    values = dict(lr=None, min_lr=0.0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
                  adam_eps=1e-8, sgd_momentum=0.9, optimizer="adam")
    values.update(overrides)
    return _args(**values)


def test_optimizer_block_sets_the_flags_left_at_their_defaults():
    args = _optimizer_args()
    block = {"type": "AdamW", "params": {"lr": 0.5, "betas": [0.8, 0.95], "eps": 1e-6,
                                         "weight_decay": 0.1, "adam_w_mode": True}}
    config = reconcile_deepspeed_config({"optimizer": block}, args, "ds.json")
    assert "optimizer" not in config  # the optimizer handed to DeepSpeed is built from args
    assert (args.lr, args.adam_beta1, args.adam_beta2, args.adam_eps, args.weight_decay) == (
        0.5, 0.8, 0.95, 1e-6, 0.1)
    args = _optimizer_args(optimizer="adam")
    reconcile_deepspeed_config({"optimizer": {"type": "SGD", "params": {"momentum": 0.5}}},
                               args, "ds.json")
    assert (args.optimizer, args.sgd_momentum) == ("sgd", 0.5)


@pytest.mark.parametrize(
    "block, overrides, message",
    [
        ({"type": "AdamW", "params": {"lr": 0.5}}, {"lr": 0.001},
         "--lr 0.001 contradicts optimizer.params.lr 0.5 in ds.json"),
        ({"type": "Adam", "params": {"weight_decay": 0.1}}, {"weight_decay": 0.05},
         "--weight-decay 0.05 contradicts optimizer.params.weight_decay 0.1 in ds.json"),
        ({"type": "Lamb", "params": {}}, {}, 'optimizer.type "Lamb" in ds.json'),
        ({"type": "Adam", "params": {"adam_w_mode": False}}, {},
         'optimizer.params.adam_w_mode false in ds.json has no Megatron flag'),
        ({"type": "Adam", "params": {"lr": 0.001}}, {"min_lr": 0.01},
         "--min-lr 0.01 is larger than the learning rate 0.001 of ds.json"),
    ],
)
def test_optimizer_block_contradictions_name_key_and_flag(block, overrides, message):
    with pytest.raises(DeepSpeedConfigError) as exc:
        reconcile_deepspeed_config({"optimizer": block}, _optimizer_args(**overrides), "ds.json")
    assert str(exc.value).startswith(message)


def test_scheduler_block_is_refused():
    config = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}
    with pytest.raises(DeepSpeedConfigError, match='scheduler block \\("WarmupLR"\\) in ds.json'):
        reconcile_deepspeed_config(config, _optimizer_args(), "ds.json")


def test_sequence_parallel_turns_off_pipeline_message_partitioning():
    """DeepSpeed's pipeline engine splits its messages over the TP ranks unless told not
    to; under --sequence-parallel the TP ranks hold different tokens."""
    args = _args(sequence_parallel=True, tensor_model_parallel_size=2)
    config = reconcile_deepspeed_config({"pipeline": {"activation_checkpoint_interval": 0}}, args)
    assert config["pipeline"] == {
        "activation_checkpoint_interval": 0, "pipe_partitioned": False, "grad_partitioned": False
    }
    with pytest.raises(DeepSpeedConfigError, match=r'"pipe_partitioned": true.*--sequence-parallel'):
        reconcile_deepspeed_config({"pipeline": {"pipe_partitioned": True}}, args, "ds.json")
    # without sequence parallelism (or at TP=1) DeepSpeed's defaults stay
    for other in (_args(sequence_parallel=False, tensor_model_parallel_size=2),
                  _args(sequence_parallel=True, tensor_model_parallel_size=1)):
        assert "pipeline" not in reconcile_deepspeed_config({}, other)
