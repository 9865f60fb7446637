"""Load the compiled `megatron.data.helpers` module, building it when it is missing.

`pip install .` (or `pip install -e .`) builds helpers.cpp through setup.py. When the
package runs from a plain source tree the extension may be absent; `get_helpers()` then
compiles it in place with pybind11 and the system C++ compiler, under a file lock (in the
temporary folder) so that concurrent processes on one machine build it once. `compile_helpers()` is the collective variant for
start-up: global rank 0 builds while the other ranks wait on a barrier.

Neither function imports torch unless torch.distributed is already in use.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import subprocess
import sys
import sysconfig
import tempfile
from types import ModuleType

_MODULE = "megatron.data.helpers"
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "helpers.cpp")
_helpers: ModuleType | None = None


def _import() -> ModuleType | None:
    importlib.invalidate_caches()
    try:
        return importlib.import_module(_MODULE)
    except ImportError:
        return None


# pybind11 learnt NumPy 2's dtype layout in 2.12: an extension built with an older pybind11
# reads NumPy 2 descriptors at the wrong offsets (item sizes, strides) and the index builders
# then write out of bounds and crash the process with a segmentation fault.
_PYBIND11_FOR_NUMPY2 = (2, 12)


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in version.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def numpy_abi_problem(pybind11_version: str, numpy_version: str) -> str | None:
    """Why an extension built with `pybind11_version` cannot run under `numpy_version`, or
    None when the pair works."""
    if _major_minor(numpy_version)[0] < 2:
        return None
    if _major_minor(pybind11_version) >= _PYBIND11_FOR_NUMPY2:
        return None
    return (
        f"{_SOURCE} is built with pybind11 {pybind11_version}, which predates NumPy 2 "
        f"support (pybind11 >= 2.12), and NumPy {numpy_version} is installed: the index "
        "builders would read NumPy 2 arrays with a wrong layout and crash. Install "
        "'pybind11>=2.12' (pip install -U 'pybind11>=2.12') and rebuild the extension "
        "(pip install -e . or delete megatron/data/helpers*.so)"
    )


def _check_numpy_abi(pybind11_version: str) -> None:
    import numpy

    problem = numpy_abi_problem(pybind11_version, numpy.__version__)
    if problem is not None:
        raise RuntimeError(problem)


def _compile_command(target: str) -> list[str]:
    import pybind11

    cxx = os.environ.get("CXX", "c++")
    return [
        cxx,
        "-O3",
        "-shared",
        "-std=c++17",
        "-fPIC",
        "-fvisibility=hidden",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        _SOURCE,
        "-o",
        target,
    ]


def _build_in_place() -> None:
    """Compile helpers.cpp next to this file; the result appears atomically (rename)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = os.path.join(_HERE, "helpers" + suffix)
    tmp = f"{target}.tmp{os.getpid()}"
    import pybind11

    _check_numpy_abi(pybind11.__version__)
    print(f"> compiling {_SOURCE} -> {target} (not built by pip install)", flush=True)
    proc = subprocess.run(_compile_command(tmp), capture_output=True, text=True)
    if proc.returncode != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(
            f"compiling {_SOURCE} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    os.replace(tmp, target)


def get_helpers() -> ModuleType:
    """Return the helpers extension, compiling it in place if it cannot be imported.

    Safe to call from any subset of processes (no collective): a lock file makes the
    first caller compile while the others wait, then everybody imports the same build.
    """
    global _helpers
    if _helpers is not None:
        return _helpers
    module = _import()
    if module is None:
        tag = hashlib.sha1(_HERE.encode()).hexdigest()[:12]
        lock_path = os.path.join(tempfile.gettempdir(), f"megatron_helpers_{tag}.lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                module = _import()
                if module is None:
                    _build_in_place()
                    module = _import()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        if module is None:
            raise ImportError(f"built {_SOURCE} but {_MODULE} still does not import")
    # the pybind11 the extension was compiled with (older builds do not say: then the one
    # installed now, which built it unless the environment changed since)
    built_with = getattr(module, "pybind11_version", None)
    if built_with is None:
        import pybind11

        built_with = pybind11.__version__
    _check_numpy_abi(built_with)
    _helpers = module
    return module


def _distributed_rank() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available():
        return None
    if not torch.distributed.is_initialized():
        return None
    return torch.distributed.get_rank()


def compile_helpers() -> ModuleType:
    """Collective start-up hook: every rank must call it.

    With torch.distributed initialised, global rank 0 imports or builds the extension,
    all ranks meet at a barrier, then the others import it (building locally only if
    their file system does not share rank 0's build). Without it, same as get_helpers().
    """
    rank = _distributed_rank()
    if rank is None:
        return get_helpers()
    import torch

    if rank == 0:
        get_helpers()
    torch.distributed.barrier()
    return get_helpers()
