"""The distributed optimizer over NCCL, one rank per GPU (DP = the GPU count, at least 2):
the in-place reduce-scatter and all-gather of the gradient buffers (gloo goes through
separate tensors) and the point-to-point gather of distrib_optim.pt give the steps of the
local DDP with the unsharded optimizer, in bf16 and fp32 (the checks and tolerances of
tests/unit/optimizer/test_distrib_optimizer.py)."""

import pytest
import torch

from megatron import mpu
from tests.dist_utils import run_distributed
from tests.unit.optimizer.test_distrib_optimizer import check_equals_ddp

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)


def _check(rank, world_size):
    mpu.initialize_model_parallel(1)
    for dtype in (torch.bfloat16, torch.float32):
        check_equals_ddp(dtype)
    mpu.destroy_model_parallel()


def test_distributed_optimizer_equals_ddp_over_nccl():
    run_distributed(_check, world_size=torch.cuda.device_count(), backend="nccl", timeout=300)
