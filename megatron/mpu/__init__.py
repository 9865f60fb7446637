"""Model parallel utilities: process groups, tensor-parallel layers, communication, RNG.

Every public name is exported flat, as in Megatron (``from megatron import mpu;
mpu.get_tensor_model_parallel_rank()``); the module itself can be passed to DeepSpeed
as ``deepspeed.initialize(mpu=mpu)``.
"""

from . import cross_entropy, data, initialize, layers, mappings, overlap, random, utils
from .cross_entropy import *  # noqa: F403
from .data import *  # noqa: F403
from .initialize import *  # noqa: F403
from .layers import *  # noqa: F403
from .mappings import *  # noqa: F403
from .overlap import *  # noqa: F403
from .random import *  # noqa: F403
from .utils import *  # noqa: F403

__all__ = [
    *cross_entropy.__all__,
    *data.__all__,
    *initialize.__all__,
    *layers.__all__,
    *mappings.__all__,
    *overlap.__all__,
    *random.__all__,
    *utils.__all__,
]
