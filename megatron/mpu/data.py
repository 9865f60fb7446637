"""Broadcast a batch from tensor-parallel rank 0 to the other ranks of its tensor group.

Only the source rank reads data; the others receive it. Two broadcasts: the shapes of
every key (a fixed-size integer tensor), then all tensors flattened into one buffer.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from megatron.accelerator import current_device

from .initialize import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
)

__all__ = ["broadcast_data"]

_MAX_DATA_DIM = 5


def _comm_device() -> torch.device:
    """Where collective buffers live: CPU for gloo, the accelerator otherwise."""
    if get_tensor_model_parallel_world_size() > 1:
        if torch.distributed.get_backend(get_tensor_model_parallel_group()) == "gloo":
            return torch.device("cpu")
    return current_device()


def _check_data_types(keys: Sequence[str], data: Dict[str, torch.Tensor], datatype) -> None:
    for key in keys:
        if data[key].dtype != datatype:
            raise TypeError(
                f"megatron/mpu/data.py: {key!r} has dtype {data[key].dtype}, "
                f"broadcast_data was asked for {datatype}"
            )


def _broadcast_sizes(
    keys: Sequence[str], data: Dict[str, torch.Tensor] | None, device: torch.device
) -> List[List[int]]:
    """Shape of every key, as known on the source rank."""
    sizes = torch.zeros(len(keys) * _MAX_DATA_DIM, dtype=torch.long)
    if get_tensor_model_parallel_rank() == 0:
        for i, key in enumerate(keys):
            shape = data[key].shape
            if len(shape) >= _MAX_DATA_DIM:
                raise ValueError(
                    f"megatron/mpu/data.py: {key!r} has {len(shape)} dims, at most "
                    f"{_MAX_DATA_DIM - 1} are supported"
                )
            sizes[i * _MAX_DATA_DIM] = len(shape)  # slot 0: ndim, then the dims
            for j, dim in enumerate(shape):
                sizes[i * _MAX_DATA_DIM + 1 + j] = dim
    sizes = sizes.to(device)
    torch.distributed.broadcast(
        sizes, get_tensor_model_parallel_src_rank(), group=get_tensor_model_parallel_group()
    )
    sizes = sizes.cpu().tolist()
    shapes = []
    for i in range(len(keys)):
        ndim = sizes[i * _MAX_DATA_DIM]
        shapes.append(sizes[i * _MAX_DATA_DIM + 1 : i * _MAX_DATA_DIM + 1 + ndim])
    return shapes


def broadcast_data(
    keys: Sequence[str], data: Dict[str, torch.Tensor] | None, datatype: torch.dtype
) -> Dict[str, torch.Tensor]:
    """{key: tensor} on every tensor-parallel rank, copied from tensor-parallel rank 0.

    `data` is read only on the source rank (other ranks may pass None); every listed
    tensor must have dtype `datatype` and at most 4 dimensions. The result lives on
    the accelerator (NCCL) or the CPU (gloo).
    """
    device = _comm_device()
    if get_tensor_model_parallel_world_size() == 1:
        _check_data_types(keys, data, datatype)
        return {key: data[key].to(device) for key in keys}

    shapes = _broadcast_sizes(keys, data, device)
    numels = [int(torch.Size(s).numel()) for s in shapes]
    if get_tensor_model_parallel_rank() == 0:
        _check_data_types(keys, data, datatype)
        flat = torch.cat([data[key].contiguous().view(-1) for key in keys]).to(device)
    else:
        flat = torch.empty(sum(numels), dtype=datatype, device=device)
    torch.distributed.broadcast(
        flat, get_tensor_model_parallel_src_rank(), group=get_tensor_model_parallel_group()
    )

    output, offset = {}, 0
    for key, shape, numel in zip(keys, shapes, numels):
        output[key] = flat.narrow(0, offset, numel).view(shape)
        offset += numel
    return output
