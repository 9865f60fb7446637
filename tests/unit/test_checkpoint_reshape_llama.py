"""The checkpoint reshape tables on tiny LLaMA-family models (RoPE, SwiGLU, RMSNorm,
grouped-query attention, untied output layer, no linear biases).

The TP=2 x PP=2 state dicts come from the model classes themselves: each (tensor rank,
pipeline rank) model is built in this process with mpu's rank and size overrides (no
process group is needed to build a model, only to run it). Every layer initialises its
full weight from the same seed and keeps its own slice (mpu/layers.py `_rank_slice`), so
these shards are the ground truth the tables must reproduce: splitting the TP=1 model
must give them exactly, and merging them must give the TP=1 model back exactly.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex

import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.arguments import build_parser, validate_args
from megatron.checkpoint_reshape import (
    ModelOptions,
    ReshapeError,
    flatten_state,
    from_canonical,
    merge_tensor_parallel,
    reshape_checkpoint,
    split_pipeline,
    to_canonical,
    unflatten_state,
)
from megatron.model import GPTModel
from megatron.model.config import config_from_args

from .test_checkpoint_incomplete import _tool_main

VOCAB, HIDDEN, HEADS, HN, FFN, LAYERS = 128, 64, 4, 16, 128, 4
LLAMA_FLAGS = (
    f"--num-layers {LAYERS} --hidden-size {HIDDEN} --num-attention-heads {HEADS} "
    "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 1 "
    "--make-vocab-size-divisible-by 64 --use-rotary-position-embeddings --swiglu "
    "--normalization rmsnorm"
)
LM = ("language_model",)
TRANSFORMER = LM + ("transformer",)
OUTPUT = LM + ("output_layer", "weight")
WORD = LM + ("embedding", "word_embeddings", "weight")


@pytest.fixture(autouse=True)
def _one_thread_no_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(kv: int, tp: int = 1, pp: int = 1, bias: bool = False, untie: bool = True):
    """Validated args of the tiny LLaMA at TP x PP, as pretrain_gpt.py would save them."""
    flags = (
        f"{LLAMA_FLAGS} --num-key-value-heads {kv} --tensor-model-parallel-size {tp} "
        f"--pipeline-model-parallel-size {pp} {'' if bias else '--disable-bias-linear'} "
        + ("--untie-embeddings-and-output-weights" if untie else "")
    )
    args = validate_args(build_parser().parse_args(shlex.split(flags)), world_size=tp * pp, rank=0)
    args.padded_vocab_size = VOCAB  # set by the tokenizer in a real run
    return args


def _model(args, t: int = 0, p: int = 0, seed: int = 1234) -> GPTModel:
    """The model of tensor rank t, pipeline rank p of args' layout."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    mpu.set_tensor_model_parallel_world_size(tp)
    mpu.set_tensor_model_parallel_rank(t)
    mpu.set_pipeline_model_parallel_world_size(pp)
    mpu.set_pipeline_model_parallel_rank(p)
    try:
        mpu.model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        config = config_from_args(args, use_cpu_initialization=True)
        return GPTModel(config, pre_process=p == 0, post_process=p == pp - 1)
    finally:
        mpu.clear_model_parallel_overrides()


def _state(args, t: int = 0, p: int = 0, seed: int = 1234) -> dict:
    return _model(args, t, p, seed).state_dict_for_save_checkpoint()


def _grid(args) -> dict:
    """{(t, p): nested model state} of every rank of args' layout."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    return {(t, p): _state(args, t, p) for t in range(tp) for p in range(pp)}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _layer0(name: str) -> tuple:
    return TRANSFORMER + (f"layers.0.{name}",)


# ----------------------------------------------------------------------------------------
# The tables against the model classes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv, bias", [(1, False), (2, False), (4, True)], ids=["kv1", "kv2", "kv4"])
def test_model_shards_are_the_split_of_the_serial_model(kv, bias):
    """GQA with 1, 2 and 4 (= heads) key/value heads: PP=2 at the largest TP that divides
    the KV heads (1 for one KV head, else 2) from the model classes equals the split of
    the TP=1 model, and merges back to it exactly."""
    tp = 2 if kv % 2 == 0 else 1
    serial = flatten_state(_state(_args(kv, bias=bias)))
    grid = _grid(_args(kv, tp, 2, bias=bias))
    options = ModelOptions.from_args(_args(kv, tp, 2, bias=bias))
    assert options == ModelOptions(True, HEADS, kv, FFN)
    split = from_canonical(serial, tp, 2, options=options)
    assert sorted(split) == sorted(grid)
    for rank, state in grid.items():
        _assert_same(flatten_state(split[rank]), flatten_state(state))
    _assert_same(to_canonical({k: [v] for k, v in grid.items()}, options), serial)

    last = flatten_state(grid[(0, 1)])
    assert OUTPUT in last and not any(k[0] == "word_embeddings_for_head" for k in last)
    assert not any("position_embeddings" in k for k in serial)
    assert not any(k[-1].endswith("layernorm.bias") for k in serial)
    # each rank's QKV rows are whole groups [q_1 .. q_r, k, v] of the serial weight
    qkv = _layer0("self_attention.query_key_value.weight")
    groups = serial[qkv].view(kv, (HEADS // kv + 2) * HN, HIDDEN)
    for t in range(tp):
        mine = groups[t * kv // tp : (t + 1) * kv // tp].reshape(-1, HIDDEN)
        assert torch.equal(flatten_state(grid[(t, 0)])[qkv], mine)
    if kv == 1:
        with pytest.raises(ReshapeError, match=r"--num-key-value-heads \(1\) is not divisible"):
            from_canonical(serial, 2, 1, options=options)


def test_swiglu_shard_is_its_gate_rows_then_its_up_rows():
    """dense_h_to_4h [G; U] (weight and bias) splits with stride 2: rank r holds
    [G_r; U_r], and the ranks' silu(x G_r + g_r) * (x U_r + u_r) B_r sum to the MLP."""
    args = _args(4, bias=True)
    serial = flatten_state(_state(args))
    w_in, b_in = _layer0("mlp.dense_h_to_4h.weight"), _layer0("mlp.dense_h_to_4h.bias")
    w_out = _layer0("mlp.dense_4h_to_h.weight")
    gen = torch.Generator().manual_seed(0)
    serial[b_in] = torch.randn(2 * FFN, generator=gen)  # the model starts biases at zero
    options = ModelOptions.from_args(args)
    x = torch.randn(3, HIDDEN, dtype=torch.float64, generator=gen)
    g, u = serial[w_in].double().chunk(2), serial[b_in].double().chunk(2)
    ref = (F.silu(x @ g[0].T + u[0]) * (x @ g[1].T + u[1])) @ serial[w_out].double().T
    for tp in (2, 4):
        n = FFN // tp
        shards = [
            flatten_state(from_canonical(serial, tp, 1, options=options)[(t, 0)]) for t in range(tp)
        ]
        out = 0
        for t, shard in enumerate(shards):
            rows = torch.cat([serial[w_in][t * n : (t + 1) * n], serial[w_in][FFN + t * n :][:n]])
            assert torch.equal(shard[w_in], rows)
            bias = torch.cat([serial[b_in][t * n : (t + 1) * n], serial[b_in][FFN + t * n :][:n]])
            assert torch.equal(shard[b_in], bias)
            gate, up = (x @ shard[w_in].double().T + shard[b_in].double()).chunk(2, dim=-1)
            out = out + (F.silu(gate) * up) @ shard[w_out].double().T
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(merge_tensor_parallel(shards, swiglu=True)[w_in], serial[w_in])
        with pytest.raises(ReshapeError, match="a SwiGLU MLP's shapes, but the saved args say no"):
            merge_tensor_parallel(shards, swiglu=False)
    # without the saved args the shapes tell (dense_h_to_4h has 2 ffn rows for ffn columns)
    assert torch.equal(merge_tensor_parallel(shards)[w_in], serial[w_in])


def test_untied_output_layer_is_vocab_parallel_and_repadded():
    """output_layer splits over the vocabulary like the word embeddings, is re-padded
    with them for another TP (true vocab rows kept, new rows zero), lives on the last
    stage, and an untied model gets no word_embeddings_for_head copy."""
    serial = flatten_state(_state(_args(4)))
    options = ModelOptions.from_args(_args(4))
    grid = from_canonical(serial, 4, 2, padded_vocab=256, true_vocab_size=100, options=options)
    for t in range(4):
        last = flatten_state(grid[(t, 1)])
        assert last[OUTPUT].shape == (64, HIDDEN)
        assert (OUTPUT in last, WORD in last) == (True, False)
        assert not any(k[0] == "word_embeddings_for_head" for k in last)
        assert OUTPUT not in flatten_state(grid[(t, 0)])
    merged = to_canonical({k: [v] for k, v in grid.items()}, options)
    for key in (OUTPUT, WORD):
        assert merged[key].shape == (256, HIDDEN)
        assert torch.equal(merged[key][:VOCAB], serial[key])
        assert torch.count_nonzero(merged[key][VOCAB:]) == 0
    # the tied model's last stage carries the copy of the word embeddings instead
    tied = flatten_state(_state(_args(2, untie=False)))
    assert OUTPUT not in tied
    last = split_pipeline(tied, 2)[1]
    assert torch.equal(last[("word_embeddings_for_head", "weight")], tied[WORD])


# ----------------------------------------------------------------------------------------
# Checkpoint files and the tools
# ----------------------------------------------------------------------------------------


def _write(folder, grid: dict, args, iteration: int = 7) -> str:
    pp = args.pipeline_model_parallel_size
    for (t, p), model in grid.items():
        sub = f"mp_rank_{t:02d}_{p:03d}" if pp > 1 else f"mp_rank_{t:02d}"
        path = os.path.join(folder, f"iter_{iteration:07d}", sub, "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path))
        state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model}
        torch.save(state, path)
    with open(os.path.join(folder, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return str(folder)


def _read(folder, sub: str) -> dict:
    path = os.path.join(folder, "iter_0000007", sub, "model_optim_rng.pt")
    return torch.load(path, weights_only=False)


def test_checkpoint_util_reshapes_tp2_pp2_to_tp1_and_back(tmp_path, capsys):
    """tools/checkpoint_util.py: the TP=2 x PP=2 files to TP=1 x PP=1 load strictly into
    the TP=1 model and equal it; reshaped back they equal the TP=2 x PP=2 files."""
    args = _args(2, 2, 2)
    grid = _grid(args)
    src = _write(tmp_path / "src", grid, args)
    tp1 = str(tmp_path / "tp1")
    main = _tool_main("checkpoint_util.py")
    assert main(["--load-dir", src, "--save-dir", tp1, "--true-vocab-size", "100"]) == 0
    assert "to " + tp1 + " (TP=1, PP=1, padded vocab 128)" in capsys.readouterr().out
    state = _read(tp1, "mp_rank_00")
    assert state["args"].tensor_model_parallel_size == 1 and state["args"].swiglu
    assert state["args"].num_key_value_heads == 2 and state["args"].padded_vocab_size == VOCAB
    model = _model(_args(2), seed=99)
    model.load_state_dict(state["model"])  # strict: exactly the TP=1 model's keys
    _assert_same(
        flatten_state(model.state_dict_for_save_checkpoint()), flatten_state(_state(_args(2)))
    )

    back = str(tmp_path / "back")
    reshape_checkpoint(tp1, back, 2, 2, true_vocab_size=100)
    for (t, p), model_state in grid.items():
        _assert_same(
            flatten_state(_read(back, f"mp_rank_{t:02d}_{p:03d}")["model"]),
            flatten_state(model_state),
        )


def test_merge_mp_partitions_with_llama_flags(tmp_path, capsys):
    """tools/merge_mp_partitions.py merges TP=2 to TP=1 x PP=2 with the model's flags,
    and names a LLaMA flag that the checkpoint contradicts."""
    args = _args(2, 2, 1)
    src = _write(tmp_path / "src", _grid(args), args)
    main = _tool_main("merge_mp_partitions.py")
    flags = shlex.split(
        f"--model-type GPT {LLAMA_FLAGS} --untie-embeddings-and-output-weights "
        "--disable-bias-linear --tensor-model-parallel-size 2 "
        f"--pipeline-model-parallel-size 1 --target-pipeline-model-parallel-size 2 --load {src}"
    )
    out = str(tmp_path / "merged")
    assert main(flags + ["--num-key-value-heads", "2", "--save", out]) == 0
    stages = [_read(out, f"mp_rank_00_{p:03d}")["model"] for p in range(2)]
    _assert_same(
        to_canonical({(0, p): [s] for p, s in enumerate(stages)}), flatten_state(_state(_args(2)))
    )
    assert main(flags + ["--num-key-value-heads", "4", "--save", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"merge_mp_partitions.py: error: --num-key-value-heads: checkpoint {src} has 2, "
        "the flags say 4"
    )
    assert not os.path.exists(tmp_path / "x")


def test_what_cannot_be_reshaped_is_refused(tmp_path, capsys):
    args = _args(2, 2, 1)
    grid = _grid(args)
    src = _write(tmp_path / "src", grid, args)
    main = _tool_main("checkpoint_util.py")
    assert (
        main(
            [
                "--load-dir",
                src,
                "--save-dir",
                str(tmp_path / "tp4"),
                "--target-tensor-parallel-size",
                "4",
            ]
        )
        == 1
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "checkpoint_util.py: error: target tensor-parallel size 4: --num-key-value-heads (2) "
        "is not divisible by it (each rank must hold whole key/value groups)"
    )
    assert not os.path.exists(tmp_path / "tp4")
    with pytest.raises(ReshapeError) as error:
        reshape_checkpoint(src, str(tmp_path / "tp3"), 3, 1)
    assert str(error.value) == (
        "target tensor-parallel size 3: --num-attention-heads (4) is not divisible by it (each "
        "rank must hold whole attention heads); --num-key-value-heads (2) is not divisible by "
        "it (each rank must hold whole key/value groups); the SwiGLU --ffn-hidden-size (128) "
        "is not divisible by it (each rank must hold ffn/TP gate and up rows)"
    )

    def refused(name, change, match):
        folder = tmp_path / name
        changed = {
            rank: unflatten_state(change(dict(flatten_state(s)))) for rank, s in grid.items()
        }
        saved = argparse.Namespace(**vars(args))
        _write(folder, changed, saved)
        with pytest.raises(ReshapeError, match=match):
            reshape_checkpoint(str(folder), str(tmp_path / f"{name}_out"), 1, 1)
        assert not os.path.exists(tmp_path / f"{name}_out")

    def add_norm_bias(state):
        state[_layer0("input_layernorm.bias")] = torch.zeros(HIDDEN)
        return state

    refused(
        "norm_bias",
        add_norm_bias,
        r"holds language_model\.transformer\.layers\.0\."
        r"input_layernorm\.bias, which a model saved with --normalization rmsnorm",
    )
    refused(
        "no_output",
        lambda s: {k: v for k, v in s.items() if k != OUTPUT},
        "the saved args say --untie-embeddings-and-output-weights but the files hold no",
    )
    args.swiglu = False  # files of a SwiGLU model whose args say GeLU
    refused(
        "gelu_args",
        lambda s: s,
        r"dense_h_to_4h\.weight has shape \[128, 64\] but the "
        r"saved args \(TP=2\) give \[64, 64\]",
    )


# ----------------------------------------------------------------------------------------
# DeepSpeed universal checkpoints
# ----------------------------------------------------------------------------------------


def test_universal_checkpoint_info_of_a_llama():
    """The tables ds_to_universal reads, for the LLaMA's parameter names: SwiGLU's
    dense_h_to_4h as two sub-parameters, both vocabulary tensors with all padded rows,
    RMSNorm weights replicated; every pattern matches from the start of a name."""
    from deepspeed.checkpoint import constants as c

    from megatron.deepspeed_engine import universal_checkpoint_info

    names = [
        "language_model.embedding.word_embeddings.weight",
        "language_model.transformer.layers.0.input_layernorm.weight",
        "language_model.transformer.layers.0.self_attention.query_key_value.weight",
        "language_model.transformer.layers.0.self_attention.dense.weight",
        "language_model.transformer.layers.0.post_attention_layernorm.weight",
        "language_model.transformer.layers.0.mlp.dense_h_to_4h.weight",
        "language_model.transformer.layers.0.mlp.dense_4h_to_h.weight",
        "language_model.transformer.final_layernorm.weight",
        "language_model.output_layer.weight",
    ]
    info = universal_checkpoint_info(names, 2, swiglu=True, padded_vocab_size=128)
    assert info[c.ORIGINAL_VOCAB_SIZE] == 128
    match = {
        key: {n for n in names if any(re.match(p, n) for p in info[key])}
        for key in (
            c.TP_REPLICATED_PARAMETER_PATTERNS,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
            c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
            c.VOCABULARY_PARAMETER_PATTERNS,
        )
    }
    assert match == {
        c.TP_REPLICATED_PARAMETER_PATTERNS: {names[1], names[4], names[7]},
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: {names[3], names[6]},
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: {names[5]},
        c.VOCABULARY_PARAMETER_PATTERNS: {names[0], names[8]},
    }
    gelu = universal_checkpoint_info(names, 1, swiglu=False, padded_vocab_size=128)
    assert c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0 not in gelu
    assert gelu[c.TP_REPLICATED_PARAMETER_PATTERNS] == info[c.TP_REPLICATED_PARAMETER_PATTERNS]
