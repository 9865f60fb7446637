"""Model- and data-parallel process groups, and the getters every other module uses.

Ranks are laid out as in Megatron: the tensor-parallel index varies fastest, then the
data-parallel index, then the pipeline stage. With 16 GPUs, TP=2 and PP=4 (so DP=2):

    tensor groups    [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]
    data groups      [0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]
    pipeline groups  [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]
    model groups     [0,1,4,5,8,9,12,13] [2,3,6,7,10,11,14,15]   (TP x PP, fixed DP)
    embedding groups [0,12] [1,13] [2,14] [3,15]                  (first + last stage)

`generate_parallel_groups` computes these lists with no process groups at all;
`initialize_model_parallel` turns them into torch.distributed groups.

DeepSpeed-Ulysses sequence parallelism (--ds-sequence-parallel-size sp) adds a fourth
dimension between tensor and data: tp fastest, then sp, then dp, then pp, so that
world = tp * sp * dp * pp. A sequence group holds the sp ranks that split one sample's
tokens (same tensor, data and pipeline index); the data group keeps only the ranks that
read other samples (it excludes the sequence ranks, as in Megatron-DeepSpeed), and the
sequence-data group (sp x dp ranks) is the one gradients are reduced over: summed over
the sequence ranks (each holds the gradient of its own tokens' share of the loss) and
averaged over the data ranks. With 8 GPUs, TP=2 and SP=2 (so DP=2):

    tensor groups         [0,1] [2,3] [4,5] [6,7]
    sequence groups       [0,2] [1,3] [4,6] [5,7]
    data groups           [0,4] [1,5] [2,6] [3,7]
    sequence-data groups  [0,2,4,6] [1,3,5,7]
    model groups          [0,1] [2,3] [4,5] [6,7]

DeepSpeed (``deepspeed.initialize(mpu=mpu)``) reads `get_model_parallel_world_size` and
`get_model_parallel_rank`, which are the *tensor*-parallel ones, as in Megatron-DeepSpeed,
and `get_model_parallel_group`, the TP x PP group.

The ``set_*`` functions override a world size or rank without any process group, for
offline tools such as checkpoint converters; getters prefer an override when one is set.
When neither model parallelism nor torch.distributed is initialised, the world-size and
rank getters describe a single process (size 1, rank 0).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch

__all__ = [
    "generate_parallel_groups",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "destroy_model_parallel",
    "clear_model_parallel_overrides",
    "model_parallel_overrides",
    "get_model_parallel_group",
    "get_tensor_model_parallel_group",
    "get_pipeline_model_parallel_group",
    "get_data_parallel_group",
    "get_data_parallel_group_ranks",
    "get_embedding_group",
    "is_rank_in_embedding_group",
    "set_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_world_size",
    "set_pipeline_model_parallel_world_size",
    "get_pipeline_model_parallel_world_size",
    "set_tensor_model_parallel_rank",
    "get_tensor_model_parallel_rank",
    "set_pipeline_model_parallel_rank",
    "get_pipeline_model_parallel_rank",
    "set_pipeline_model_parallel_split_rank",
    "get_pipeline_model_parallel_split_rank",
    "is_pipeline_stage_before_split",
    "is_pipeline_stage_after_split",
    "is_pipeline_stage_at_split",
    "get_model_parallel_world_size",
    "get_model_parallel_rank",
    "is_pipeline_first_stage",
    "is_pipeline_last_stage",
    "get_virtual_pipeline_model_parallel_rank",
    "set_virtual_pipeline_model_parallel_rank",
    "get_virtual_pipeline_model_parallel_world_size",
    "get_tensor_model_parallel_src_rank",
    "get_data_parallel_src_rank",
    "get_pipeline_model_parallel_first_rank",
    "get_pipeline_model_parallel_last_rank",
    "get_pipeline_model_parallel_next_rank",
    "get_pipeline_model_parallel_prev_rank",
    "get_data_parallel_world_size",
    "get_data_parallel_rank",
    "sequence_parallel_is_initialized",
    "get_sequence_parallel_group",
    "get_sequence_parallel_world_size",
    "get_sequence_parallel_rank",
    "get_sequence_parallel_src_rank",
    "get_sequence_data_parallel_group",
    "get_sequence_data_parallel_world_size",
    "get_sequence_data_parallel_rank",
]

_GROUP_KEYS = ("tensor", "pipeline", "data", "model", "embedding")
_DIM_NAMES = ("tp", "dp", "pp")

# Process groups of this rank.
_TENSOR_MODEL_PARALLEL_GROUP = None
_PIPELINE_MODEL_PARALLEL_GROUP = None
_MODEL_PARALLEL_GROUP = None
_DATA_PARALLEL_GROUP = None
_EMBEDDING_GROUP = None
# Global ranks in this rank's groups.
_TENSOR_GLOBAL_RANKS: List[int] | None = None
_PIPELINE_GLOBAL_RANKS: List[int] | None = None
_DATA_PARALLEL_GLOBAL_RANKS: List[int] | None = None
_EMBEDDING_GLOBAL_RANKS: List[int] | None = None
# DeepSpeed-Ulysses sequence parallelism: None while its size is 1.
_SEQUENCE_PARALLEL_GROUP = None
_SEQUENCE_PARALLEL_GLOBAL_RANKS: List[int] | None = None
_SEQUENCE_DATA_PARALLEL_GROUP = None
# Interleaved (virtual) pipeline stages.
_VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK: int | None = None
_VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE: int | None = None
# Encoder/decoder split stage (T5).
_PIPELINE_MODEL_PARALLEL_SPLIT_RANK: int | None = None
# Overrides for tools that run without process groups.
_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE: int | None = None
_MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE: int | None = None
_MPU_TENSOR_MODEL_PARALLEL_RANK: int | None = None
_MPU_PIPELINE_MODEL_PARALLEL_RANK: int | None = None


# --------------------------------------------------------------------------------------
# The pure layout
# --------------------------------------------------------------------------------------


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"megatron/mpu/initialize.py: {name} must be a positive int, got {value!r}"
        )


def _parse_rank_order(rank_order: str) -> List[str]:
    dims = rank_order.lower().split("-")
    if sorted(dims) != sorted(_DIM_NAMES):
        raise ValueError(
            f"megatron/mpu/initialize.py: rank_order must order 'tp', 'dp' and 'pp' "
            f"joined by '-' (fastest first), got {rank_order!r}"
        )
    return dims


def _groups_varying(world_size: int, sizes: Dict[str, int], order: List[str], vary) -> List:
    """Rank lists whose members differ only in the dimensions `vary`.

    Rank r has coordinate (r // stride_d) % size_d along dimension d, where stride_d is the
    product of the sizes of the dimensions before d in `order`. Members of a group are in
    ascending rank (so a pipeline group lists stage 0 first); groups are ordered by their
    smallest rank, which is the order Megatron creates them in.
    """
    strides, stride = {}, 1
    for d in order:
        strides[d] = stride
        stride *= sizes[d]
    groups: Dict[tuple, List[int]] = {}
    for r in range(world_size):
        key = tuple((r // strides[d]) % sizes[d] for d in order if d not in vary)
        groups.setdefault(key, []).append(r)
    return sorted(groups.values(), key=lambda g: g[0])


def generate_parallel_groups(
    world_size: int,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    rank_order: str = "tp-dp-pp",
    pipeline_model_parallel_split_rank: int | None = None,
    sequence_parallel_size: int = 1,
) -> Dict[str, List[List[int]]]:
    """Every process group's member ranks, for a world of `world_size` ranks.

    With tp = tensor_model_parallel_size, pp = pipeline_model_parallel_size and
    sp = sequence_parallel_size, dp = world_size / (tp * sp * pp). `rank_order` names the
    dimensions tp, dp and pp fastest first (Megatron's layout is 'tp-dp-pp'); the sequence
    dimension comes right after tp. Returns a dict with keys

      'tensor'    dp * pp groups of tp ranks
      'data'      tp * pp groups of dp ranks
      'pipeline'  tp * dp groups of pp ranks, stage 0 first
      'model'     dp groups of tp * pp ranks (all ranks holding one model replica)
      'embedding' one group per pipeline group: its first and last stage (plus the
                  encoder/decoder split stage when `pipeline_model_parallel_split_rank`
                  is given); a single-stage pipeline gives just that rank.

    and with sp > 1 also

      'sequence'      tp * dp * pp groups of sp ranks
      'sequence_data' tp * pp groups of sp * dp ranks
    """
    _check_positive("world_size", world_size)
    _check_positive("tensor_model_parallel_size", tensor_model_parallel_size)
    _check_positive("pipeline_model_parallel_size", pipeline_model_parallel_size)
    _check_positive("sequence_parallel_size", sequence_parallel_size)
    tp, pp, sp = tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel_size
    if world_size % (tp * pp * sp) != 0:
        raise ValueError(
            f"megatron/mpu/initialize.py: world_size ({world_size}) is not divisible by "
            f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp})"
            + (f" x sequence_parallel_size ({sp})" if sp > 1 else "")
        )
    split = pipeline_model_parallel_split_rank
    if split is not None and not 0 <= split < pp:
        raise ValueError(
            f"megatron/mpu/initialize.py: pipeline_model_parallel_split_rank ({split}) "
            f"must be in [0, {pp})"
        )
    order = _parse_rank_order(rank_order)
    order.insert(order.index("tp") + 1, "sp")
    sizes = {"tp": tp, "sp": sp, "dp": world_size // (tp * pp * sp), "pp": pp}
    pipeline = _groups_varying(world_size, sizes, order, {"pp"})
    embedding = []
    for ranks in pipeline:
        stages = [0, pp - 1] if split is None else [0, split, pp - 1]
        embedding.append(sorted({ranks[s] for s in stages}, key=ranks.index))
    layout = {
        "tensor": _groups_varying(world_size, sizes, order, {"tp"}),
        "pipeline": pipeline,
        "data": _groups_varying(world_size, sizes, order, {"dp"}),
        "model": _groups_varying(world_size, sizes, order, {"tp", "pp"}),
        "embedding": embedding,
    }
    if sp > 1:
        layout["sequence"] = _groups_varying(world_size, sizes, order, {"sp"})
        layout["sequence_data"] = _groups_varying(world_size, sizes, order, {"sp", "dp"})
    return layout


# --------------------------------------------------------------------------------------
# Creating the process groups
# --------------------------------------------------------------------------------------


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    pipeline_model_parallel_split_rank: int | None = None,
    timeout=None,
    sequence_parallel_size: int = 1,
) -> None:
    """Create the tensor, pipeline, data, model and embedding groups for this rank (and
    the sequence and sequence-data groups when `sequence_parallel_size` > 1).

    torch.distributed must be initialised. Every rank creates every group, in the same
    order (torch.distributed.new_group is collective), and keeps the ones it belongs to.
    `virtual_pipeline_model_parallel_size` (> 1 model chunks per stage) enables the
    interleaved schedule; it needs pipeline_model_parallel_size > 1. `timeout` (a
    timedelta) bounds every collective of these groups, as the world group's does.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _MODEL_PARALLEL_GROUP
    global _DATA_PARALLEL_GROUP, _EMBEDDING_GROUP, _TENSOR_GLOBAL_RANKS, _PIPELINE_GLOBAL_RANKS
    global _DATA_PARALLEL_GLOBAL_RANKS, _EMBEDDING_GLOBAL_RANKS
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _PIPELINE_MODEL_PARALLEL_SPLIT_RANK
    global _SEQUENCE_PARALLEL_GROUP, _SEQUENCE_PARALLEL_GLOBAL_RANKS, _SEQUENCE_DATA_PARALLEL_GROUP

    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "megatron/mpu/initialize.py: torch.distributed must be initialised before "
            "initialize_model_parallel()"
        )
    if model_parallel_is_initialized():
        raise RuntimeError(
            "megatron/mpu/initialize.py: model parallel groups are already initialised; "
            "call destroy_model_parallel() first"
        )
    if virtual_pipeline_model_parallel_size is not None:
        _check_positive(
            "virtual_pipeline_model_parallel_size", virtual_pipeline_model_parallel_size
        )
        if pipeline_model_parallel_size < 2:
            raise ValueError(
                "megatron/mpu/initialize.py: virtual_pipeline_model_parallel_size needs "
                f"pipeline_model_parallel_size > 1, got {pipeline_model_parallel_size}"
            )
    world_size = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    layout = generate_parallel_groups(
        world_size,
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        pipeline_model_parallel_split_rank=pipeline_model_parallel_split_rank,
        sequence_parallel_size=sequence_parallel_size,
    )

    mine = {}
    for key in _GROUP_KEYS + tuple(k for k in ("sequence", "sequence_data") if k in layout):
        for ranks in layout[key]:
            group = torch.distributed.new_group(ranks, timeout=timeout)  # collective: every rank, same order
            if rank in ranks:
                mine[key] = (group, ranks)

    _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_GLOBAL_RANKS = mine["tensor"]
    _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_GLOBAL_RANKS = mine["pipeline"]
    _DATA_PARALLEL_GROUP, _DATA_PARALLEL_GLOBAL_RANKS = mine["data"]
    _MODEL_PARALLEL_GROUP, _ = mine["model"]
    # Ranks outside every embedding group (middle stages) still know their pipeline's one.
    _EMBEDDING_GROUP, _EMBEDDING_GLOBAL_RANKS = mine.get("embedding", (None, None))
    if _EMBEDDING_GLOBAL_RANKS is None:
        index = layout["pipeline"].index(_PIPELINE_GLOBAL_RANKS)
        _EMBEDDING_GLOBAL_RANKS = layout["embedding"][index]
    if virtual_pipeline_model_parallel_size is not None:
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = 0
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = virtual_pipeline_model_parallel_size
    _PIPELINE_MODEL_PARALLEL_SPLIT_RANK = pipeline_model_parallel_split_rank
    if "sequence" in mine:
        _SEQUENCE_PARALLEL_GROUP, _SEQUENCE_PARALLEL_GLOBAL_RANKS = mine["sequence"]
        _SEQUENCE_DATA_PARALLEL_GROUP, _ = mine["sequence_data"]


def model_parallel_is_initialized() -> bool:
    """True once initialize_model_parallel() has created this rank's groups."""
    return not (
        _TENSOR_MODEL_PARALLEL_GROUP is None
        or _PIPELINE_MODEL_PARALLEL_GROUP is None
        or _DATA_PARALLEL_GROUP is None
    )


def clear_model_parallel_overrides() -> None:
    """Forget every set_*_world_size / set_*_rank override."""
    global _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE, _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _MPU_TENSOR_MODEL_PARALLEL_RANK, _MPU_PIPELINE_MODEL_PARALLEL_RANK
    _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = None
    _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None
    _MPU_TENSOR_MODEL_PARALLEL_RANK = None
    _MPU_PIPELINE_MODEL_PARALLEL_RANK = None


@contextlib.contextmanager
def model_parallel_overrides(
    tensor_world_size: int,
    tensor_rank: int,
    pipeline_world_size: int,
    pipeline_rank: int,
) -> Iterator[None]:
    """Inside the block the getters describe this layout (no virtual pipeline stages),
    whatever groups exist; the previous overrides and virtual-pipeline state come back
    on exit. For building a model offline, e.g. on the meta device to count it."""
    global _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE, _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _MPU_TENSOR_MODEL_PARALLEL_RANK, _MPU_PIPELINE_MODEL_PARALLEL_RANK
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    saved = (
        _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE,
        _MPU_TENSOR_MODEL_PARALLEL_RANK,
        _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE,
        _MPU_PIPELINE_MODEL_PARALLEL_RANK,
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK,
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE,
    )
    _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = tensor_world_size
    _MPU_TENSOR_MODEL_PARALLEL_RANK = tensor_rank
    _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = pipeline_world_size
    _MPU_PIPELINE_MODEL_PARALLEL_RANK = pipeline_rank
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = None
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None
    try:
        yield
    finally:
        (
            _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE,
            _MPU_TENSOR_MODEL_PARALLEL_RANK,
            _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE,
            _MPU_PIPELINE_MODEL_PARALLEL_RANK,
            _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK,
            _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE,
        ) = saved


def destroy_model_parallel() -> None:
    """Drop this rank's groups, the virtual-pipeline state and every override."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _MODEL_PARALLEL_GROUP
    global _DATA_PARALLEL_GROUP, _EMBEDDING_GROUP, _TENSOR_GLOBAL_RANKS, _PIPELINE_GLOBAL_RANKS
    global _DATA_PARALLEL_GLOBAL_RANKS, _EMBEDDING_GLOBAL_RANKS
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _PIPELINE_MODEL_PARALLEL_SPLIT_RANK
    global _SEQUENCE_PARALLEL_GROUP, _SEQUENCE_PARALLEL_GLOBAL_RANKS, _SEQUENCE_DATA_PARALLEL_GROUP
    _SEQUENCE_PARALLEL_GROUP = _SEQUENCE_PARALLEL_GLOBAL_RANKS = None
    _SEQUENCE_DATA_PARALLEL_GROUP = None
    _TENSOR_MODEL_PARALLEL_GROUP = _PIPELINE_MODEL_PARALLEL_GROUP = _MODEL_PARALLEL_GROUP = None
    _DATA_PARALLEL_GROUP = _EMBEDDING_GROUP = None
    _TENSOR_GLOBAL_RANKS = _PIPELINE_GLOBAL_RANKS = None
    _DATA_PARALLEL_GLOBAL_RANKS = _EMBEDDING_GLOBAL_RANKS = None
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = None
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None
    _PIPELINE_MODEL_PARALLEL_SPLIT_RANK = None
    clear_model_parallel_overrides()


# --------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------


def _need(group, name: str):
    if group is None:
        raise RuntimeError(
            f"megatron/mpu/initialize.py: {name} group is not initialised; "
            "call initialize_model_parallel() first"
        )
    return group


def get_model_parallel_group():
    """The tensor x pipeline group: every rank that holds a part of this model replica."""
    return _need(_MODEL_PARALLEL_GROUP, "model parallel")


def get_tensor_model_parallel_group():
    return _need(_TENSOR_MODEL_PARALLEL_GROUP, "tensor model parallel")


def get_pipeline_model_parallel_group():
    return _need(_PIPELINE_MODEL_PARALLEL_GROUP, "pipeline model parallel")


def get_data_parallel_group():
    return _need(_DATA_PARALLEL_GROUP, "data parallel")


def get_data_parallel_group_ranks() -> List[int]:
    """Global ranks of this rank's data-parallel group."""
    return list(_need(_DATA_PARALLEL_GLOBAL_RANKS, "data parallel"))


def get_embedding_group():
    """First and last pipeline stage of this pipeline (tied word embeddings); None on
    ranks outside it."""
    _need(_EMBEDDING_GLOBAL_RANKS, "embedding")
    return _EMBEDDING_GROUP


def is_rank_in_embedding_group(ignore_virtual: bool = False) -> bool:
    """True on the pipeline stages whose word embeddings are tied (first and last).

    Unless `ignore_virtual`, with interleaving only the first model chunk of the first
    stage and the last chunk of the last stage count.
    """
    if not torch.distributed.is_initialized() or _EMBEDDING_GLOBAL_RANKS is None:
        return True
    rank = torch.distributed.get_rank()
    if rank not in _EMBEDDING_GLOBAL_RANKS:
        return False
    if ignore_virtual:
        return True
    if rank == _EMBEDDING_GLOBAL_RANKS[0]:
        return is_pipeline_first_stage()
    if rank == _EMBEDDING_GLOBAL_RANKS[-1]:
        return is_pipeline_last_stage()
    return True


# --------------------------------------------------------------------------------------
# World sizes and ranks
# --------------------------------------------------------------------------------------


def _size_of(group, name: str) -> int:
    if group is None and not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group=_need(group, name))


def _rank_in(group, name: str) -> int:
    if group is None and not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank(group=_need(group, name))


def set_tensor_model_parallel_world_size(world_size: int | None) -> None:
    global _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE
    _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = world_size


def get_tensor_model_parallel_world_size() -> int:
    if _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE is not None:
        return _MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE
    return _size_of(_TENSOR_MODEL_PARALLEL_GROUP, "tensor model parallel")


def set_pipeline_model_parallel_world_size(world_size: int | None) -> None:
    global _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = world_size


def get_pipeline_model_parallel_world_size() -> int:
    if _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None:
        return _MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    return _size_of(_PIPELINE_MODEL_PARALLEL_GROUP, "pipeline model parallel")


def set_tensor_model_parallel_rank(rank: int | None) -> None:
    global _MPU_TENSOR_MODEL_PARALLEL_RANK
    _MPU_TENSOR_MODEL_PARALLEL_RANK = rank


def get_tensor_model_parallel_rank() -> int:
    if _MPU_TENSOR_MODEL_PARALLEL_RANK is not None:
        return _MPU_TENSOR_MODEL_PARALLEL_RANK
    return _rank_in(_TENSOR_MODEL_PARALLEL_GROUP, "tensor model parallel")


def set_pipeline_model_parallel_rank(rank: int | None) -> None:
    global _MPU_PIPELINE_MODEL_PARALLEL_RANK
    _MPU_PIPELINE_MODEL_PARALLEL_RANK = rank


def get_pipeline_model_parallel_rank() -> int:
    if _MPU_PIPELINE_MODEL_PARALLEL_RANK is not None:
        return _MPU_PIPELINE_MODEL_PARALLEL_RANK
    return _rank_in(_PIPELINE_MODEL_PARALLEL_GROUP, "pipeline model parallel")


def set_pipeline_model_parallel_split_rank(rank: int | None) -> None:
    global _PIPELINE_MODEL_PARALLEL_SPLIT_RANK
    _PIPELINE_MODEL_PARALLEL_SPLIT_RANK = rank


def get_pipeline_model_parallel_split_rank() -> int | None:
    """First decoder stage of an encoder-decoder (T5) pipeline, or None."""
    return _PIPELINE_MODEL_PARALLEL_SPLIT_RANK


def is_pipeline_stage_before_split(rank: int | None = None) -> bool:
    """True if the stage (this one by default) runs the encoder."""
    if get_pipeline_model_parallel_world_size() == 1 or _PIPELINE_MODEL_PARALLEL_SPLIT_RANK is None:
        return True
    rank = get_pipeline_model_parallel_rank() if rank is None else rank
    return rank < _PIPELINE_MODEL_PARALLEL_SPLIT_RANK


def is_pipeline_stage_after_split(rank: int | None = None) -> bool:
    """True if the stage (this one by default) runs the decoder."""
    if get_pipeline_model_parallel_world_size() == 1 or _PIPELINE_MODEL_PARALLEL_SPLIT_RANK is None:
        return True
    rank = get_pipeline_model_parallel_rank() if rank is None else rank
    return rank >= _PIPELINE_MODEL_PARALLEL_SPLIT_RANK


def is_pipeline_stage_at_split() -> bool:
    """True on the last encoder stage, whose successor is the first decoder stage."""
    rank = get_pipeline_model_parallel_rank()
    return is_pipeline_stage_before_split(rank) and is_pipeline_stage_after_split(rank + 1)


def get_model_parallel_world_size() -> int:
    """DeepSpeed's name for the tensor-parallel world size (as in Megatron-DeepSpeed)."""
    return get_tensor_model_parallel_world_size()


def get_model_parallel_rank() -> int:
    """DeepSpeed's name for the tensor-parallel rank (as in Megatron-DeepSpeed)."""
    return get_tensor_model_parallel_rank()


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on pipeline stage 0 (and, unless `ignore_virtual`, its first model chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None:
        if _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK != 0:
            return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the last pipeline stage (and, unless `ignore_virtual`, its last chunk)."""
    vsize = _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    if not ignore_virtual and vsize is not None:
        if _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK != vsize - 1:
            return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_virtual_pipeline_model_parallel_rank() -> int | None:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK


def set_virtual_pipeline_model_parallel_rank(rank: int | None) -> None:
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = rank


def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE


def set_virtual_pipeline_model_parallel_world_size(world_size: int | None) -> None:
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = world_size


def _global_ranks(ranks: List[int] | None, name: str) -> List[int]:
    if ranks is None and not torch.distributed.is_initialized():
        return [0]
    return _need(ranks, name)


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tensor-parallel rank 0 in this rank's tensor group."""
    return _global_ranks(_TENSOR_GLOBAL_RANKS, "tensor model parallel")[0]


def get_data_parallel_src_rank() -> int:
    """Global rank of data-parallel rank 0 in this rank's data group."""
    return _global_ranks(_DATA_PARALLEL_GLOBAL_RANKS, "data parallel")[0]


def get_pipeline_model_parallel_first_rank() -> int:
    return _global_ranks(_PIPELINE_GLOBAL_RANKS, "pipeline model parallel")[0]


def get_pipeline_model_parallel_last_rank() -> int:
    return _global_ranks(_PIPELINE_GLOBAL_RANKS, "pipeline model parallel")[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next pipeline stage (wrapping around after the last)."""
    ranks = _global_ranks(_PIPELINE_GLOBAL_RANKS, "pipeline model parallel")
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous pipeline stage (wrapping around before the first)."""
    ranks = _global_ranks(_PIPELINE_GLOBAL_RANKS, "pipeline model parallel")
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


def get_data_parallel_world_size() -> int:
    return _size_of(_DATA_PARALLEL_GROUP, "data parallel")


def get_data_parallel_rank() -> int:
    return _rank_in(_DATA_PARALLEL_GROUP, "data parallel")


# --------------------------------------------------------------------------------------
# DeepSpeed-Ulysses sequence parallelism (DeepSpeed reads these through mpu=)
# --------------------------------------------------------------------------------------


def sequence_parallel_is_initialized() -> bool:
    """True when this rank's groups include sequence groups (sequence parallel size > 1)."""
    return _SEQUENCE_PARALLEL_GROUP is not None


def get_sequence_parallel_group():
    """The ranks that split this rank's samples along the sequence."""
    return _need(_SEQUENCE_PARALLEL_GROUP, "sequence parallel (--ds-sequence-parallel-size > 1)")


def get_sequence_parallel_world_size() -> int:
    """Sequence-parallel size; 1 without sequence groups."""
    if _SEQUENCE_PARALLEL_GROUP is None:
        return 1
    return torch.distributed.get_world_size(group=_SEQUENCE_PARALLEL_GROUP)


def get_sequence_parallel_rank() -> int:
    """Index of this rank's slice of the sequence; 0 without sequence groups."""
    if _SEQUENCE_PARALLEL_GROUP is None:
        return 0
    return torch.distributed.get_rank(group=_SEQUENCE_PARALLEL_GROUP)


def get_sequence_parallel_src_rank() -> int:
    """Global rank of sequence-parallel rank 0 in this rank's sequence group."""
    if _SEQUENCE_PARALLEL_GLOBAL_RANKS is None:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return _SEQUENCE_PARALLEL_GLOBAL_RANKS[0]


def get_sequence_data_parallel_group():
    """Sequence x data ranks (the gradient reduction and ZeRO partition group); the data
    group without sequence parallelism."""
    if _SEQUENCE_DATA_PARALLEL_GROUP is None:
        return get_data_parallel_group()
    return _SEQUENCE_DATA_PARALLEL_GROUP


def get_sequence_data_parallel_world_size() -> int:
    if _SEQUENCE_DATA_PARALLEL_GROUP is None:
        return get_data_parallel_world_size()
    return torch.distributed.get_world_size(group=_SEQUENCE_DATA_PARALLEL_GROUP)


def get_sequence_data_parallel_rank() -> int:
    if _SEQUENCE_DATA_PARALLEL_GROUP is None:
        return get_data_parallel_rank()
    return torch.distributed.get_rank(group=_SEQUENCE_DATA_PARALLEL_GROUP)
