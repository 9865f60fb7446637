"""Process-group layout (pure) and the group getters under 1 and 4 gloo ranks."""

import pytest
import torch

from megatron import mpu
from tests.dist_utils import run_distributed
from tests.unit.mpu.group_checks import check_groups

CPU = mpu.ParallelConfig(use_cpu_initialization=True)

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
    if torch.distributed.is_initialized():
        pytest.skip("a process group was left initialised in this process")
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
        layer = mpu.ColumnParallelLinear(3, 8, config=CPU)
        assert layer.weight.shape == (2, 3)
        mpu.clear_model_parallel_overrides()
        assert mpu.get_tensor_model_parallel_world_size() == 1
        assert mpu.get_pipeline_model_parallel_rank() == 0
    finally:
        mpu.destroy_model_parallel()


def test_groups_and_getters_one_rank():
    """One gloo rank: every group is that rank; the 4-rank case runs in test_mpu_layers."""
    run_distributed(check_groups, world_size=1, timeout=120)
