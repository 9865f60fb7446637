"""pretrain_gpt.py --deepspeed with MoE (2 experts) and --checkpoint-activations: the
recomputed MoE layers carry their aux losses into the gradients, and the log shows the
'moe loss' column next to the LM loss.

One rank, DeepSpeed's checkpoint function (--deepspeed-activation-checkpointing
--partition-activations), 2 layers per checkpointed chunk, dropout 0.1, against the same
command without recompute: LM and moe losses within a relative 2e-6 of the printed
7 digits and the same printed grad norms (measured: identical). Gradient-level equality,
the gate's included, is checked in tests/unit/model/test_moe_recompute.py.
"""

from __future__ import annotations

import os

import pytest

from .gpt_runs import (
    MOE_RE,
    ROOT,
    parse_log,
    rel_close,
    run_pretrain,
    small_vocab_dataset,
    tiny_gpt_args,
)

pytestmark = pytest.mark.slow

ITERS = 6
REL_TOL = 2e-6


def _args(data: str, recompute: bool) -> list[str]:
    args = tiny_gpt_args(data, "", ITERS) + [
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--eval-iters", "0",
        "--lr-warmup-iters", "1",
        "--deepspeed", "--deepspeed_config",
        os.path.join(ROOT, "examples", "ds_config_gpt_zero1.json"), "--zero-stage", "1",
        "--num-experts", "2", "--moe-loss-coeff", "0.1"]  # fmt: skip
    if recompute:
        args += ["--checkpoint-activations", "--checkpoint-num-layers", "2",
                 "--deepspeed-activation-checkpointing", "--partition-activations"]  # fmt: skip
    for flag in ("--vocab-file", "--merge-file"):
        i = args.index(flag)
        del args[i : i + 2]
    return args


def _run(data: str, recompute: bool) -> tuple[list[float], dict]:
    """([lm loss per iteration], {iteration: (grad norm text, moe loss)})."""
    stdout = run_pretrain(_args(data, recompute)).stdout
    rows = parse_log(stdout)
    assert sorted(rows) == list(range(1, ITERS + 1)), stdout[-3000:]
    extra = {int(m.group(1)): (m.group(2), float(m.group(3))) for m in MOE_RE.finditer(stdout)}
    assert sorted(extra) == list(range(1, ITERS + 1)), stdout[-3000:]
    return [float(rows[i]["loss"]) for i in range(1, ITERS + 1)], extra


def _close(a: float, b: float) -> bool:
    return rel_close(a, b, REL_TOL)


def test_moe_with_recompute_trains_like_stored_run(tmp_path):
    data = small_vocab_dataset(str(tmp_path))
    losses, extra = _run(data, recompute=True)
    assert losses[-1] < losses[0], losses
    # coeff 0.1 x l_aux of the one MoE layer, l_aux in [1, 2] (1 = balanced routing)
    for _, moe_loss in extra.values():
        assert 0.09 < moe_loss < 0.21, extra
    stored_losses, stored_extra = _run(data, recompute=False)
    for it in range(1, ITERS + 1):
        assert _close(losses[it - 1], stored_losses[it - 1]), (it, losses, stored_losses)
        assert extra[it][0] == stored_extra[it][0], (it, extra, stored_extra)  # grad norm
        assert _close(extra[it][1], stored_extra[it][1]), (it, extra, stored_extra)
