"""Shared helpers for the analytic-oracle tests: test data, scheduler factories, exact references."""

import torch

from diffusers_ztsnr import (
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
    ZTSNRUniPCMultistepScheduler,
)
from diffusers_ztsnr.analytic import AnalyticModel, GaussianMixture, flow_levels, vp_levels

# a brightness-like dimension with a non-zero mean, then a power-law of variances
MEAN = torch.tensor([0.5, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
VARIANCE = torch.tensor([1.0, 1.0, 0.5, 0.25, 0.12, 0.06, 0.04, 0.03], dtype=torch.float64)
GAUSSIAN = GaussianMixture.gaussian(MEAN, VARIANCE)

VP_ODE_CLASSES = [ZTSNRDDIMScheduler, ZTSNREulerScheduler, ZTSNRDPMSolverMultistepScheduler,
                  ZTSNRUniPCMultistepScheduler]
VP_CLASSES = [*VP_ODE_CLASSES, ZTSNREulerAncestralScheduler]
ALL_CLASSES = [*VP_CLASSES, ZTSNRFlowMatchScheduler]


def make_scheduler(cls, prediction_type: str, **kwargs):
    """A scheduler sampling ``prediction_type``; VP ones on the ZTSNR SD schedule unless epsilon."""
    if cls.path == "vp":
        kwargs.setdefault("rescale_betas_zero_snr", prediction_type != "epsilon")
    elif prediction_type == "epsilon":
        kwargs.setdefault("epsilon_zero_snr_clamp", 1e-3)
    return cls(prediction_type=prediction_type, **kwargs)


def model_for(scheduler, data: GaussianMixture, prediction_type: str) -> AnalyticModel:
    if scheduler.path == "vp":
        return AnalyticModel(data, vp_levels(scheduler.schedule.alphas_cumprod), prediction_type)
    return AnalyticModel(data, flow_levels(scheduler.config.num_train_timesteps), prediction_type)


def exact_deterministic_output(scheduler, z: torch.Tensor, data: GaussianMixture = GAUSSIAN) -> torch.Tensor:
    """What an ODE sampler converges to from latent ``z`` on ``scheduler``'s current grid: the exact flow
    from the first to the last grid level, then the last step to clean data: the posterior mean there (the
    first-order step, or a zero-length one), or, for a multistep sampler of order 2 or more extrapolating its last
    step to zero noise, the exact flow's own end."""
    first, last = tuple(scheduler._levels[0]), tuple(scheduler._levels[-2])
    x_last = data.ode_transport(z, first, last)
    extrapolates = (getattr(scheduler.config, "final_step", None) == "extrapolate"
                    and scheduler.config.get("solver_order", 1) >= 2 and scheduler._levels[-1][1] == 0)
    if extrapolates:
        return data.ode_transport(z, first, tuple(scheduler._levels[-1]))
    return data.posterior_mean(x_last, *last)


def quantile_latents(num: int, dim: int) -> torch.Tensor:
    """``num`` latents whose every coordinate runs through the ``(i + 1/2) / num`` quantiles of N(0, 1), in a
    different order per dimension: a stand-in for ``torch.randn(num, dim)`` that no seed changes (largest |z|:
    2.66 at ``num = 128``). An ODE sampler's error grows with |z|, so the max over random latents is as random
    as their most extreme coordinate."""
    q = torch.special.ndtri((torch.arange(num, dtype=torch.float64) + 0.5) / num)
    return torch.stack([q.roll(37 * d) for d in range(dim)], 1)


def deterministic_error(scheduler, prediction_type: str, n: int, data=GAUSSIAN, num=128, **kw) -> float:
    """Max |sample - exact| in units of the data std, over the ``num`` latents of :func:`quantile_latents`."""
    model = model_for(scheduler, data, prediction_type)
    z = quantile_latents(num, data.dim)
    scheduler.set_timesteps(n, **kw)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.expand(len(x)) if t.ndim == 0 else t)
        x = scheduler.step(out, t, x).prev_sample
    ref = exact_deterministic_output(scheduler, z, data)
    return float(((x - ref) / data.variance.sqrt()).abs().max())
