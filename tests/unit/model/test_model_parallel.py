"""Parallel equals serial: the tiny GPT at TP=2 (plain, flash, sequence parallel,
recompute) and at PP=2 gives the TP=1 / PP=1 loss and gradients, on two gloo ranks."""

import torch

from tests.dist_utils import run_distributed

TP_VARIANTS = [
    {},
    {"use_flash_attn": True},
    {"sequence_parallel": True},
    {"recompute_granularity": "full", "recompute_num_layers": 1},
    {"recompute_granularity": "selective"},
    {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1,
     "distribute_saved_activations": True},
]


def _loss_and_grads(model, tokens, labels, position_ids, mask):
    loss = model(tokens, position_ids, mask, labels=labels)
    loss.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, dict(model.named_parameters())


def _full_grad(param, grad, world_size):
    """The TP=1 view of a parameter's gradient on this rank."""
    from megatron import mpu

    group = mpu.get_tensor_model_parallel_group()
    if getattr(param, "tensor_model_parallel", False):
        parts = [torch.empty_like(grad) for _ in range(world_size)]
        torch.distributed.all_gather(parts, grad.contiguous(), group=group)
        return torch.cat(parts, dim=param.partition_dim)
    if getattr(param, "sequence_parallel", False):
        # each rank saw only its part of the sequence: the training loop sums these
        total = grad.clone()
        torch.distributed.all_reduce(total, group=group)
        return total
    return grad


def _serial(config_overrides, data):
    """TP=1 reference in this process (mpu overrides make the layers unsplit)."""
    from megatron import mpu
    from megatron.model import GPTModel

    from .tiny import tiny_config

    mpu.set_tensor_model_parallel_world_size(1)
    mpu.set_tensor_model_parallel_rank(0)
    try:
        mpu.model_parallel_cuda_manual_seed(1234)
        overrides = {k: v for k, v in config_overrides.items() if k != "sequence_parallel"}
        return _loss_and_grads(GPTModel(tiny_config(**overrides)), *data)
    finally:
        mpu.clear_model_parallel_overrides()


def _check_tensor_parallel(world_size):
    from megatron import mpu
    from megatron.model import GPTModel

    from .tiny import batch, causal_mask, tiny_config

    mpu.initialize_model_parallel(world_size)
    tokens, labels, position_ids = batch(b=2)
    data = (tokens, labels, position_ids, causal_mask())
    # one TP=1 reference: in fp32 without dropout the variants compute the same function
    ref_loss, ref_grads, _ = _serial({}, data)
    for overrides in TP_VARIANTS:
        mpu.model_parallel_cuda_manual_seed(1234)
        model = GPTModel(tiny_config(**overrides))
        assert (
            model.language_model.transformer.layers[0].self_attention.query_key_value.weight.shape[
                0
            ]
            == 3 * 64 // world_size
        )
        loss, grads, params = _loss_and_grads(model, *data)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, msg=f"loss {overrides}")
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            full = _full_grad(params[name], grad, world_size)
            torch.testing.assert_close(
                full, ref_grads[name], atol=1e-5, rtol=1e-4, msg=f"{name} {overrides}"
            )
    mpu.destroy_model_parallel()


def _check_pipeline_parallel(rank, world_size):
    """Two stages, activations and gradients passed by hand: the PP=1 loss and grads."""
    from megatron import mpu
    from megatron.model import GPTModel

    from .tiny import batch, causal_mask, tiny_config

    config = tiny_config(num_layers=4)
    tokens, labels, position_ids = batch(b=2)
    mpu.initialize_model_parallel(1, world_size)
    mpu.set_pipeline_model_parallel_world_size(1)
    mpu.set_pipeline_model_parallel_rank(0)
    mpu.model_parallel_cuda_manual_seed(1234)
    ref_loss, ref_grads, _ = _loss_and_grads(
        GPTModel(config), tokens, labels, position_ids, causal_mask()
    )
    mpu.clear_model_parallel_overrides()

    mpu.model_parallel_cuda_manual_seed(1234)
    first, last = rank == 0, rank == world_size - 1
    model = GPTModel(config, pre_process=first, post_process=last)
    # the last stage's copy of the tied embedding arrived from the first stage
    head = model.word_embeddings_weight()
    assert torch.equal(head.detach(), _ref_weight(config))
    hidden_shape = (32, 2, 64)
    if first:
        hidden = model(tokens, position_ids, causal_mask())  # [s, b, h]
        torch.distributed.send(hidden.detach().contiguous(), dst=1)
        grad = torch.empty(hidden_shape)
        torch.distributed.recv(grad, src=1)
        hidden.backward(grad)
    else:
        received = torch.empty(hidden_shape)
        torch.distributed.recv(received, src=0)
        received.requires_grad_(True)
        model.set_input_tensor(received)
        loss = model(None, position_ids, causal_mask(), labels=labels)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        loss.mean().backward()
        torch.distributed.send(received.grad.contiguous(), dst=0)
    # the tied embedding's gradient is the sum of both stages' (the training loop's
    # all-reduce over the embedding group)
    torch.distributed.all_reduce(head.grad, group=mpu.get_embedding_group())
    torch.testing.assert_close(
        head.grad,
        ref_grads["language_model.embedding.word_embeddings.weight"],
        atol=1e-5,
        rtol=1e-4,
    )
    offset = 0 if first else 2
    for name, param in model.named_parameters():
        if name.startswith("language_model.transformer.layers."):
            index, rest = name[len("language_model.transformer.layers.") :].split(".", 1)
            ref_name = f"language_model.transformer.layers.{int(index) + offset}.{rest}"
            torch.testing.assert_close(param.grad, ref_grads[ref_name], atol=1e-5, rtol=1e-4)
    mpu.destroy_model_parallel()


def _ref_weight(config):
    """The PP=1 model's word embeddings (built in this process)."""
    from megatron import mpu
    from megatron.model import GPTModel

    mpu.set_pipeline_model_parallel_world_size(1)
    mpu.set_pipeline_model_parallel_rank(0)
    try:
        return GPTModel(config).language_model.embedding.word_embeddings.weight.detach()
    finally:
        mpu.clear_model_parallel_overrides()


def _check_all(rank, world_size):
    torch.set_num_threads(1)
    _check_tensor_parallel(world_size)
    _check_pipeline_parallel(rank, world_size)
    return True


def test_tensor_and_pipeline_parallel_equal_serial():
    assert run_distributed(_check_all, world_size=2, timeout=240) == [True, True]
