"""Group and getter checks run inside a spawned world (shared by the mpu tests)."""

import pytest
import torch

from megatron import mpu


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


def check_groups(rank: int, world_size: int) -> None:
    """Every (tp, pp) layout that fits the world: groups by communication, getters."""
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
