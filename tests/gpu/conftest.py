"""GPU tests: every test here is marked `gpu` and skipped cleanly without CUDA."""

import pytest


def _cuda_available() -> bool:
    try:
        from megatron.accelerator import device_name

        return device_name() == "cuda"
    except Exception:  # noqa: BLE001 - no torch / no deepspeed accelerator: no GPU
        return False


def pytest_collection_modifyitems(config, items):
    here = str(config.rootpath / "tests" / "gpu")
    skip = pytest.mark.skip(reason="needs a CUDA device")
    available = None
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.gpu)
        if available is None:
            available = _cuda_available()
        if not available:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fused_kernels_loaded():
    """Build and load megatron/fused_kernels once per session (fails if the build fails)."""
    from megatron import fused_kernels

    assert fused_kernels.load(rank=0, verbose=False), "fused kernels failed to build"
    return fused_kernels
