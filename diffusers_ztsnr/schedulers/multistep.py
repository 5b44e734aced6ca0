"""DPM-Solver++(2M) on the VP path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config

from ..solvers import FINAL_STEPS, dpmpp_2m_update
from .vp import FractionalVPSchedulerBase


class ZTSNRDPMSolverMultistepScheduler(FractionalVPSchedulerBase):
    """DPM-Solver++(2M) (Lu et al. 2022); drop-in for ``diffusers.DPMSolverMultistepScheduler``
    with ``algorithm_type="dpmsolver++"``.

    Written with ``e^{-h}`` as a ratio of noise levels, so the first step from SNR 0 and the last to
    clean data are finite and exact (first order there); diffusers' version crashes with Karras sigmas
    on a ZTSNR schedule at 25-30 steps. ``use_karras_sigmas`` keeps the SNR-0 start. The last step to
    clean data (``final_step``, with ``solver_order=2``): ``"extrapolate"`` (default) extrapolates the last two x0
    predictions to zero noise (:func:`diffusers_ztsnr.solvers.extrapolated_final_update`; the first-order step
    loses ``1 - s / sqrt(s^2 + 0.029^2)`` of detail of std ``s`` at any step count, 1.8% at ``s = 0.15``);
    ``"first_order"`` returns the model's x0 prediction, as diffusers does; ``"trapezoid"``
    (:func:`diffusers_ztsnr.solvers.trapezoid_final_update`) is as good for detail coarser than the last noise
    level and leaves noise of about half that level in detail finer than it.
    """

    stock_class = DPMSolverMultistepScheduler

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
        solver_order: int = 2,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        epsilon_zero_snr_clamp: float | None = None,
        final_step: str = "extrapolate",
        **kwargs: Any,
    ):
        self._check_stock_kwargs(kwargs)
        self._check_choice("solver_order", solver_order, (1, 2))
        self._check_choice("final_step", final_step, FINAL_STEPS)
        self._check_choice("algorithm_type", algorithm_type, ("dpmsolver++",))
        self._check_choice("solver_type", solver_type, ("midpoint", "heun"))
        self._setup_fractional()

    @classmethod
    def _translated_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A UniPC config's ``solver_type`` (``bh1``, ``bh2``) names no DPM-Solver variant: read as ``midpoint``, as
        diffusers' DPM-Solver reads it."""
        if config.get("solver_type") in ("bh1", "bh2", "logrho"):
            return {**config, "solver_type": "midpoint"}
        return config

    def _update_rule(self, level, next_level, previous_level):
        if self.config.solver_order == 1:
            previous_level = None
        return dpmpp_2m_update(level, next_level, previous_level, self.config.solver_type, self.config.final_step)
