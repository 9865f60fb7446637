"""The one place that knows which device we run on.

Everything device-specific (device names, RNG state, synchronisation, the communication
backend) goes through DeepSpeed's accelerator abstraction: CUDA with NCCL on GPUs, CPU
with gloo everywhere else. Code outside this module never calls ``torch.cuda`` directly.
"""

import functools
import os


@functools.lru_cache(maxsize=1)
def get_accelerator():
    # DeepSpeed logs a warning when it falls back to CPU; say it once, ourselves, instead.
    import logging

    logging.getLogger("DeepSpeed").setLevel(
        logging.ERROR if os.environ.get("MEGATRON_QUIET_DS", "1") == "1" else logging.INFO
    )
    from deepspeed.accelerator import get_accelerator as _ds_get_accelerator

    return _ds_get_accelerator()


def device_name() -> str:
    """'cuda' or 'cpu' (or another accelerator's name)."""
    return get_accelerator().device_name()


def current_device():
    """A ``torch.device`` for this rank's accelerator."""
    import torch

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), acc.current_device())


def is_gpu() -> bool:
    return device_name() != "cpu"


def communication_backend() -> str:
    """nccl on CUDA, gloo on CPU (DeepSpeed's CPU accelerator says 'ccl' only with oneCCL)."""
    name = get_accelerator().communication_backend_name()
    if name == "ccl":
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401
        except ImportError:
            return "gloo"
    return name


def synchronize() -> None:
    get_accelerator().synchronize()
