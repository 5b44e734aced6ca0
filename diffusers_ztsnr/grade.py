"""Grade a sampling schedule by measurement: the per-band error it leaves on an exact oracle.

A schedule is a decreasing list of noise levels: on the VP path ``sigma/alpha`` (k-diffusion's and ComfyUI's
``sigmas``; ``inf`` is the zero-SNR start, a final 0 is allowed), on the flow path the flow time ``s`` in (0, 1]
(``s = 1`` pure noise). :func:`grade` samples the image-like Gaussian
(:func:`diffusers_ztsnr.analytic.image_like_gaussian`) with its exact model on that list, with DPM-Solver++(2M),
UniPC or Euler, and returns each band's ``log(output std / data std)``: exact numbers, no sampling noise
(:func:`diffusers_ztsnr.analytic.sampler_gain`). Band 0 is the global brightness, the last band the finest detail.

:func:`named_sigmas` builds the lists of ComfyUI's schedulers on SD's schedule (``karras``, ``exponential``,
``simple``, ``sgm_uniform``, ``beta``) and of this package's defaults (``logsnr``; ``logsnr_warped``, UniPC's);
formulas from Karras et al. 2022 (eq. 5, ``rho = 7``), k-diffusion's ``get_sigmas_exponential`` and ComfyUI's
``comfy/samplers.py``.
"""

from __future__ import annotations

import math

import torch

from .analytic import AnalyticModel, flow_levels, image_like_band_stds, image_like_gaussian, sampler_gain, vp_levels
from .schedule import FlowPath, VPSchedule
from .spacing import flow_logsnr_grid, logsnr_grid

SCHEDULER_NAMES = ("karras", "exponential", "simple", "sgm_uniform", "beta", "logsnr", "logsnr_warped")
#: our DPM-Solver++(2M), UniPC (its default: order 3) and Euler
SAMPLERS = ("dpmpp_2m", "unipc", "euler")
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def sd_schedule(zero_terminal_snr: bool) -> VPSchedule:
    return VPSchedule.from_config(**SD_SCHEDULE, rescale_betas_zero_snr=zero_terminal_snr)


def _ve(schedule: VPSchedule, t: torch.Tensor) -> torch.Tensor:
    """``sigma/alpha`` at (fractional) timesteps ``t`` (``inf`` at SNR 0)."""
    alpha = schedule.alpha(t.double())
    return torch.where(alpha == 0, torch.full_like(alpha, math.inf), (1 - alpha**2).sqrt() / alpha)


def named_sigmas(name: str, steps: int, path: str = "vp", zero_terminal_snr: bool = True,
                 shift: float = 3.0) -> list[float]:
    """The noise levels scheduler ``name`` gives for ``steps`` model evaluations, with a final 0.

    VP: on SD's schedule (rescaled to zero terminal SNR when asked; then the list starts at ``inf`` and the
    formula runs from the last finite level, as :mod:`diffusers_ztsnr.spacing` does). Flow: flow times of the
    ``shift``-ed path, ``s = 1`` first."""
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULER_NAMES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if path == "flow":
        levels = _flow_levels(name, steps, shift)
    else:
        levels = _vp_levels(name, steps, sd_schedule(zero_terminal_snr))
    return [*(float(v) for v in levels), 0.0]


def _formula(name: str, count: int, high: float, low: float, table: torch.Tensor, to_level) -> torch.Tensor:
    """``count`` levels from ``high`` down to ``low``: ``table`` is the levels at timesteps ``0 .. T-1`` and
    ``to_level`` maps fractional timesteps to levels (for the timestep-based schedulers)."""
    T = len(table)
    ramp = torch.linspace(0, 1, count, dtype=torch.float64)
    if name == "karras":
        rho = 7.0
        return (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho
    if name == "exponential":
        return torch.exp(math.log(high) + ramp * (math.log(low) - math.log(high)))
    if name == "simple":  # every (T / count)-th level of the table, noisiest first
        return torch.stack([table[-(1 + int(i * T / count))] for i in range(count)])
    if name == "sgm_uniform":
        return to_level(torch.linspace(T - 1, 0, count + 1, dtype=torch.float64)[:-1])
    if name == "beta":
        try:
            from scipy.stats import beta
        except ImportError as error:
            raise ImportError("the beta scheduler needs scipy: pip install scipy") from error
        ts = torch.as_tensor(beta.ppf(1 - ramp.numpy(), 0.6, 0.6) * (T - 1), dtype=torch.float64)
        return to_level(ts.unique_consecutive())
    raise AssertionError(name)


def _vp_levels(name: str, steps: int, schedule: VPSchedule) -> torch.Tensor:
    T = schedule.num_train_timesteps
    if name in ("logsnr", "logsnr_warped"):  # fractional, as the schedulers that take fractional timesteps sample it
        return _ve(schedule, logsnr_grid(schedule, steps, warped=name == "logsnr_warped"))
    table = _ve(schedule, torch.arange(T, dtype=torch.float64))
    zero_start = math.isinf(float(table[-1]))
    count, top = (steps - 1, T - 2) if zero_start else (steps, T - 1)
    if count == 0:
        return table[-1:]
    levels = _formula(name, count, float(table[top]), float(table[0]), table[: top + 1],
                      lambda t: _ve(schedule, t.clamp(0, top)))
    return torch.cat([table[-1:], levels]) if zero_start else levels


def _flow_levels(name: str, steps: int, shift: float) -> torch.Tensor:
    path, T = FlowPath().shifted(shift), 1000
    if name == "logsnr_warped":
        raise ValueError("logsnr_warped is a VP spacing; the flow path's own grid is logsnr")
    if name == "logsnr":
        return flow_logsnr_grid(path, steps, T)
    table = path.sigma(torch.arange(1, T + 1, dtype=torch.float64) / T)  # timesteps 1 .. T
    return _formula(name, steps, 1.0, float(table[0]), table, lambda t: path.sigma((t + 1) / T))


def grade(sigmas: list[float], path: str = "vp", zero_terminal_snr: bool = True, sampler: str = "dpmpp_2m",
          num_bands: int = 8) -> torch.Tensor:
    """Each band's ``log(output std / data std)`` after sampling the exact model on ``sigmas`` (see the module
    docstring for the units). 0 is exact; -0.1 is 10% too narrow."""
    from .schedulers import (
        ZTSNRDPMSolverMultistepScheduler,
        ZTSNREulerScheduler,
        ZTSNRFlowMatchScheduler,
        ZTSNRUniPCMultistepScheduler,
    )

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    data = image_like_gaussian(num_bands, dims=1)
    levels = [float(v) for v in sigmas]
    if levels and levels[-1] == 0:
        levels = levels[:-1]
    if path == "flow":
        if sampler == "unipc":
            raise ValueError("the flow path has no UniPC sampler here; use dpmpp_2m or euler")
        scheduler = ZTSNRFlowMatchScheduler(shift=1.0, solver_order=2 if sampler == "dpmpp_2m" else 1)
        model = AnalyticModel(data, flow_levels(), "flow_prediction")
    else:
        cls = {"dpmpp_2m": ZTSNRDPMSolverMultistepScheduler, "unipc": ZTSNRUniPCMultistepScheduler,
               "euler": ZTSNREulerScheduler}[sampler]
        scheduler = cls(**SD_SCHEDULE, prediction_type="v_prediction", rescale_betas_zero_snr=zero_terminal_snr)
        model = AnalyticModel(data, vp_levels(scheduler.schedule.alphas_cumprod), "v_prediction")
    gain = sampler_gain(scheduler, model, sigmas=levels)
    return (gain.abs() / image_like_band_stds(num_bands)).log()
