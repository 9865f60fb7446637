"""Start-up and load checks: the checkpoint version (QKV row order before 2.0 reordered,
grouped-query or newer versions refused by name), weights-only loads that restore nothing
else, a missing tokenizer or an empty vocabulary refused before the model, and
single-process runs that rendezvous without a TCP port (six started at once)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from megatron.arguments import ArgumentError
from megatron.checkpointing import (
    CheckpointError,
    check_checkpoint_version,
    convert_qkv_layout,
)
from megatron.initialize import require_tokenizer_type, require_vocabulary

from ..dist_utils import run_distributed

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
QKV = "layers.0.self_attention.query_key_value"


def _old_layout(current: torch.Tensor, version: float, heads: int, hn: int) -> torch.Tensor:
    """The rows of a version-2.0 query_key_value ([np, 3, hn]) as an older version stored
    them (0: [3, np, hn]; 1.0: [np, hn, 3])."""
    rest = current.shape[1:]
    t = current.view(heads, 3, hn, *rest)
    t = t.transpose(0, 1) if version < 1.0 else t.transpose(1, 2)
    return t.contiguous().view(3 * heads * hn, *rest)


def _saved_args(**kw):
    base = dict(num_attention_heads=4, hidden_size=12, num_key_value_heads=None, kv_channels=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("version", [0, 1.0])
def test_old_qkv_layouts_are_reordered(version):
    tp, hn, h = 2, 3, 12  # 4 heads: 2 of 3 channels per TP rank
    weight = torch.arange(3 * 2 * hn * h, dtype=torch.float32).view(3 * 2 * hn, h)
    bias = torch.arange(3 * 2 * hn, dtype=torch.float32)
    state = {
        "checkpoint_version": version, "args": _saved_args(),
        "model": {"language_model": {"encoder": {
            f"{QKV}.weight": _old_layout(weight, version, 2, hn),
            f"{QKV}.bias": _old_layout(bias, version, 2, hn),
            "layers.0.self_attention.dense.weight": weight.clone(),
        }}},
    }  # fmt: skip
    assert check_checkpoint_version(state, "f.pt", tp=tp) == version
    encoder = state["model"]["language_model"]["encoder"]
    assert torch.equal(encoder[f"{QKV}.weight"], weight)
    assert torch.equal(encoder[f"{QKV}.bias"], bias)
    assert torch.equal(encoder["layers.0.self_attention.dense.weight"], weight)
    # a current checkpoint is left alone
    current = {"checkpoint_version": 3.0, "model": {f"{QKV}.weight": weight.clone()}}
    assert check_checkpoint_version(current, "f.pt", tp=tp) == 3.0
    assert torch.equal(current["model"][f"{QKV}.weight"], weight)


def test_versions_that_cannot_load_are_refused_by_name():
    gqa = {f"{QKV}.weight": torch.zeros(18, 12)}
    with pytest.raises(CheckpointError, match=r"^/c/iter_0000002/mp_rank_00/x\.pt: "
                       r"checkpoint_version 1\.0 stores the query_key_value rows as "
                       r"\[np, hn, 3\].*grouped-query"):
        convert_qkv_layout(gqa, 1.0, _saved_args(num_key_value_heads=2), 1,
                           "/c/iter_0000002/mp_rank_00/x.pt")
    with pytest.raises(CheckpointError, match=r"^old\.pt: checkpoint_version 0 stores .*"
                       r"\[3, np, hn\]"):
        check_checkpoint_version({"model": gqa, "args": None}, "old.pt", tp=1)
    with pytest.raises(CheckpointError, match=r"query_key_value\.weight has 18 rows, not "
                       r"3 x 4 heads"):
        convert_qkv_layout(gqa, 0, _saved_args(), 1, "x.pt")
    with pytest.raises(CheckpointError, match=r"^new\.pt: checkpoint_version 9\.0 is newer"):
        check_checkpoint_version({"checkpoint_version": 9.0}, "new.pt", tp=1)


def test_a_model_needs_a_tokenizer_and_a_vocabulary(monkeypatch):
    from megatron import initialize
    from megatron.global_vars import reset_global_variables

    with pytest.raises(ArgumentError, match="^--tokenizer-type is not given: the model's "
                       "vocabulary"):
        require_tokenizer_type(argparse.Namespace(tokenizer_type=None))
    require_tokenizer_type(argparse.Namespace(tokenizer_type="NullTokenizer"))
    with pytest.raises(ArgumentError, match="^the model would have 0 vocabulary rows"):
        require_vocabulary(argparse.Namespace(padded_vocab_size=0, tokenizer_type=None))
    require_vocabulary(argparse.Namespace(padded_vocab_size=128))

    def no_process_group(args):
        raise AssertionError("reached torch.distributed without a tokenizer")

    monkeypatch.setattr(initialize, "_initialize_distributed", no_process_group)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    flags = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2",
             "--seq-length", "8", "--max-position-embeddings", "8", "--micro-batch-size", "1"]
    try:
        with pytest.raises(ArgumentError, match="--tokenizer-type is not given"):
            initialize.initialize_megatron(args_list=flags)
    finally:
        reset_global_variables()


TINY = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2",
        "--seq-length", "8", "--max-position-embeddings", "8", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "60", "--seed", "7",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0"]


def _weights_only_world(rank, world_size, save):
    """Save a tiny GPT at iteration 3 after 24 samples; a weights-only load brings back the
    weights and nothing else (args untouched), a training load the run state too; the
    same file rewritten as version 1.0 loads equal."""
    import pretrain_gpt
    from megatron import get_args
    from megatron.checkpointing import (
        get_checkpoint_name,
        load_checkpoint,
        load_model_weights_only,
        read_run_id,
    )
    from megatron.initialize import initialize_megatron
    from megatron.train_state import TrainState
    from megatron.training import setup_model_and_optimizer
    from megatron.utils import unwrap_model

    initialize_megatron(args_list=TINY + ["--save", save, "--load", save])
    args = get_args()
    model, optimizer, lr_scheduler = setup_model_and_optimizer(pretrain_gpt.model_provider)
    _save(args, model, optimizer, lr_scheduler, 3, 24)
    saved = {k: v.clone() for k, v in unwrap_model(model[0]).state_dict().items()}
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    run_id = getattr(args, "checkpoint_run_id", None)
    before = dict(vars(args))
    assert load_model_weights_only(model, save) == 3
    now = unwrap_model(model[0]).state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    assert vars(args) == before, "a weights-only load changed args"
    assert getattr(args, "checkpoint_run_id", None) == run_id, "or adopted the lineage"
    # the file does hold the run state, which a training load restores into its
    # TrainState (the run lineage too), leaving args as they are
    state = TrainState()
    assert load_checkpoint(model, None, None, train_state=state) == 3
    assert (state.iteration, state.consumed_train_samples) == (3, 24)
    assert state.run_id == read_run_id(os.path.join(save, "iter_0000003")) is not None
    assert vars(args) == before, "a training load with a TrainState changed args"

    path = get_checkpoint_name(save, 3)
    state = torch.load(path, weights_only=False)
    found = list(_qkv_entries(state["model"]))
    assert len(found) == 4  # 2 layers x (weight, bias)
    for d, k in found:
        d[k] = _old_layout(d[k], 1.0, 2, 8)
    state["checkpoint_version"] = 1.0
    torch.save(state, path)
    with torch.no_grad():
        for p in model[0].parameters():
            p.zero_()
    load_model_weights_only(model, save)
    now = unwrap_model(model[0]).state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    return True


def _qkv_entries(d: dict):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _qkv_entries(value)
        elif key.endswith(("query_key_value.weight", "query_key_value.bias")):
            yield d, key


def _save(args, model, optimizer, lr_scheduler, iteration, samples):
    from megatron.checkpointing import save_checkpoint
    from megatron.train_state import TrainState

    state = TrainState(iteration=iteration, consumed_train_samples=samples)
    save_checkpoint(iteration, model, optimizer, lr_scheduler, train_state=state)


def test_weights_only_load_and_old_version(tmp_path):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    assert run_distributed(_weights_only_world, 1, (str(tmp_path / "ckpt"),), timeout=240)


def test_six_single_process_runs_start_at_once():
    """No port is probed and bound: six runs started together all train and exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *TINY, "--mock-data"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
        assert "world size 1 (in-process store)" in out, out[-2000:]
        assert " iteration        2/       2 |" in out, out[-2000:]
