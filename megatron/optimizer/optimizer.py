"""Optimizer wrappers: fp32 training, and fp16/bf16 training with fp32 master weights.

Every wrapper's ``step()`` returns ``(update_successful, grad_norm, num_zeros_in_grad)``:
``update_successful`` is False when an fp16 step was skipped because a gradient overflowed;
``grad_norm`` is the global norm before clipping (None when --clip-grad is 0 or the step was
skipped); ``num_zeros_in_grad`` is set with --log-num-zeros-in-grad.

With the local DistributedDataParallel (``params_have_main_grad=True``) the gradients live in
``param.main_grad`` (views into the DDP's contiguous buffers, fp32 when
--accumulate-allreduce-grads-in-fp32), not in ``param.grad``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, List, Tuple

import torch

from megatron import mpu, print_rank_0

from .clip_grads import clip_grad_norm_fp32, count_zeros_fp32
from .grad_scaler import MegatronGradScaler

# Attributes that tell clipping and reduction how a param is split or shared; the fp32
# master copy of a half-precision param must carry them too.
_PARALLEL_ATTRIBUTES = (
    "tensor_model_parallel",
    "partition_dim",
    "partition_stride",
    "shared",
    "sequence_parallel",
    "allreduce",
    "group_name",
)

StepResult = Tuple[bool, float | None, int | None]


def _copy_parallel_attributes(destination: torch.Tensor, source: torch.Tensor) -> None:
    for name in _PARALLEL_ATTRIBUTES:
        if hasattr(source, name):
            setattr(destination, name, getattr(source, name))


def _zero_grad_group_helper(group: List[torch.Tensor], set_to_none: bool) -> None:
    """Drop (``set_to_none``) or zero the ``.grad`` of every param in ``group``."""
    for param in group:
        if param.grad is None:
            continue
        if set_to_none:
            param.grad = None
        else:
            if param.grad.grad_fn is not None:
                param.grad.detach_()
            else:
                param.grad.requires_grad_(False)
            param.grad.zero_()


def _timer(timers, name: str):
    """A started timer when ``timers`` is given, else None."""
    if timers is None:
        return None
    timer = timers(name)
    timer.start()
    return timer


def _stop(timer) -> None:
    if timer is not None:
        timer.stop()


class MegatronOptimizer(ABC):
    """Wraps a torch optimizer; adds clipping, zero counting and loss scaling."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clip_grad: float,
        log_num_zeros_in_grad: bool,
        params_have_main_grad: bool,
    ) -> None:
        if optimizer is None:
            raise ValueError("optimizer.py: no optimizer was provided")
        self.optimizer = optimizer
        self.clip_grad = float(clip_grad or 0.0)
        self.log_num_zeros_in_grad = bool(log_num_zeros_in_grad)
        self.params_have_main_grad = bool(params_have_main_grad)

    def _device(self) -> torch.device:
        """Where the params (and so the grads) live; the accelerator when there are none."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                return param.device
        from megatron.accelerator import current_device

        return current_device()

    def get_parameters(self) -> List[torch.Tensor]:
        """Every param the inner optimizer updates (fp32 masters under fp16/bf16)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def clip_grad_norm(self, clip_grad: float) -> float:
        """Clip the grads of :meth:`get_parameters` to ``clip_grad``; returns the norm."""
        return clip_grad_norm_fp32(self.get_parameters(), clip_grad)

    def count_zeros(self) -> int:
        return count_zeros_fp32(self.get_parameters())

    def _clip_and_count(self) -> Tuple[float | None, int | None]:
        grad_norm = self.clip_grad_norm(self.clip_grad) if self.clip_grad > 0.0 else None
        num_zeros = self.count_zeros() if self.log_num_zeros_in_grad else None
        return grad_norm, num_zeros

    @abstractmethod
    def zero_grad(self, set_to_none: bool = True) -> None: ...

    @abstractmethod
    def get_loss_scale(self) -> torch.Tensor:
        """The current loss scale, a 1-element tensor (1.0 when there is no scaling)."""

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * loss_scale, to call backward on."""
        return self.get_loss_scale() * loss

    def skip_overflowed_step(self) -> None:
        """Skip this step after an fp16 overflow found outside the optimizer (a non-finite
        loss): drop the gradients and back the loss scale off as step() does."""
        self.zero_grad()
        scaler = getattr(self, "grad_scaler", None)
        if scaler is not None:
            scaler.update(True)

    @abstractmethod
    def reload_model_params(self) -> None:
        """Refresh master copies after the model params were changed (e.g. loaded)."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state_dict: dict) -> None: ...

    @abstractmethod
    def step(self, args: Any = None, timers: Any = None) -> StepResult: ...

    # Let the learning-rate scheduler and checkpointing see the inner optimizer's state.
    def _get_state(self):
        return self.optimizer.state

    def _set_state(self, value) -> None:
        self.optimizer.state = value

    state = property(_get_state, _set_state)

    def _get_param_groups(self):
        return self.optimizer.param_groups

    def _set_param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    param_groups = property(_get_param_groups, _set_param_groups)


class FP32Optimizer(MegatronOptimizer):
    """fp32 params and grads: clip, count and step; the loss scale is 1."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clip_grad: float,
        log_num_zeros_in_grad: bool,
        params_have_main_grad: bool,
    ) -> None:
        super().__init__(optimizer, clip_grad, log_num_zeros_in_grad, params_have_main_grad)
        self._scale = torch.tensor([1.0], dtype=torch.float, device=self._device())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.optimizer.param_groups:
            _zero_grad_group_helper(group["params"], set_to_none)

    def get_loss_scale(self) -> torch.Tensor:
        return self._scale

    def step(self, args: Any = None, timers: Any = None) -> StepResult:
        if self.params_have_main_grad:
            # The local DDP accumulated (and reduced) into main_grad; point .grad at it.
            for param in self.get_parameters():
                main_grad = getattr(param, "main_grad", None)
                if main_grad is not None:
                    param.grad = main_grad
        grad_norm, num_zeros = self._clip_and_count()
        self.optimizer.step()
        return True, grad_norm, num_zeros

    def reload_model_params(self) -> None:
        pass

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


class Float16OptimizerWithFloat16Params(MegatronOptimizer):
    """fp16 or bf16 model params, updated through fp32 master copies.

    Each step: model grads (or ``main_grad``) -> fp32 master grads; under fp16, unscale by
    1/loss_scale and check for inf/nan (max over the model-parallel group, so every rank of
    a replica skips together); on overflow the step is skipped and the grad scaler backs off.
    Otherwise clip, step the inner optimizer on the masters, and copy them back into the
    model params. fp32 params of the model (if any) are updated in place.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clip_grad: float,
        log_num_zeros_in_grad: bool,
        params_have_main_grad: bool,
        bf16: bool,
        grad_scaler: MegatronGradScaler | None,
    ) -> None:
        super().__init__(optimizer, clip_grad, log_num_zeros_in_grad, params_have_main_grad)
        self.bf16 = bool(bf16)
        self.grad_scaler = grad_scaler
        if self.grad_scaler is None and not self.bf16:
            raise ValueError("optimizer.py: fp16 training needs a grad scaler")
        device = self._device()
        self.found_inf = torch.tensor([0.0], dtype=torch.float, device=device)
        # bf16 without a scaler still answers get_loss_scale().
        self._scale_one = torch.tensor([1.0], dtype=torch.float, device=device)

        self.float16_groups: List[List[torch.Tensor]] = []
        self.fp32_from_float16_groups: List[List[torch.Tensor]] = []
        self.fp32_from_fp32_groups: List[List[torch.Tensor]] = []
        for param_group in self.optimizer.param_groups:
            self._make_master_params(param_group)
        # Re-key the optimizer state (if any) onto the new master params.
        self.optimizer.load_state_dict(self.optimizer.state_dict())

    def _make_master_params(self, param_group: dict) -> None:
        """Replace each half-precision param of the group by an fp32 master copy."""
        float16_params, fp32_from_float16_params, fp32_params = [], [], []
        for i, param in enumerate(param_group["params"]):
            if not param.requires_grad:
                continue
            if param.dtype in (torch.float16, torch.bfloat16):
                float16_params.append(param)
                main_param = param.detach().clone().float()
                _copy_parallel_attributes(main_param, param)
                param.main_param = main_param
                param_group["params"][i] = main_param
                fp32_from_float16_params.append(main_param)
                if param in self.optimizer.state:
                    self.optimizer.state[main_param] = self.optimizer.state.pop(param)
            elif param.dtype == torch.float32:
                fp32_params.append(param)
            else:
                raise TypeError(
                    "optimizer.py: wrapped parameters must be torch.float16, torch.bfloat16 "
                    f"or torch.float32, got {param.dtype} of shape {tuple(param.shape)}"
                )
        self.float16_groups.append(float16_params)
        self.fp32_from_float16_groups.append(fp32_from_float16_params)
        self.fp32_from_fp32_groups.append(fp32_params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero model and master grads (the local DDP's buffers are zeroed by the DDP)."""
        for groups in (self.float16_groups, self.fp32_from_float16_groups):
            for group in groups:
                _zero_grad_group_helper(group, set_to_none)
        for group in self.fp32_from_fp32_groups:
            _zero_grad_group_helper(group, set_to_none)

    def get_loss_scale(self) -> torch.Tensor:
        if self.grad_scaler is None:
            return self._scale_one
        return self.grad_scaler.scale

    def _copy_model_grads_to_main_grads(self) -> None:
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                if self.params_have_main_grad and hasattr(model_param, "main_grad"):
                    main_param.grad = model_param.main_grad.float()
                elif model_param.grad is not None:
                    main_param.grad = model_param.grad.float()
                # The half-precision grad is no longer needed; free it now.
                model_param.grad = None
        if self.params_have_main_grad:
            for group in self.fp32_from_fp32_groups:
                for param in group:
                    if getattr(param, "main_grad", None) is not None:
                        param.grad = param.main_grad

    def _main_grads(self) -> List[torch.Tensor]:
        grads = []
        for groups in (self.fp32_from_float16_groups, self.fp32_from_fp32_groups):
            for group in groups:
                grads.extend(p.grad for p in group if p.grad is not None)
        return grads

    def _unscale_main_grads_and_check_for_nan(self) -> bool:
        """grads *= 1/scale in place; True if any grad on any model-parallel rank is inf/nan."""
        main_grads = self._main_grads()
        self.found_inf.fill_(0.0)
        if main_grads:
            torch._amp_foreach_non_finite_check_and_unscale_(
                main_grads, self.found_inf, self.grad_scaler.inv_scale
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(
                self.found_inf,
                op=torch.distributed.ReduceOp.MAX,
                group=mpu.get_model_parallel_group(),
            )
        return self.found_inf.item() > 0

    def _copy_main_params_to_model_params(self) -> None:
        model, main = self._flat_pairs()
        if model:
            torch._foreach_copy_(model, main)

    def _copy_model_params_to_main_params(self) -> None:
        model, main = self._flat_pairs()
        if model:
            torch._foreach_copy_(main, model)

    def _flat_pairs(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        model, main = [], []
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            model.extend(p.data for p in model_group)
            main.extend(p.data for p in main_group)
        return model, main

    def reload_model_params(self) -> None:
        self._copy_model_params_to_main_params()

    def step(self, args: Any = None, timers: Any = None) -> StepResult:
        timer = _timer(timers, "optimizer-copy-to-main-grad")
        self._copy_model_grads_to_main_grads()
        _stop(timer)

        if self.grad_scaler is not None:
            timer = _timer(timers, "optimizer-unscale-and-check-inf")
            found_inf = self._unscale_main_grads_and_check_for_nan()
            _stop(timer)
            self.grad_scaler.update(found_inf)
            if found_inf:
                # Skip the update; the overflowing grads must not leak into the next step.
                for group in self.fp32_from_float16_groups + self.fp32_from_fp32_groups:
                    _zero_grad_group_helper(group, set_to_none=True)
                return False, None, None

        timer = _timer(timers, "optimizer-clip-main-grad")
        grad_norm, num_zeros = self._clip_and_count()
        _stop(timer)

        timer = _timer(timers, "optimizer-inner-step")
        self.optimizer.step()
        _stop(timer)

        timer = _timer(timers, "optimizer-copy-main-to-model-params")
        self._copy_main_params_to_model_params()
        _stop(timer)
        return True, grad_norm, num_zeros

    def state_dict(self) -> dict:
        state_dict = {"optimizer": self.optimizer.state_dict()}
        if self.grad_scaler is not None:
            state_dict["grad_scaler"] = self.grad_scaler.state_dict()
        state_dict["fp32_from_fp16_params"] = self.fp32_from_float16_groups
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load optimizer state, grad scaler and fp32 master params (older keys accepted)."""
        optimizer_key = "optimizer" if "optimizer" in state_dict else "optimizer_state_dict"
        self.optimizer.load_state_dict(state_dict[optimizer_key])

        if "grad_scaler" not in state_dict:
            if self.grad_scaler is not None and not self.bf16:
                print_rank_0(
                    "***WARNING*** the checkpoint has no grad scaler state (an older "
                    "checkpoint); the loss scale starts from its initial value"
                )
        elif self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        else:
            print_rank_0(
                "***WARNING*** the checkpoint has grad scaler state but this run uses none; "
                "skipping it"
            )

        key = "fp32_from_fp16_params" if "fp32_from_fp16_params" in state_dict else "fp32_from_fp16"
        saved_groups = state_dict[key]
        if len(saved_groups) != len(self.fp32_from_float16_groups):
            raise ValueError(
                f"optimizer.py: checkpoint has {len(saved_groups)} fp32 master param groups, "
                f"this optimizer has {len(self.fp32_from_float16_groups)}"
            )
        for current_group, saved_group in zip(self.fp32_from_float16_groups, saved_groups):
            if len(current_group) != len(saved_group):
                raise ValueError(
                    f"optimizer.py: checkpoint master param group has {len(saved_group)} "
                    f"params, this optimizer's has {len(current_group)}"
                )
            for current_param, saved_param in zip(current_group, saved_group):
                current_param.data.copy_(saved_param.data)
