"""Euler and ancestral Euler on the VP path, at fractional timesteps (Karras grids, custom sigmas)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config

from ..solvers import ddim_update
from .vp import FractionalVPSchedulerBase


class ZTSNREulerScheduler(FractionalVPSchedulerBase):
    """Euler on the probability-flow ODE; drop-in for ``diffusers.EulerDiscreteScheduler``.

    The latent is kept in VP form (``scale_model_input`` is the identity, ``init_noise_sigma`` is 1),
    where Euler's step in ``sigma/alpha`` equals DDIM with ``eta = 0``; that is what lets it start from
    SNR 0 without diffusers' ``alphabar_T = 2**-24`` clamp. ``use_karras_sigmas`` keeps the SNR-0 start
    and applies Karras' spacing from the next timestep on; ``set_timesteps(sigmas=...)`` takes
    diffusers' ``sigma/alpha`` values.
    """

    stock_class = EulerDiscreteScheduler

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
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        epsilon_zero_snr_clamp: float | None = None,
        **kwargs: Any,
    ):
        self._check_stock_kwargs(kwargs)
        self._setup_fractional()

    def _update_rule(self, level, next_level, previous_level):
        return ddim_update(level, next_level)


class ZTSNREulerAncestralScheduler(FractionalVPSchedulerBase):
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``, eta = 1); drop-in for
    ``diffusers.EulerAncestralDiscreteScheduler``.

    In VP form the ancestral step is DDIM with ``eta = 1``: its noise ``sigma_up`` is computed from
    the ratio ``alpha * sigma_n / (alpha_n * sigma)``, so it is finite at ``alphabar_T = 0`` (diffusers
    gives NaN there, issue #14213) and in fp16 with the cosine schedule (Inf in diffusers).
    """

    stock_class = EulerAncestralDiscreteScheduler

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
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        eta: float = 1.0,
        epsilon_zero_snr_clamp: float | None = None,
        **kwargs: Any,
    ):
        self._check_stock_kwargs(kwargs)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} must lie in [0, 1].")
        self._setup_fractional()

    def _update_rule(self, level, next_level, previous_level):
        return ddim_update(level, next_level, self.config.eta)
