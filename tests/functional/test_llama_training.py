"""pretrain_gpt.py with the LLaMA-family flags (RoPE, SwiGLU, RMSNorm, grouped-query
attention, untied output weights, no linear biases) trains, writes the untied output
layer into its checkpoint, and under DeepSpeed's pipeline engine (GPTModelPipe, PP=2)
gives the losses of the one-process run (CPU, fp32, no dropout). Megatron's own PP=2 with
these options is checked against PP=1 in tests/unit/model/test_llama_layers.py."""

from __future__ import annotations

import os

import pytest
import torch

from .gpt_runs import launch, parse_log, preprocess, rel_close, run_pretrain, tiny_gpt_args

pytestmark = pytest.mark.slow

ITERS = 20
LLAMA_FLAGS = [
    "--use-rotary-position-embeddings", "--swiglu", "--normalization", "rmsnorm",
    "--layernorm-epsilon", "1e-6", "--num-key-value-heads", "2",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0",
]


def _llama_args(data_path: str, vocab_dir: str) -> list[str]:
    args = tiny_gpt_args(data_path, vocab_dir, ITERS)
    for flag in ("--hidden-dropout", "--attention-dropout", "--eval-iters"):
        index = args.index(flag)
        del args[index : index + 2]
    return args + LLAMA_FLAGS


def _losses(stdout: str) -> list[float]:
    rows = parse_log(stdout)
    assert sorted(rows) == list(range(1, ITERS + 1)), stdout[-3000:]
    return [float(rows[i]["loss"]) for i in range(1, ITERS + 1)]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, vocab_dir):
    return preprocess(str(tmp_path_factory.mktemp("data")), vocab_dir)


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory, data_path, vocab_dir):
    save = str(tmp_path_factory.mktemp("llama_ckpt"))
    proc = run_pretrain(_llama_args(data_path, vocab_dir) + ["--save", save])
    return _losses(proc.stdout), save


def test_llama_loss_falls_and_checkpoint_holds_the_output_layer(serial_run):
    losses, save = serial_run
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5 and losses[-1] < min(losses[:5]) - 0.5, losses
    path = os.path.join(save, f"iter_{ITERS:07d}", "mp_rank_00", "model_optim_rng.pt")
    model = torch.load(path, map_location="cpu", weights_only=False)["model"]["language_model"]
    assert sorted(model) == ["embedding", "output_layer", "transformer"]
    assert list(model["embedding"]) == ["word_embeddings"]  # no learned positions
    layer = {k: v for k, v in model["transformer"].items() if k.startswith("layers.0.")}
    assert not any(k.endswith(".bias") for k in layer), sorted(layer)
    assert layer["layers.0.self_attention.query_key_value.weight"].shape == (128, 64)
    assert layer["layers.0.mlp.dense_h_to_4h.weight"].shape == (256, 64)
    embedding = model["embedding"]["word_embeddings"]["weight"]
    assert model["output_layer"]["weight"].shape == embedding.shape


def test_llama_deepspeed_pipeline_equals_serial(serial_run, data_path, vocab_dir):
    losses, _ = serial_run
    pipe = ["--deepspeed", "--zero-stage", "1", "--pipeline-model-parallel-size", "2"]
    stdout = launch(2, _llama_args(data_path, vocab_dir) + pipe)
    for it, (a, b) in enumerate(zip(_losses(stdout), losses), start=1):
        assert rel_close(a, b, 1e-4), (it, a, b)
