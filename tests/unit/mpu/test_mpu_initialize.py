"""Process-group layout (pure) and the group getters under 1 and 4 gloo ranks."""

import pytest
import torch

from megatron import mpu
from tests.dist_utils import run_distributed

# Megatron's documented example: 16 GPUs, TP=2, PP=4, hence DP=2.
EXAMPLE_16 = {
    "tensor": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
    "data": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
    "pipeline": [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
    "model": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
    "embedding": [[0, 12], [1, 13], [2, 14], [3, 15]],
}


def test_megatron_16_gpu_example():
    assert mpu.generate_parallel_groups(16, 2, 4) == EXAMPLE_16


@pytest.mark.parametrize(
    "world,tp,pp", [(1, 1, 1), (8, 1, 1), (8, 8, 1), (8, 1, 8), (8, 2, 2), (24, 2, 3), (12, 3, 4)]
)
def test_layout_invariants(world, tp, pp):
    layout = mpu.generate_parallel_groups(world, tp, pp)
    dp = world // (tp * pp)
    expected_shape = {"tensor": (dp * pp, tp), "data": (tp * pp, dp), "pipeline": (tp * dp, pp)}
    expected_shape["model"] = (dp, tp * pp)
    for key, (count, size) in expected_shape.items():
        groups = layout[key]
        assert len(groups) == count and all(len(g) == size for g in groups), key
        # every rank in exactly one group of each kind
        assert sorted(r for g in groups for r in g) == list(range(world)), key
    # TP fastest, then DP, then PP
    assert layout["tensor"][0] == list(range(tp))
    assert layout["data"][0] == list(range(0, tp * dp, tp))
    assert layout["pipeline"][0] == list(range(0, world, tp * dp))
    for pipe, emb in zip(layout["pipeline"], layout["embedding"]):
        assert emb == ([pipe[0]] if pp == 1 else [pipe[0], pipe[-1]])
    # a model group is the union of the tensor groups of one data-parallel replica
    for model in layout["model"]:
        tensor_groups = [g for g in layout["tensor"] if g[0] in model]
        assert sorted(r for g in tensor_groups for r in g) == model


def test_layout_rank_order_and_split_rank():
    # pipeline fastest: stage neighbours are consecutive ranks
    layout = mpu.generate_parallel_groups(8, 2, 2, rank_order="pp-tp-dp")
    assert layout["pipeline"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["tensor"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["data"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["model"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # T5: the first decoder stage joins the embedding group
    layout = mpu.generate_parallel_groups(4, 1, 4, pipeline_model_parallel_split_rank=2)
    assert layout["embedding"] == [[0, 2, 3]]


@pytest.mark.parametrize(
    "args,match",
    [
        ((6, 4, 1), "world_size \\(6\\) is not divisible"),
        ((8, 0, 1), "tensor_model_parallel_size must be a positive int"),
        ((8, 1, -2), "pipeline_model_parallel_size must be a positive int"),
    ],
)
def test_layout_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        mpu.generate_parallel_groups(*args)
    with pytest.raises(ValueError, match="rank_order"):
        mpu.generate_parallel_groups(8, 2, 2, rank_order="tp-pp")


def test_single_process_defaults_and_overrides():
    """Without torch.distributed the getters describe one process; set_* overrides win."""
    assert not torch.distributed.is_initialized()
    mpu.destroy_model_parallel()
    try:
        assert not mpu.model_parallel_is_initialized()
        assert mpu.get_tensor_model_parallel_world_size() == 1
        assert mpu.get_tensor_model_parallel_rank() == 0
        assert mpu.get_pipeline_model_parallel_world_size() == 1
        assert mpu.get_data_parallel_world_size() == 1
        assert mpu.is_pipeline_first_stage() and mpu.is_pipeline_last_stage()
        with pytest.raises(RuntimeError, match="tensor model parallel group is not initialised"):
            mpu.get_tensor_model_parallel_group()

        mpu.set_tensor_model_parallel_world_size(4)
        mpu.set_tensor_model_parallel_rank(3)
        mpu.set_pipeline_model_parallel_world_size(2)
        mpu.set_pipeline_model_parallel_rank(1)
        assert mpu.get_model_parallel_world_size() == 4  # DeepSpeed's name: the TP size
        assert mpu.get_model_parallel_rank() == 3
        assert mpu.get_pipeline_model_parallel_world_size() == 2
        assert not mpu.is_pipeline_first_stage() and mpu.is_pipeline_last_stage()
        # layers built under an override take their slice without any process group
        layer = mpu.ColumnParallelLinear(3, 8, use_cpu_initialization=True)
        assert layer.weight.shape == (2, 3)
        mpu.clear_model_parallel_overrides()
        assert mpu.get_tensor_model_parallel_world_size() == 1
        assert mpu.get_pipeline_model_parallel_rank() == 0
    finally:
        mpu.destroy_model_parallel()


def _expected_groups(rank, layout):
    mine = {key: next(g for g in layout[key] if rank in g) for key in ("tensor", "pipeline")}
    mine.update({key: next(g for g in layout[key] if rank in g) for key in ("data", "model")})
    # middle pipeline stages belong to no embedding group; take their pipeline's one
    mine["embedding"] = layout["embedding"][layout["pipeline"].index(mine["pipeline"])]
    return mine


def _group_members(group):
    """Global ranks in `group`, found by communication rather than by our bookkeeping."""
    size = torch.distributed.get_world_size(group=group)
    ranks = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    me = torch.tensor([torch.distributed.get_rank()])
    torch.distributed.all_gather(ranks, me, group=group)
    return [int(r) for r in ranks]


def _check_one_layout(rank, world_size, tp, pp):
    mpu.initialize_model_parallel(tp, pp)
    assert mpu.model_parallel_is_initialized()
    want = _expected_groups(rank, mpu.generate_parallel_groups(world_size, tp, pp))
    assert _group_members(mpu.get_tensor_model_parallel_group()) == want["tensor"]
    assert _group_members(mpu.get_pipeline_model_parallel_group()) == want["pipeline"]
    assert _group_members(mpu.get_data_parallel_group()) == want["data"]
    assert _group_members(mpu.get_model_parallel_group()) == want["model"]
    assert mpu.get_data_parallel_group_ranks() == want["data"]

    assert mpu.get_tensor_model_parallel_world_size() == tp == mpu.get_model_parallel_world_size()
    assert mpu.get_tensor_model_parallel_rank() == want["tensor"].index(rank)
    assert mpu.get_model_parallel_rank() == mpu.get_tensor_model_parallel_rank()
    assert mpu.get_pipeline_model_parallel_world_size() == pp
    stage = want["pipeline"].index(rank)
    assert mpu.get_pipeline_model_parallel_rank() == stage
    assert mpu.get_data_parallel_world_size() == world_size // (tp * pp)
    assert mpu.get_data_parallel_rank() == want["data"].index(rank)
    assert mpu.get_tensor_model_parallel_src_rank() == want["tensor"][0]
    assert mpu.get_data_parallel_src_rank() == want["data"][0]
    pipe = want["pipeline"]
    assert mpu.get_pipeline_model_parallel_first_rank() == pipe[0]
    assert mpu.get_pipeline_model_parallel_last_rank() == pipe[-1]
    assert mpu.get_pipeline_model_parallel_next_rank() == pipe[(stage + 1) % pp]
    assert mpu.get_pipeline_model_parallel_prev_rank() == pipe[(stage - 1) % pp]
    assert mpu.is_pipeline_first_stage() == (stage == 0)
    assert mpu.is_pipeline_last_stage() == (stage == pp - 1)
    in_embedding = rank in want["embedding"]
    assert mpu.is_rank_in_embedding_group() == in_embedding
    if in_embedding:
        assert _group_members(mpu.get_embedding_group()) == want["embedding"]
    else:
        assert mpu.get_embedding_group() is None
    with pytest.raises(RuntimeError, match="already initialised"):
        mpu.initialize_model_parallel(tp, pp)
    mpu.destroy_model_parallel()
    assert not mpu.model_parallel_is_initialized()


def _check_virtual_pipeline(rank, world_size):
    mpu.initialize_model_parallel(1, world_size, virtual_pipeline_model_parallel_size=2)
    stage = mpu.get_pipeline_model_parallel_rank()
    assert mpu.get_virtual_pipeline_model_parallel_world_size() == 2
    assert mpu.get_virtual_pipeline_model_parallel_rank() == 0
    assert mpu.is_pipeline_first_stage() == (stage == 0)
    assert not mpu.is_pipeline_last_stage()  # chunk 0 is never the last chunk
    assert mpu.is_pipeline_last_stage(ignore_virtual=True) == (stage == world_size - 1)
    mpu.set_virtual_pipeline_model_parallel_rank(1)
    assert not mpu.is_pipeline_first_stage()
    assert mpu.is_pipeline_first_stage(ignore_virtual=True) == (stage == 0)
    assert mpu.is_pipeline_last_stage() == (stage == world_size - 1)
    mpu.destroy_model_parallel()
    assert mpu.get_virtual_pipeline_model_parallel_world_size() is None


def _check_world(rank, world_size):
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            if world_size % (tp * pp) == 0:
                _check_one_layout(rank, world_size, tp, pp)
    if world_size > 1:
        _check_virtual_pipeline(rank, world_size)
    # DeepSpeed reads the module as its mpu
    mpu.initialize_model_parallel(min(2, world_size), 1)
    for name in (
        "get_model_parallel_rank",
        "get_model_parallel_group",
        "get_model_parallel_world_size",
        "get_data_parallel_group",
        "get_data_parallel_rank",
        "get_data_parallel_world_size",
        "get_tensor_model_parallel_group",
    ):
        assert callable(getattr(mpu, name)), name
    mpu.destroy_model_parallel()


@pytest.mark.parametrize("world_size", [1, 4])
def test_groups_and_getters(world_size):
    run_distributed(_check_world, world_size=world_size, timeout=120)
