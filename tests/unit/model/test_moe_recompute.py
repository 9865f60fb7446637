"""MoE (DeepSpeed's layer) with activation recompute: losses and gradients match the
stored run.

Two gloo ranks, 2 experts with expert-parallel size 2 (one expert per rank, tokens
exchanged by all-to-all), 4 layers of which 2 and 4 are MoE layers, dropout 0.1 and
DeepSpeed's random token selection on (capacity factor 1 drops tokens), so the recompute
must redraw the same masks and the same token choice. Each variant trains 3 SGD steps on
loss = mean LM loss + 0.1 * sum of the layers' aux losses. Compared with the stored run:
losses within 1e-6 relative (measured: identical), every gradient within atol 1e-6 /
rtol 1e-5, the gate weights' included. The gate weight gradient differs from the one
without the aux term, so a recompute that dropped the aux loss's gradient would fail.
"""

from __future__ import annotations

import torch

from megatron import mpu
from megatron.model import GPTModel
from tests.dist_utils import run_distributed

from .tiny import batch, causal_mask, tiny_config

STEPS = 3
AUX_COEFF = 0.1
GATE = "language_model.transformer.layers.1.mlp.deepspeed_moe.gate.wg.weight"


def _model(**overrides) -> GPTModel:
    from megatron.model.moe import moe_layers

    mpu.model_parallel_manual_seed(1234)
    torch.manual_seed(1234)
    config = tiny_config(
        num_layers=4,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        num_experts=[2],
        expert_interval=2,
        moe_expert_parallel_size=2,
        **overrides,
    )
    model = GPTModel(config)
    for layer in moe_layers(model):
        layer.set_deepspeed_parallelism()
    model.train()
    return model


def _train(rank: int, aux_coeff: float = AUX_COEFF, **overrides):
    """[(loss, aux, {name: grad})] over STEPS SGD steps on this rank's batches."""
    model = _model(**overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step in range(STEPS):
        tokens, labels, position_ids = batch(b=2, seed=10 * rank + step)
        optimizer.zero_grad(set_to_none=True)
        lm, aux = model(tokens, position_ids, causal_mask(), labels=labels)
        loss = lm.mean() + aux_coeff * aux
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        history.append((loss.detach(), aux.detach(), grads))
        optimizer.step()
    return history


def _assert_same(got, want, label: str) -> None:
    for step, ((loss_a, aux_a, grads_a), (loss_b, aux_b, grads_b)) in enumerate(zip(got, want)):
        where = f"{label}, step {step}"
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0, msg=where)
        torch.testing.assert_close(aux_a, aux_b, rtol=1e-6, atol=0, msg=where)
        assert grads_a.keys() == grads_b.keys(), where
        assert GATE in grads_a, where
        for name in grads_a:
            torch.testing.assert_close(
                grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=f"{where}: {name}"
            )


def _check_world(rank: int, world_size: int) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's view of the gloo world
    mpu.initialize_model_parallel(1, 1)
    stored = _train(rank)
    no_aux = _train(rank, aux_coeff=0.0)
    # the aux loss reaches the gate: its gradient is not the routing-only one
    assert not torch.allclose(stored[0][2][GATE], no_aux[0][2][GATE], atol=1e-6, rtol=1e-4)
    recompute = dict(recompute_granularity="full")
    _assert_same(_train(rank, recompute_num_layers=1, **recompute), stored, "1 layer/chunk")
    # one chunk holding both MoE layers: two aux outputs from one checkpoint
    _assert_same(
        _train(
            rank, recompute_num_layers=4, distribute_saved_activations=True, **recompute
        ),
        stored,
        "4 layers/chunk, distributed",
    )

    block = dict(recompute_granularity="full", recompute_method="block")
    _assert_same(_train(rank, recompute_num_layers=2, **block), stored, "block, 2 of 4 layers")
    _assert_same(_train(rank, recompute_granularity="selective"), stored, "selective")

    # DeepSpeed's checkpoint function (--deepspeed-activation-checkpointing); its
    # tracker seeds the streams, so its stored run is the reference.
    deepspeed.checkpointing.configure(mpu, partition_activations=True, num_checkpoints=4)
    _assert_same(
        _train(rank, recompute_num_layers=2, **recompute), _train(rank), "DeepSpeed, 2/chunk"
    )
    _assert_same(
        _train(rank, recompute_granularity="selective"), _train(rank), "DeepSpeed, selective"
    )


def test_moe_recompute_matches_stored_run():
    run_distributed(_check_world, world_size=2, timeout=420)
