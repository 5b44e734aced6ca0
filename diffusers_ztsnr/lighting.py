"""The "uniform lighting curse" (Lin et al. 2023, §3.1) computed exactly, without training.

Why a 0.068 terminal ``alpha`` matters: in an orthonormal basis whose first vector is the image's global
mean (brightness), the data variance along that vector is ``N * s_b**2`` (``N`` pixels/latents, ``s_b`` the
per-image brightness std), while the noise variance is 1 along every vector. At SD's last training step
``alpha_T**2 * N * s_b**2`` is far above 1 (``0.0047 * 16384 * 0.25**2 = 4.8`` for a 64x64x4 latent): the noisy
input still shows the brightness, and the exact model reads it from there. Sampling starts from pure noise,
whose brightness coordinate is N(0, 1), so the exact probability-flow ODE maps it to brightness with std
``s_b * sqrt(N) / sqrt(alpha_T**2 * N * s_b**2 + sigma_T**2)`` -- collapsed toward medium grey. A zero-SNR
start removes the mismatch. Everything below uses the exact posterior mean of Gaussian data
(:mod:`diffusers_ztsnr.analytic`), so the numbers are the samplers', not a trained model's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .analytic import AnalyticModel, GaussianMixture, flow_levels, run_sampler, vp_levels
from .schedulers import ZTSNRDDIMScheduler, ZTSNRDPMSolverMultistepScheduler, ZTSNRFlowMatchScheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
#: the rows of the table: label -> scheduler factory and the parameterization of its exact model
CONFIGURATIONS = {
    "SD default, epsilon, leading (SD1.5 as shipped)": (
        lambda: ZTSNRDDIMScheduler(**SD, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                                   set_alpha_to_one=False), "epsilon"),
    "SD default, epsilon, trailing": (
        lambda: ZTSNRDDIMScheduler(**SD, prediction_type="epsilon", timestep_spacing="trailing"), "epsilon"),
    "ZTSNR, v, trailing (Lin et al.)": (
        lambda: ZTSNRDDIMScheduler(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   timestep_spacing="trailing"), "v_prediction"),
    "ZTSNR, v, our default (DPM++2M, logsnr)": (
        lambda: ZTSNRDPMSolverMultistepScheduler(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True),
        "v_prediction"),
    "flow matching (rectified flow, s = 1 start)": (lambda: ZTSNRFlowMatchScheduler(), "flow_prediction"),
}


@dataclass
class LightingRow:
    label: str
    ratios: dict[int, float]  # step count -> generated brightness std / data brightness std


def brightness_data(num_latents: int = 16384, brightness_std: float = 0.25, detail_dims: int = 3) -> GaussianMixture:
    """Gaussian data in the brightness-first orthonormal basis: variance ``N * s_b**2`` on coordinate 0."""
    variance = torch.ones(1 + detail_dims, dtype=torch.float64)
    variance[0] = num_latents * brightness_std**2
    return GaussianMixture.gaussian(torch.zeros_like(variance), variance)


def collapse_limit(alpha_start: float, sigma_start: float, data: GaussianMixture) -> float:
    """Closed-form brightness-std ratio of an exact ODE sampler started from N(0, I) at ``(alpha, sigma)``."""
    lam = float(data.variances[0, 0])
    return 1 / math.sqrt(alpha_start**2 * lam + sigma_start**2)


def lighting_table(step_counts=(5, 10, 25, 50), num_samples: int = 4000, data: GaussianMixture | None = None,
                   seed: int = 0) -> list[LightingRow]:
    data = data or brightness_data()
    data_std = float(data.variance[0].sqrt())
    rows = []
    for label, (factory, parameterization) in CONFIGURATIONS.items():
        ratios = {}
        for n in step_counts:
            scheduler = factory()
            levels = vp_levels(scheduler.schedule.alphas_cumprod) if scheduler.path == "vp" else flow_levels()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = run_sampler(scheduler, AnalyticModel(data, levels, parameterization), num_samples, n, seed=seed)
            ratios[n] = float(x[:, 0].std()) / data_std
        rows.append(LightingRow(label, ratios))
    return rows


def markdown(rows: list[LightingRow]) -> str:
    steps = list(rows[0].ratios)
    lines = ["| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
             "|---|" + "---|" * len(steps)]
    lines += [f"| {r.label} | " + " | ".join(f"{r.ratios[n]:.3f}" for n in steps) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[LightingRow], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(list(r.ratios), list(r.ratios.values()), "o-", label=r.label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("generated / data brightness std")
    ax.set_ylim(0, 1.15)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
