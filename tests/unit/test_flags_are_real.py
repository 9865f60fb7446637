"""Every flag of the parser does something or is refused; --init-method-xavier-uniform.

A flag whose dest nothing outside megatron/arguments.py reads parses, and then a user's
run silently ignores it. The walk below fails for such a flag unless validate_args
refuses it (UNSUPPORTED_FLAGS) or ALLOWED_IN_ARGUMENTS says why arguments.py alone acts
on it.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import shlex

import pytest
import torch

from megatron.arguments import UNSUPPORTED_FLAGS, ArgumentError, build_parser, validate_args

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# dest -> why it is legitimately read only inside megatron/arguments.py
ALLOWED_IN_ARGUMENTS = {
    "model_parallel_size": "deprecated; validate_args folds it into tensor_model_parallel_size",
    "batch_size": "deprecated; validate_args folds it into micro_batch_size",
    "warmup": "deprecated; validate_args folds it into lr_warmup_fraction",
    "deepscale": "DeepSpeed's deprecated spelling; validate_args folds it into deepspeed",
    "deepscale_config": "DeepSpeed's deprecated spelling; folded into deepspeed_config",
    "no_pipeline_parallel": "validate_args turns it into ds_pipeline_enabled",
    "use_checkpoint_args": "parse_args applies the checkpoint's flags before validation",
    "recompute_activations": "validate_args folds it into recompute_granularity",
    "checkpoint_num_layers": "validate_args folds it into recompute_num_layers",
    "distribute_checkpointed_activations": "folded into distribute_saved_activations",
    "activations_checkpoint_method": "the older --recompute-method; folded into it",
    "use_flash_attn_v2": "validate_args folds it into use_flash_attn",
    "use_flash_attn_triton": "validate_args folds it into use_flash_attn",
    "use_flash_attn_builder": "validate_args folds it into use_flash_attn",
}

SOURCE_GLOBS = ("megatron/**/*.py", "pretrain_*.py", "tools/**/*.py", "tasks/**/*.py")


def _source() -> str:
    skip = os.path.join(ROOT, "megatron", "arguments.py")
    texts = []
    for pattern in SOURCE_GLOBS:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            if os.path.abspath(path) != skip:
                with open(path, encoding="utf-8") as f:
                    texts.append(f.read())
    return "\n".join(texts)


def _config_fields() -> set[str]:
    from megatron.model.config import TransformerConfig

    return {f.name for f in dataclasses.fields(TransformerConfig)}


def _is_read(dest: str, source: str, config_fields: set[str]) -> bool:
    """args.<dest>, get_args().<dest>, getattr(args, "<dest>"...), or, for a field that
    config_from_args copies from args, config.<dest> / getattr(config, "<dest>"...)."""
    patterns = [rf"args\.{dest}\b", rf"get_args\(\)\.{dest}\b",
                rf"getattr\(\s*[\w.]*args\s*,\s*[\"']{dest}[\"']",
                rf"getattr\(\s*[\w.]*config\s*,\s*[\"']{dest}[\"']"]
    if dest in config_fields:
        patterns.append(rf"config\.{dest}\b")
    return any(re.search(p, source) for p in patterns)


def test_every_flag_is_read_or_refused():
    parser = build_parser()
    dests = sorted({a.dest for a in parser._actions if a.dest != "help"})
    refused = {dest for dest, *_ in UNSUPPORTED_FLAGS}
    source, fields = _source(), _config_fields()
    unread = [d for d in dests
              if d not in refused and d not in ALLOWED_IN_ARGUMENTS and not _is_read(d, source, fields)]
    assert unread == [], (
        f"flags nothing reads: {unread}; implement them, refuse them in "
        "megatron/arguments.py UNSUPPORTED_FLAGS, or say in ALLOWED_IN_ARGUMENTS why "
        "arguments.py alone acts on them")
    # the lists stay honest: each entry is a real dest, and a refused flag is not read
    assert set(ALLOWED_IN_ARGUMENTS) <= set(dests)
    assert refused <= set(dests)
    still_read = [d for d in refused if _is_read(d, source, fields)]
    assert still_read == [], f"refused flags that code reads: {still_read}"


BASE = ("--num-layers 2 --hidden-size 8 --num-attention-heads 2 --max-position-embeddings 16 "
        "--seq-length 16 --micro-batch-size 1 --train-iters 4")


def _validate(flags: str):
    args = build_parser().parse_args(shlex.split(BASE + " " + flags))
    return validate_args(args, world_size=1, rank=1)


@pytest.mark.parametrize("dest,flag,inert,feature", UNSUPPORTED_FLAGS,
                         ids=[f for _, f, _, _ in UNSUPPORTED_FLAGS])
def test_unsupported_flag_is_one_line_error_naming_it(dest, flag, inert, feature):
    given = flag if isinstance(inert, bool) or inert is None else f"{flag} 7"
    with pytest.raises(ArgumentError) as info:
        _validate(given)
    message = str(info.value)
    assert message == f"{flag}: {feature} is not supported here"
    assert "\n" not in message
    # the inert default is no error
    assert getattr(_validate(""), dest) == inert


def test_unsupported_flag_refused_before_process_groups(monkeypatch):
    """parse_args exits with the one-line error; no process group was built for it."""
    from megatron.arguments import parse_args

    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("process group built"))
    with pytest.raises(SystemExit) as info:
        parse_args(args_list=shlex.split(BASE + " --scattered-embeddings"))
    assert info.value.code == 2
    assert not torch.distributed.is_initialized()


def test_deepscale_spellings_fold_into_deepspeed():
    args = _validate("--deepscale --deepscale_config ds.json")
    assert args.deepspeed is True and args.deepspeed_config == "ds.json"
    with pytest.raises(ArgumentError, match="--deepscale_config .* --deepspeed_config"):
        _validate("--deepspeed --deepscale_config a.json --deepspeed_config b.json")


# ----------------------------------------------------------------------------------------
# --init-method-xavier-uniform
# ----------------------------------------------------------------------------------------


def _tiny_config(xavier: bool):
    from megatron.model.config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               padded_vocab_size=128, max_position_embeddings=32,
                               use_cpu_initialization=True, seed=1234)
    config.init_method_xavier_uniform = xavier
    return config


def test_init_methods_choose_xavier_uniform():
    from megatron.model.utils import init_methods, xavier_uniform_init

    assert init_methods(_tiny_config(True)) == (xavier_uniform_init, xavier_uniform_init)
    normal, scaled = init_methods(_tiny_config(False))
    torch.manual_seed(0)
    w = normal(torch.empty(256, 256))
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    w = scaled(torch.empty(256, 256))
    assert w.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.02)


def test_parallel_linear_equals_torch_xavier_uniform_under_the_same_seed():
    from megatron.model.utils import xavier_uniform_init
    from megatron.mpu.layers import ColumnParallelLinear, ParallelConfig, RowParallelLinear

    cpu = ParallelConfig(use_cpu_initialization=True)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        torch.manual_seed(42)
        layer = cls(48, 80, init_method=xavier_uniform_init, config=cpu)
        torch.manual_seed(42)
        expected = torch.nn.init.xavier_uniform_(torch.empty(80, 48))
        assert torch.equal(layer.weight.detach(), expected), cls.__name__


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()
            if name.endswith(".weight") and p.dim() == 2 and "layernorm" not in name
            and "embedding" not in name}


def test_gpt_linear_layers_are_xavier_uniform():
    """Every transformer linear weight of a GPT built with the flag is U(-a, a) with
    a = sqrt(6 / (fan_in + fan_out)): none outside, the extremes near a, std a / sqrt(3)."""
    from megatron.model import GPTModel

    weights = _linear_weights(GPTModel(_tiny_config(True)))
    normal = _linear_weights(GPTModel(_tiny_config(False)))
    assert len(weights) == 8  # qkv, dense, h_to_4h, 4h_to_h of two layers
    for name, w in weights.items():
        fan_out, fan_in = w.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max().item() <= bound, name
        assert w.abs().max().item() > 0.98 * bound, name
        assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05), name
        assert abs(w.mean().item()) < 0.05 * bound, name
        assert normal[name].std().item() < 0.021  # the default stays N(0, 0.02^2) or less


def test_flag_reaches_the_model_config():
    from megatron.model.config import config_from_args

    config = config_from_args(_validate("--init-method-xavier-uniform"))
    assert getattr(config, "init_method_xavier_uniform", False) is True
