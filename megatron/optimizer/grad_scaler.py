"""Loss scalers for fp16 training: a constant scale (``--loss-scale``) or a dynamic one.

The loss is multiplied by ``scale`` before backward so that small fp16 gradients do not
flush to zero; the optimizer multiplies the gradients by ``inv_scale`` before the update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from megatron.accelerator import current_device


class MegatronGradScaler(ABC):
    """A loss scale held as a 1-element fp32 tensor on ``device`` (default: the accelerator)."""

    def __init__(self, initial_scale: float, device: torch.device | str | None = None) -> None:
        if initial_scale <= 0.0:
            raise ValueError(f"grad_scaler.py: loss scale must be > 0, got {initial_scale}")
        device = device if device is not None else current_device()
        self._scale = torch.tensor([float(initial_scale)], dtype=torch.float, device=device)

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return self._scale.double().reciprocal().float()

    @abstractmethod
    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step; ``found_inf`` says the gradients overflowed."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state_dict: dict) -> None: ...


class ConstantGradScaler(MegatronGradScaler):
    """A fixed loss scale; overflowing steps are still skipped by the optimizer."""

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class DynamicGradScaler(MegatronGradScaler):
    """Megatron's dynamic loss scale with hysteresis.

    On an overflowing step the clean-step counter (growth tracker) resets to 0 and the
    hysteresis tracker decrements; only when the hysteresis tracker is <= 0 does the scale
    shrink: scale = max(scale * backoff_factor, min_scale). After ``growth_interval``
    consecutive clean steps the scale grows (scale *= growth_factor), and both trackers reset
    (growth tracker to 0, hysteresis tracker to ``hysteresis``).
    """

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(initial_scale, device)
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(
                f"grad_scaler.py: --min-loss-scale ({min_scale}) must be > 0 and <= "
                f"--initial-loss-scale ({initial_scale})"
            )
        if growth_factor <= 1.0:
            raise ValueError(f"grad_scaler.py: growth factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(
                f"grad_scaler.py: backoff factor must be in (0, 1), got {backoff_factor}"
            )
        if growth_interval <= 0:
            raise ValueError(
                f"grad_scaler.py: --loss-scale-window must be > 0, got {growth_interval}"
            )
        if hysteresis <= 0:
            raise ValueError(f"grad_scaler.py: --hysteresis must be > 0, got {hysteresis}")
        device = self._scale.device
        self.min_scale = torch.tensor([float(min_scale)], dtype=torch.float, device=device)
        self.growth_factor = torch.tensor([float(growth_factor)], dtype=torch.float, device=device)
        self.backoff_factor = torch.tensor(
            [float(backoff_factor)], dtype=torch.float, device=device
        )
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._scale = state_dict["scale"].to(device=self._scale.device, dtype=torch.float)
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])
