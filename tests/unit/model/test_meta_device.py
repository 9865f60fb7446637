"""Models build under `with torch.device("meta")` without allocating: a 175B GPT is
counted within 2 GiB of host memory and its count equals the closed-form formula, and the
tiny GPT, LLaMA, BERT and T5 have the same parameters (names, shapes, split attributes)
on the meta device as when built for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron import mpu
from megatron.model import BertModel, GPTModel, T5Model
from megatron.model.utils import count_parameters_on_meta
from tests.unit.model.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

# GPT-3 175B (examples/pretrain_gpt3_175B.sh): l 96, h 12288, 96 heads, s 2048, V 51200
_GPT3 = dict(layers=96, hidden=12288, heads=96, seq=2048, vocab=51200)

_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from megatron.model import GPTModel
    from megatron.model.config import TransformerConfig
    from megatron.model.utils import count_parameters_on_meta

    l, h, heads, s, v = (int(x) for x in sys.argv[1:6])
    config = TransformerConfig(
        num_layers=l, hidden_size=h, num_attention_heads=heads, padded_vocab_size=v,
        max_position_embeddings=s,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.time()
    with torch.device("meta"):
        model = GPTModel(config)
    params = list(model.parameters())
    out = {
        "total": sum(p.numel() for p in params),
        "all_meta": all(p.is_meta for p in params),
        "helper": count_parameters_on_meta(config),
        # one GPU's share at TP=8 x PP=16: first, a middle and the last stage
        "tp8_pp16": [
            count_parameters_on_meta(
                config, tensor_model_parallel_size=8, pipeline_model_parallel_size=16,
                pipeline_model_parallel_rank=r,
            )
            for r in (0, 7, 15)
        ],
        "seconds": time.time() - start,
    }
    out["rss_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps(out))
    """
)


def _layer_params(h: int, tp: int = 1) -> int:
    """One GPT layer on one of tp ranks: QKV (3h^2 + 3h)/tp, dense h^2/tp + h (bias
    replicated), h->4h (4h^2 + 4h)/tp, 4h->h 4h^2/tp + h, two layer norms 4h."""
    return (12 * h * h + 7 * h) // tp + 6 * h


def test_gpt3_175b_builds_on_meta_within_2gib():
    layers, h, heads, s, v = (_GPT3[k] for k in ("layers", "hidden", "heads", "seq", "vocab"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(layers), str(h), str(heads), str(s), str(v)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # word + position embeddings, l layers, final layer norm (the head is tied)
    expected = v * h + s * h + layers * _layer_params(h) + 2 * h
    assert expected == 174_615_846_912  # the "175B" of the GPT-3 paper
    assert out["total"] == expected and out["helper"] == expected
    assert out["all_meta"]
    per_stage = 96 // 16 * _layer_params(h, 8)
    assert out["tp8_pp16"] == [
        per_stage + v // 8 * h + s * h,  # word embeddings split over TP, positions replicated
        per_stage,
        per_stage + 2 * h + v // 8 * h,  # final layer norm and the tied head's copy
    ]
    assert out["rss_growth_kib"] < 2 * 1024 * 1024, (
        f"building on meta grew the peak RSS by {out['rss_growth_kib'] / 1024:.0f} MiB"
    )


_CONFIGS = {
    "gpt": (GPTModel, {}),
    "llama": (
        GPTModel,
        dict(
            use_rotary_position_embeddings=True,
            swiglu=True,
            normalization="rmsnorm",
            num_key_value_heads=2,
            untie_embeddings_and_output_weights=True,
            add_bias_linear=False,
        ),
    ),
    "bert": (BertModel, {}),
    "t5": (T5Model, {}),
}


def _shapes(model: torch.nn.Module) -> dict:
    return {
        name: (
            tuple(p.shape),
            p.dtype,
            getattr(p, "tensor_model_parallel", False),
            getattr(p, "partition_dim", -1),
            getattr(p, "partition_stride", 1),
        )
        for name, p in model.named_parameters()
    }


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_meta_build_has_the_real_parameters(name):
    cls, overrides = _CONFIGS[name]
    config = tiny_config(**overrides)
    real = cls(config)
    with torch.device("meta"):
        meta = cls(config)
    assert all(p.is_meta for p in meta.parameters())
    assert not any(p.is_meta for p in real.parameters())
    assert _shapes(meta) == _shapes(real)
    n_real = sum(p.numel() for p in real.parameters())
    assert count_parameters_on_meta(config, model=name if name != "llama" else "gpt") == n_real
    if name == "gpt":
        # TP=2 x PP=2 shares equal the real build of each stage under the same layout
        for stage in (0, 1):
            with mpu.model_parallel_overrides(2, 0, 2, stage):
                built = GPTModel(config, pre_process=stage == 0, post_process=stage == 1)
            n_stage = sum(p.numel() for p in built.parameters())
            got = count_parameters_on_meta(
                config,
                tensor_model_parallel_size=2,
                pipeline_model_parallel_size=2,
                pipeline_model_parallel_rank=stage,
            )
            assert got == n_stage, f"stage {stage}: {got} != {n_stage}"
        assert mpu.get_pipeline_model_parallel_world_size() == 1  # the layout came back


def test_count_parameters_on_meta_rejects_bad_input():
    with pytest.raises(ValueError, match="padded_vocab_size"):
        count_parameters_on_meta(tiny_config(padded_vocab_size=0))
    with pytest.raises(ValueError, match="model must be one of"):
        count_parameters_on_meta(tiny_config(), model="gpt2")
    with pytest.raises(ValueError, match="pipeline_model_parallel_rank"):
        count_parameters_on_meta(
            tiny_config(), pipeline_model_parallel_size=2, pipeline_model_parallel_rank=2
        )
