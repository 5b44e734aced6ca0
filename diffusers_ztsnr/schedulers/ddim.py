"""DDIM (Song et al. 2021) with eta, on the integer grid of the VP schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import register_to_config

from ..solvers import ddim_update
from .vp import VPSchedulerBase


class ZTSNRDDIMScheduler(VPSchedulerBase):
    """DDIM that samples zero-terminal-SNR schedules exactly, for any parameterization.

    Drop-in for ``diffusers.DDIMScheduler``: same config keys, same meaning. Differences: the next
    timestep is the next grid entry (diffusers computes ``t - T // n``, off by one when ``n`` does not
    divide ``T``); the step from SNR 0 is exact for v / sample / flow models; an epsilon model at
    SNR 0 is an error at ``set_timesteps`` (see ``epsilon_zero_snr_clamp``); the default spacing is
    ``logsnr``. ``set_alpha_to_one=False`` (the SD configs' value) makes the last step land on
    ``alphabar_0`` instead of clean data, as in diffusers.
    """

    stock_class = DDIMScheduler

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "logsnr",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        set_alpha_to_one: bool = True,
        epsilon_zero_snr_clamp: float | None = None,
        **kwargs: Any,
    ):
        self._check_stock_kwargs(kwargs)
        self._setup_vp()

    def _final_level(self) -> tuple[float, float]:
        if self.config.set_alpha_to_one:
            return (1.0, 0.0)
        return tuple(float(v) for v in self.schedule.alpha_sigma(0.0))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One DDIM step; ``eta`` in ``[0, 1]`` (0: deterministic, 1: DDPM posterior noise)."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} must lie in [0, 1] (beyond 1 the DDIM noise exceeds the next sigma).")
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both.")
        return self._advance(model_output, timestep, sample, generator, return_dict, variance_noise, eta=eta)

    def _update_rule(self, level, next_level, previous_level, eta: float = 0.0):
        return ddim_update(level, next_level, eta)
