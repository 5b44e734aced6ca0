"""What ``examples/lighting_curse.py`` and its report share: SD's schedule, the model variants and samplers, the
synthetic data and the per-image brightness statistics."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDIMScheduler

from diffusers_ztsnr.schedulers import ZTSNRDPMSolverMultistepScheduler

#: Stable Diffusion 1.x / 2.x / XL's training schedule (diffusers config keys)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
#: per-image brightness levels are uniform on this interval (pixels in [0, 1])
BRIGHTNESS_RANGE = (0.04, 0.96)
#: the model variants: name -> (label, ZTSNR rescale, prediction type)
MODELS = {
    "a": ("(a) SD default schedule, epsilon", False, "epsilon"),
    "b": ("(b) ZTSNR-rescaled, v-prediction", True, "v_prediction"),
}
#: sampler settings: name -> label
SAMPLERS = {
    "natural": "natural: DDIM, a: leading + steps_offset=1 (SD1.5), b: trailing (Lin et al.)",
    "ours": "ours: ZTSNRDPMSolverMultistepScheduler defaults (DPM++2M, logsnr spacing)",
}


def make_dataset(num_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(images, levels)``: float32 images ``[n, 3, size, size]`` in [0, 1] and their mean brightness.

    Each image is ``level + amplitude * structure`` where ``structure`` (per pixel and channel) is a linear
    gradient in a random direction with a random tint, plus a coloured disc or square or coloured stripes, plus
    Gaussian texture, made exactly zero-mean and scaled into [-1, 1]; ``amplitude = 0.9 * min(level, 1 -
    level)``. So no pixel clips and each image's mean brightness (over pixels and channels) equals its
    ``level``, drawn uniformly from :data:`BRIGHTNESS_RANGE`. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    levels = rng.uniform(*BRIGHTNESS_RANGE, size=num_images)
    images = np.empty((num_images, 3, size, size), dtype=np.float64)
    for i, level in enumerate(levels):
        theta = rng.uniform(0, 2 * math.pi)
        gradient = np.cos(theta) * xx + np.sin(theta) * yy
        structure = rng.uniform(0.3, 1.0) * gradient[None] * rng.uniform(0.3, 1.0, size=(3, 1, 1))
        kind = rng.integers(3)
        cy, cx = rng.uniform(-0.45, 0.45, size=2)
        radius = rng.uniform(0.25, 0.55)
        if kind == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        elif kind == 1:
            mask = (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < radius)
        else:
            phi = rng.uniform(0, 2 * math.pi)
            mask = np.sin(rng.uniform(4, 9) * (np.cos(phi) * xx + np.sin(phi) * yy) + rng.uniform(0, 6)) > 0.2
        colour = rng.uniform(-1.0, 1.0, size=(3, 1, 1))
        structure = structure + 1.5 * mask[None] * colour
        structure = structure + rng.normal(0.0, 0.15, size=structure.shape)
        structure -= structure.mean()
        structure /= max(float(np.abs(structure).max()), 1e-12)
        images[i] = level + 0.9 * min(level, 1 - level) * structure
    return images.astype(np.float32), images.mean(axis=(1, 2, 3))


def brightness(images01: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-image mean brightness of images in [0, 1], ``[n, C, H, W]`` -> ``[n]``."""
    if isinstance(images01, torch.Tensor):
        images01 = images01.detach().cpu().double().numpy()
    return np.asarray(images01, dtype=np.float64).mean(axis=(1, 2, 3))


def brightness_stats(values: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    stats = {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "p5": float(np.percentile(values, 5)),
        "p95": float(np.percentile(values, 95)),
    }
    if reference is not None:
        stats["std_ratio"] = stats["std"] / float(np.std(reference))
        stats["w1"] = wasserstein1(values, reference)
    return stats


def wasserstein1(x: np.ndarray, y: np.ndarray) -> float:
    """1-Wasserstein distance between two 1-D empirical distributions (integral of |F_x^-1 - F_y^-1|)."""
    q = (np.arange(2048) + 0.5) / 2048
    return float(np.mean(np.abs(np.quantile(x, q) - np.quantile(y, q))))


def make_scheduler(model_name: str, sampler: str):
    """The scheduler a model is sampled with: its natural diffusers DDIM, or ours with its defaults."""
    _, ztsnr, prediction_type = MODELS[model_name]
    if sampler == "natural":
        if ztsnr:  # Lin et al. 2023: rescaled schedule, v-prediction, trailing spacing
            return DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, rescale_betas_zero_snr=True,
                                 timestep_spacing="trailing", clip_sample=False)
        # SD1.5's scheduler config, sampled with DDIM as SD1.5 users do
        return DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, timestep_spacing="leading",
                             steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return ZTSNRDPMSolverMultistepScheduler(**SD_SCHEDULE, prediction_type=prediction_type,
                                            rescale_betas_zero_snr=ztsnr)


def sampler_label(model_name: str, sampler: str, steps: int) -> str:
    if sampler == "ours":
        return f"ours: DPM++2M, logsnr, {steps} steps"
    if model_name == "a":
        return f"DDIM leading, steps_offset=1 (SD1.5), {steps} steps"
    return f"DDIM trailing (Lin et al.), {steps} steps"
