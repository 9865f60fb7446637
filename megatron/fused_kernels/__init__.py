"""Megatron's fused CUDA kernels, built on demand with torch's extension loader.

Kernels (sources in this folder, one warp per row of scores, fp16 and bf16):

* ``scaled_upper_triang_masked_softmax_cuda``: causal softmax of scale * scores,
  [attn_batches, sq, sq]; ``forward(input, scale)``, ``backward(grad, probs, scale)``.
* ``scaled_masked_softmax_cuda``: softmax of scale * scores with a boolean mask
  [b or 1, 1, sq, sk]; ``forward(input, mask, scale)``, ``backward(grad, probs, mask, scale)``.

``load(rank)`` builds them (ninja, -O3, --use_fast_math, for the local GPU's architecture,
or TORCH_CUDA_ARCH_LIST when set) into ``megatron/fused_kernels/build``: rank 0 builds
while the other ranks wait at a barrier, then every rank loads the built modules. Without
a CUDA device, or when the build fails, it logs one line and the torch reference paths
run (megatron/model/fused_softmax.py chooses per call through ``is_loaded()``).
"""

from __future__ import annotations

import os
import pathlib
from types import ModuleType
from typing import Any, Dict, List

SRC_DIR = pathlib.Path(__file__).resolve().parent
BUILD_DIR = SRC_DIR / "build"

KERNEL_SOURCES: Dict[str, List[str]] = {
    "scaled_upper_triang_masked_softmax_cuda": [
        "scaled_upper_triang_masked_softmax.cpp",
        "scaled_upper_triang_masked_softmax_cuda.cu",
    ],
    "scaled_masked_softmax_cuda": [
        "scaled_masked_softmax.cpp",
        "scaled_masked_softmax_cuda.cu",
    ],
}

_MODULES: Dict[str, ModuleType] = {}
_FAILED_MARKER = "BUILD_FAILED"


def _log(message: str) -> None:
    from megatron import print_rank_0

    print_rank_0(f"> fused kernels: {message}")


def is_loaded() -> bool:
    """True once every fused kernel module is built and imported in this process."""
    return len(_MODULES) == len(KERNEL_SOURCES)


def get_module(name: str) -> ModuleType:
    """The loaded extension module `name` (a key of KERNEL_SOURCES)."""
    if name not in _MODULES:
        raise RuntimeError(
            f"megatron/fused_kernels: kernel {name!r} is not loaded; call "
            "megatron.fused_kernels.load() on a CUDA machine first"
        )
    return _MODULES[name]


def _build_and_import(verbose: bool) -> None:
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    for name, sources in KERNEL_SOURCES.items():
        build_dir = BUILD_DIR / name
        build_dir.mkdir(parents=True, exist_ok=True)
        _MODULES[name] = cpp_extension.load(
            name=name,
            sources=[str(SRC_DIR / s) for s in sources],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17"],
            extra_include_paths=[str(SRC_DIR)],
            build_directory=str(build_dir),
            verbose=verbose,
        )


def load(rank: Any = 0, verbose: bool = False) -> bool:
    """Build (on `rank` 0) and load the fused kernels; returns whether they are loaded.

    Call it on every rank (it holds a barrier when torch.distributed is initialised).
    `rank` may also be the parsed arguments, as Megatron's load(args): their `rank` is
    used, and nothing is built under --no-masked-softmax-fusion.
    """
    import torch

    from megatron.accelerator import device_name

    if is_loaded():
        return True
    if not isinstance(rank, int):
        args = rank
        rank = int(getattr(args, "rank", 0) or 0)
        if not getattr(args, "masked_softmax_fusion", True):
            _log("--no-masked-softmax-fusion: not built, the torch softmax path runs")
            return False
        if getattr(args, "use_flash_attn", False):
            _log("--use-flash-attn: attention does not use the fused softmax; not built")
            return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if device_name() != "cuda":
        _log(f"no CUDA device ({device_name()}): not built, the torch softmax path runs")
        return False
    marker = BUILD_DIR / _FAILED_MARKER
    error = None
    if rank == 0:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        if marker.exists():
            marker.unlink()
        try:
            _build_and_import(verbose)
        except Exception as exc:  # noqa: BLE001 - any build failure falls back to torch
            error = exc
            marker.write_text(f"{type(exc).__name__}: {exc}\n")
    if distributed:
        torch.distributed.barrier()
    if rank != 0:
        if marker.exists():
            error = RuntimeError(marker.read_text().strip())
        else:
            try:
                _build_and_import(verbose)
            except Exception as exc:  # noqa: BLE001
                error = exc
    if error is not None:
        _MODULES.clear()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        _log(f"build failed ({type(error).__name__}: {first_line}); the torch softmax path runs")
        return False
    _log(f"loaded from {BUILD_DIR} (pid {os.getpid()})")
    return True
