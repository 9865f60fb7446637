"""The checkpoint reshape tables on random state dicts (no process groups)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from megatron.checkpoint_reshape import (
    ReshapeError,
    flatten_state,
    from_canonical,
    merge_pipeline,
    partition_rule,
    reshape_checkpoint,
    split_pipeline,
    split_tensor_parallel,
    to_canonical,
    unflatten_state,
)

LAYERS, HIDDEN, HEADS, FFN, TRUE_VOCAB, DIVISIBLE, SEQ = 12, 24, 12, 96, 50, 4, 16
ENC = ("language_model", "encoder")
EMB = ("language_model", "embedding")
WORD = EMB + ("word_embeddings", "weight")


def _padded(tp: int) -> int:
    multiple = DIVISIBLE * tp
    return -(-TRUE_VOCAB // multiple) * multiple


def _full_state(seed: int = 0, bert: bool = False) -> dict:
    """A TP = 1, PP = 1 GPT (or BERT) model state in Megatron's nesting and key names."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    flat = {WORD: r(_padded(1), HIDDEN), EMB + ("position_embeddings", "weight"): r(SEQ, HIDDEN)}
    for i in range(LAYERS):
        for name, shape in (
            ("input_layernorm.weight", (HIDDEN,)),
            ("input_layernorm.bias", (HIDDEN,)),
            ("self_attention.query_key_value.weight", (3 * HIDDEN, HIDDEN)),
            ("self_attention.query_key_value.bias", (3 * HIDDEN,)),
            ("self_attention.dense.weight", (HIDDEN, HIDDEN)),
            ("self_attention.dense.bias", (HIDDEN,)),
            ("post_attention_layernorm.weight", (HIDDEN,)),
            ("post_attention_layernorm.bias", (HIDDEN,)),
            ("mlp.dense_h_to_4h.weight", (FFN, HIDDEN)),
            ("mlp.dense_h_to_4h.bias", (FFN,)),
            ("mlp.dense_4h_to_h.weight", (HIDDEN, FFN)),
            ("mlp.dense_4h_to_h.bias", (HIDDEN,)),
        ):
            flat[ENC + (f"layers.{i}.{name}",)] = r(*shape)
    flat[ENC + ("final_layernorm.weight",)] = r(HIDDEN)
    flat[ENC + ("final_layernorm.bias",)] = r(HIDDEN)
    if bert:
        flat[EMB + ("tokentype_embeddings", "weight")] = r(2, HIDDEN)
        flat[("language_model", "pooler", "dense.weight")] = r(HIDDEN, HIDDEN)
        flat[("lm_head", "bias")] = r(_padded(1))
        flat[("lm_head", "dense", "weight")] = r(HIDDEN, HIDDEN)
        flat[("lm_head", "layernorm", "weight")] = r(HIDDEN)
        flat[("binary_head", "weight")] = r(2, HIDDEN)
    return flat


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rules_name_every_kind():
    assert partition_rule(
        "language_model.encoder.layers.3.self_attention.query_key_value.weight"
    ) == ("column", 0)
    assert partition_rule("encoder.layers.0.mlp.dense_h_to_4h.bias") == ("column", 0)
    assert partition_rule("encoder.layers.0.self_attention.dense.weight") == ("row", 1)
    assert partition_rule("encoder.layers.0.self_attention.dense.bias") == ("replicated", None)
    assert partition_rule("encoder.layers.0.mlp.dense_4h_to_h.weight") == ("row", 1)
    assert partition_rule("encoder.layers.0.mlp.dense_4h_to_h.bias") == ("replicated", None)
    assert partition_rule("language_model.embedding.word_embeddings.weight") == ("vocab", 0)
    assert partition_rule("word_embeddings_for_head.weight") == ("vocab", 0)
    assert partition_rule("language_model.embedding.position_embeddings.weight")[0] == (
        "replicated"
    )
    assert partition_rule("encoder.final_layernorm.bias")[0] == "replicated"
    with pytest.raises(ReshapeError, match="mystery.weight"):
        partition_rule("encoder.layers.0.mystery.weight")


@pytest.mark.parametrize("bert", [False, True])
def test_split_then_merge_is_identity_for_every_layout(bert):
    full = _full_state(bert=bert)
    for tp in (1, 2, 3, 4):
        for pp in (1, 2, 3, 4):
            grid = from_canonical(full, tp, pp, _padded(tp), TRUE_VOCAB)
            assert sorted(grid) == [(t, p) for t in range(tp) for p in range(pp)]
            back = to_canonical({k: [v] for k, v in grid.items()})
            back = from_canonical(back, 1, 1, _padded(1), TRUE_VOCAB)[(0, 0)]
            _assert_same(flatten_state(back), full)


def test_stage_contents_and_layer_renumbering():
    full = _full_state()
    stages = split_pipeline(full, 3)
    per = LAYERS // 3
    for p, stage in enumerate(stages):
        layers = {int(k[-1].split(".")[1]) for k in stage if k[-1].startswith("layers.")}
        assert layers == set(range(per))
        key = ENC + ("layers.1.mlp.dense_h_to_4h.weight",)
        assert torch.equal(
            stage[key], full[ENC + (f"layers.{p * per + 1}.mlp.dense_h_to_4h.weight",)]
        )
    assert WORD in stages[0] and WORD not in stages[2]
    assert ENC + ("final_layernorm.weight",) in stages[2]
    assert ENC + ("final_layernorm.weight",) not in stages[0]
    # the last stage carries the tied output-embedding copy
    assert torch.equal(stages[2][("word_embeddings_for_head", "weight")], full[WORD])
    assert ("word_embeddings_for_head", "weight") not in split_pipeline(full, 1)[0]


def test_interleaved_chunks_merge_in_megatron_order():
    """PP=2 with 2 chunks of 3 layers: stage 0 holds layers 0-2 and 6-8, stage 1 3-5
    and 9-11 (chunk c of stage p starts at c*pp*n + p*n)."""
    full = _full_state()
    owner = {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}  # block of 3 layers -> (p, c)
    chunks = {(p, c): {} for p in range(2) for c in range(2)}
    for path, tensor in full.items():
        name = path[-1]
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            rest = name.split(".", 2)[2]
            chunks[owner[i // 3]][path[:-1] + (f"layers.{i % 3}.{rest}",)] = tensor
        elif "embedding" in path:
            chunks[(0, 0)][path] = tensor
        else:
            chunks[(1, 1)][path] = tensor
    chunks[(1, 1)][("word_embeddings_for_head", "weight")] = full[WORD].clone()
    _assert_same(
        merge_pipeline([[chunks[(0, 0)], chunks[(0, 1)]], [chunks[(1, 0)], chunks[(1, 1)]]]), full
    )
    grid = {(0, p): [unflatten_state(chunks[(p, c)]) for c in range(2)] for p in range(2)}
    _assert_same(to_canonical(grid), full)


def test_qkv_split_keeps_whole_heads_and_tp_maths_is_preserved():
    """Each rank's QKV rows are whole heads ([np, 3, hn] layout); column/row split MLP and
    attention projections give the unsplit result when summed over ranks."""
    full = _full_state()
    stage = {k: v for k, v in split_pipeline(full, 1)[0].items() if "layers.0." in k[-1]}
    hn = HIDDEN // HEADS
    qkv = ENC + ("layers.0.self_attention.query_key_value.weight",)
    for tp in (2, 3, 4):
        shards = split_tensor_parallel(stage, tp)
        per_rank = HEADS // tp
        heads = full[qkv].view(HEADS, 3, hn, HIDDEN)
        for r, shard in enumerate(shards):
            expect = heads[r * per_rank : (r + 1) * per_rank].reshape(-1, HIDDEN)
            assert torch.equal(shard[qkv], expect)
        # float64: the sum over ranks reorders the fp32 GEMM, a 1e-5 difference on
        # outputs of size ~50 (random unit weights)
        x = torch.randn(5, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(tp))
        w1, b1 = (
            ENC + ("layers.0.mlp.dense_h_to_4h.weight",),
            ENC + ("layers.0.mlp.dense_h_to_4h.bias",),
        )
        w2, b2 = (
            ENC + ("layers.0.mlp.dense_4h_to_h.weight",),
            ENC + ("layers.0.mlp.dense_4h_to_h.bias",),
        )
        stage64 = {k: v.double() for k, v in stage.items()}
        shards = [{k: v.double() for k, v in s.items()} for s in shards]
        ref = torch.nn.functional.gelu(x @ stage64[w1].T + stage64[b1]) @ stage64[w2].T
        ref = ref + stage64[b2]
        out = sum(torch.nn.functional.gelu(x @ s[w1].T + s[b1]) @ s[w2].T for s in shards)
        torch.testing.assert_close(out + shards[0][b2], ref, rtol=1e-10, atol=1e-10)


def test_vocab_is_repadded_for_the_target_tp():
    full = _full_state()
    grid = from_canonical(full, 4, 1, _padded(4), TRUE_VOCAB)
    shard = flatten_state(grid[(1, 0)])[WORD]
    assert shard.shape == (_padded(4) // 4, HIDDEN)  # 64 rows over 4 ranks
    merged = to_canonical({k: [v] for k, v in grid.items()})[WORD]
    assert torch.equal(merged[:TRUE_VOCAB], full[WORD][:TRUE_VOCAB])
    assert torch.count_nonzero(merged[_padded(1) :]) == 0  # new padding rows are zero
    with pytest.raises(ReshapeError, match="smaller than the true vocab"):
        from_canonical(full, 1, 1, TRUE_VOCAB - 2, TRUE_VOCAB)


def _write_source(folder, full, tp, pp, iteration=7):
    args = argparse.Namespace(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        make_vocab_size_divisible_by=DIVISIBLE,
        padded_vocab_size=_padded(tp),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        tokenizer_type=None,
    )
    grid = from_canonical(full, tp, pp, _padded(tp), TRUE_VOCAB)
    for (t, p), model in grid.items():
        sub = f"mp_rank_{t:02d}_{p:03d}" if pp > 1 else f"mp_rank_{t:02d}"
        path = os.path.join(folder, f"iter_{iteration:07d}", sub, "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path))
        torch.save(
            {
                "args": args,
                "checkpoint_version": 3.0,
                "iteration": iteration,
                "consumed_train_samples": 56,
                "model": model,
                "optimizer": {},
            },
            path,
        )
    with open(os.path.join(folder, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def test_reshape_checkpoint_files(tmp_path):
    full = _full_state(seed=3)
    src = tmp_path / "src"
    _write_source(str(src), full, 2, 2)
    for tp, pp in ((1, 1), (4, 3), (3, 1)):
        dst = tmp_path / f"tp{tp}pp{pp}"
        summary = reshape_checkpoint(str(src), str(dst), tp, pp, true_vocab_size=TRUE_VOCAB)
        assert summary["padded_vocab_size"] == _padded(tp)
        assert (dst / "latest_checkpointed_iteration.txt").read_text() == "7"
        sub = "mp_rank_00" if pp == 1 else "mp_rank_00_000"
        state = torch.load(dst / "iter_0000007" / sub / "model_optim_rng.pt", weights_only=False)
        assert state["args"].tensor_model_parallel_size == tp
        assert state["args"].pipeline_model_parallel_size == pp
        assert state["args"].padded_vocab_size == _padded(tp)
        assert state["consumed_train_samples"] == 56 and "optimizer" not in state
        back = tmp_path / f"back{tp}{pp}"
        reshape_checkpoint(str(dst), str(back), 1, 1, true_vocab_size=TRUE_VOCAB)
        model = torch.load(
            back / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False
        )["model"]
        _assert_same(flatten_state(model), full)


def test_unknown_true_vocab_is_an_error_when_padding_changes(tmp_path):
    _write_source(str(tmp_path / "src"), _full_state(), 1, 1)
    with pytest.raises(ReshapeError, match="--true-vocab-size"):
        reshape_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), 3, 1)
    with pytest.raises(ReshapeError, match="no checkpoint tracker"):
        reshape_checkpoint(str(tmp_path / "nothing"), str(tmp_path / "dst"), 1, 1)
