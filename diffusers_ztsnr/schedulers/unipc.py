"""UniPC (bh2) on the VP path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffusers import UniPCMultistepScheduler
from diffusers.configuration_utils import register_to_config

from ..solvers import FINAL_STEPS, unipc_update
from .vp import FractionalVPSchedulerBase


class ZTSNRUniPCMultistepScheduler(FractionalVPSchedulerBase):
    """UniPC (Zhao et al. 2023): DPM-Solver++(2M) as predictor and the UniC corrector, which re-takes each step
    with the x0 prediction at its end, at no extra model evaluation. Drop-in for
    ``diffusers.UniPCMultistepScheduler`` with ``predict_x0=True, solver_type="bh2"`` (its defaults).

    Written with ``e^{-h}`` as a ratio of noise levels like
    :class:`~diffusers_ztsnr.schedulers.multistep.ZTSNRDPMSolverMultistepScheduler`, so the first step from SNR 0
    is finite (the step that follows it is not corrected: its ``h`` is infinite); the last step to clean data is
    ``final_step`` (default: the extrapolation of the last two x0 predictions). ``solver_order=1`` is the
    first-order predictor with the order-1 corrector (the trapezoid in x0).
    """

    stock_class = UniPCMultistepScheduler
    history_length = 2

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
        self._check_choice("solver_order", solver_order, (1, 2))
        self._check_choice("final_step", final_step, FINAL_STEPS)
        self._check_choice("predict_x0", predict_x0, (True,))
        self._check_choice("solver_type", solver_type, ("bh2",))
        if list(disable_corrector or ()):
            raise ValueError(f"disable_corrector={list(disable_corrector)} is not supported; pass [] (the default), "
                             "or use ZTSNRDPMSolverMultistepScheduler for the predictor alone.")
        self._setup_fractional()

    def _update_rule(self, level, next_level, previous_level, earlier_level=None):
        cfg = self.config
        return unipc_update(level, next_level, previous_level, earlier_level, cfg.final_step, cfg.solver_order)
