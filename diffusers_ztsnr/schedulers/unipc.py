"""UniPC (bh2) on the VP path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffusers import UniPCMultistepScheduler
from diffusers.configuration_utils import register_to_config

from ..solvers import FINAL_STEPS
from ..unipc_rules import unipc_update
from .vp import FractionalVPSchedulerBase


class ZTSNRUniPCMultistepScheduler(FractionalVPSchedulerBase):
    """UniPC (Zhao et al. 2023, bh2): the UniP predictor and the UniC corrector, which re-takes each step with the
    x0 prediction at its end, at no extra model evaluation (:mod:`diffusers_ztsnr.unipc_rules`). Drop-in for
    ``diffusers.UniPCMultistepScheduler`` with ``predict_x0=True, solver_type="bh2"`` (its defaults); with
    ``solver_order=2, timestep_spacing="trailing", final_step="first_order"`` it is that scheduler step for step.

    Defaults, chosen by the exact Gaussian oracle (see the benchmarks page): ``solver_order=3`` (third order only
    on log-SNR steps up to :data:`~diffusers_ztsnr.unipc_rules.MAX_THIRD_ORDER_STEP`, second order on longer ones)
    on ``timestep_spacing="logsnr_warped"`` (the log-SNR grid, denser toward clean data), and the last step to clean
    data extrapolating the last two x0 predictions (``final_step="extrapolate"``). As in diffusers, prefer
    ``solver_order=2`` under strong classifier-free guidance toward a narrow condition at around 20 steps, whose
    amplified x0 differences the third-order terms extrapolate (measured on the guidance oracle, see the docs).
    Ratios of noise levels throughout, so the first step from SNR 0 is finite (the step after it is not corrected:
    its ``h`` is infinite).
    """

    stock_class = UniPCMultistepScheduler

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "logsnr_warped",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        solver_order: int = 3,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        disable_corrector: Sequence[int] = [],  # noqa: B006 (diffusers' default, kept through its JSON round trip)
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        epsilon_zero_snr_clamp: float | None = None,
        final_step: str = "extrapolate",
        **kwargs: Any,
    ):
        self._check_stock_kwargs(kwargs)
        self._check_choice("solver_order", solver_order, (1, 2, 3))
        self._check_choice("final_step", final_step, FINAL_STEPS)
        self._check_choice("predict_x0", predict_x0, (True,))
        self._check_choice("solver_type", solver_type, ("bh2",))
        if list(disable_corrector or ()):
            raise ValueError(f"disable_corrector={list(disable_corrector)} is not supported; pass [] (the default), "
                             "or use ZTSNRDPMSolverMultistepScheduler for the predictor alone.")
        self._setup_fractional()

    @classmethod
    def _translated_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A DPM-Solver config's ``solver_type`` (``midpoint``, ``heun``) names no UniPC variant: read as ``bh2``, as
        diffusers' UniPC reads it."""
        if config.get("solver_type") in ("midpoint", "heun", "logrho"):
            return {**config, "solver_type": "bh2"}
        return config

    @property
    def history_length(self) -> int:
        return self.config.solver_order  # the corrector of an order-p step uses p earlier x0 predictions

    def _update_rule(self, level, next_level, previous_level, earlier_levels=()):
        levels = [*reversed(earlier_levels), *([previous_level] if previous_level else []), level]
        return unipc_update(levels, next_level, self.config.solver_order, self.config.final_step)
