"""The "uniform lighting curse" with trained models: SD's schedule + epsilon against ZTSNR + v-prediction.

Run::

    python examples/lighting_curse.py [--quick] [--output_dir DIR] [--seed S]

Two small pixel-space ``diffusers.UNet2DModel`` are trained from scratch, with the same data, batches, noise,
timesteps, initial weights, optimiser and step budget, on synthetic RGB images whose mean brightness is
uniform from near black to near white (each image: a brightness level plus a gradient, a coloured shape or
stripes, and texture, scaled so that no pixel clips and the image mean is exactly the level):

(a) Stable Diffusion's default schedule (``scaled_linear`` 0.00085..0.012, 1000 steps), epsilon prediction;
(b) the same schedule after the zero-terminal-SNR rescale (Lin et al. 2023), v-prediction.

Each model is then sampled from the same initial noise with its *natural* sampler (a: diffusers' DDIM with
SD1.5's ``leading`` spacing, ``steps_offset=1``, ``set_alpha_to_one=False``; b: DDIM with ``trailing``
spacing, Lin et al.'s recipe) and with *ours* (``ZTSNRDPMSolverMultistepScheduler`` with its defaults, the
``logsnr`` spacing; for a on its own, non-ZTSNR schedule). The per-image mean brightness of the samples
(pixels mapped to [0, 1]) is compared with the data's: mean, std, 5th / 95th percentile, the std ratio and
the 1-Wasserstein distance between the two brightness distributions.

Why (a) should collapse: at SD's last training step ``alpha_T**2 = 0.0047`` and the brightness direction of
an image of ``N`` values (the normalised all-ones vector) has data variance ``lam = N * 4 var(b)`` in model
units ([-1, 1]; ``lam * alpha_T**2 = 4.2`` at 32x32x3 here), so the noisy input still shows the brightness and
the model learns to read it from there. Sampling starts from pure noise, whose brightness coordinate is
N(0, 1), so an exact model maps it to a brightness with std ``1 / sqrt(alpha_start**2 * lam + sigma_start**2)``
of the data's (Gaussian approximation; the table's note gives it per row, see :func:`exact_model_prediction`).
(b) starts at SNR 0, where training and sampling agree.

Outputs in ``--output_dir`` (default ``lighting_curse_out``): ``lighting_curse.md`` (the table and the
conclusion, also printed), ``results.json``, ``brightness_hist.png``, ``samples_a.png``, ``samples_b.png``,
``samples_data.png`` and ``log_snr.png``. The full run (32x32) takes about 7-8 minutes on 2 idle CPU cores;
``--quick`` (16x16, tiny model, one thread) about 35-40 s. ``main(argv)`` returns the results dict
(what ``results.json`` holds).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.schedulers import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.training.objectives import (
    check_objective_config,
    diffusion_loss,
    noisy_latents,
    sample_timesteps,
    training_target,
)

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


@dataclass(frozen=True)
class Settings:
    size: int  # image side (pixels)
    channels: tuple[int, ...]  # UNet block widths
    num_images: int  # dataset size
    train_steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    ema_decay: float
    num_samples: int  # generated images per (model, sampler)
    sample_steps: int
    sample_batch: int


FULL = Settings(size=32, channels=(16, 32, 64), num_images=4096, train_steps=900, batch_size=16,
                learning_rate=4e-3, warmup_steps=50, ema_decay=0.995, num_samples=256, sample_steps=25,
                sample_batch=128)
QUICK = Settings(size=16, channels=(16, 16), num_images=1024, train_steps=160, batch_size=32, learning_rate=4e-3,
                 warmup_steps=16, ema_decay=0.98, num_samples=64, sample_steps=25, sample_batch=64)


# --- data ------------------------------------------------------------------------------------------------


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


# --- models, training, sampling ------------------------------------------------------------------------------


def build_model(settings: Settings) -> UNet2DModel:
    n = len(settings.channels)
    return UNet2DModel(
        sample_size=settings.size, in_channels=3, out_channels=3, block_out_channels=settings.channels,
        layers_per_block=1, down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        norm_num_groups=8,
    )


def train(
    data: torch.Tensor, schedule: VPSchedule, prediction_type: str, settings: Settings, seed: int, log=print
) -> tuple[UNet2DModel, dict]:
    """Train a fresh model; ``data`` in model units ([-1, 1]). Everything random comes from ``seed``, so two
    calls differ only in ``schedule`` and ``prediction_type``. Returns the EMA model and a training log."""
    check_objective_config(prediction_type, schedule.is_zero_terminal_snr)
    torch.manual_seed(seed)
    model = build_model(settings)
    ema = build_model(settings)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.train_steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(settings.train_steps):
        x0 = data[torch.randint(len(data), (settings.batch_size,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(settings.batch_size, schedule, generator=gen)
        alpha, sigma = schedule.alpha_sigma(t)
        x_t = noisy_latents(x0, noise, alpha, sigma)
        target = training_target(x0, noise, alpha, sigma, prediction_type).float()
        loss = diffusion_loss(model(x_t, t).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, settings.train_steps // 5) == 0:
            log(f"  step {step + 1}/{settings.train_steps}  loss {np.mean(losses[-50:]):.4f}  "
                f"({time.perf_counter() - start:.0f} s)")
    ema.eval()
    tail = max(1, len(losses) // 10)
    return ema, {"final_loss": float(np.mean(losses[-tail:])), "seconds": time.perf_counter() - start}


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


@torch.no_grad()
def generate(model: UNet2DModel, scheduler, noise: torch.Tensor, steps: int, batch: int) -> torch.Tensor:
    """Run the sampler from ``noise`` (model units); returns images in [0, 1] (clipped, as when saved)."""
    out = []
    for chunk in noise.split(batch):
        scheduler.set_timesteps(steps)
        x = chunk.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
        out.append(((x + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def exact_model_prediction(scheduler, steps: int, num_values: int, brightness_var01: float) -> dict:
    """Brightness-std ratio an exact model would give with this sampler, Gaussian approximation.

    In model units ([-1, 1]) the brightness coordinate (the image projected on the normalised all-ones vector)
    has data variance ``lam = N * 4 var(b)``. Sampling starts from N(0, 1) in that coordinate at the first
    grid level ``(alpha, sigma)``, where the training marginal has variance ``alpha**2 lam + sigma**2``; the
    exact ODE after it scales the coordinate by ``sqrt(lam / (alpha**2 lam + sigma**2))``, so the ratio is
    ``1 / sqrt(alpha**2 lam + sigma**2)``. A zero-SNR start (``alpha = 0``) matches training; its first step
    predicts the data mean and lands at ``(alpha1, sigma1)`` with variance ``sigma1**2`` instead of
    ``alpha1**2 lam + sigma1**2``, a ratio ``sigma1 / sqrt(alpha1**2 lam + sigma1**2)`` (about 1 when the next
    grid point is still almost pure noise, as in the logsnr spacing; less after trailing's larger first step).
    """
    scheduler.set_timesteps(steps)
    t0, t1 = (float(v) for v in scheduler.timesteps[:2])
    cfg = scheduler.config
    schedule = VPSchedule.from_config(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                      rescale_betas_zero_snr=cfg.rescale_betas_zero_snr)
    lam = num_values * 4 * brightness_var01
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(t0))
    if alpha > 0:
        ratio = 1 / math.sqrt(alpha**2 * lam + sigma**2)
    else:
        alpha1, sigma1 = (float(v) for v in schedule.alpha_sigma(t1))
        ratio = sigma1 / math.sqrt(alpha1**2 * lam + sigma1**2)
    return {"start_timestep": int(round(t0)), "second_timestep": int(round(t1)), "start_alpha": alpha,
            "exact_model_std_ratio": ratio}


# --- figures -------------------------------------------------------------------------------------------------


def save_grid(images01: torch.Tensor, path: Path, columns: int = 8, scale: int = 2) -> None:
    from PIL import Image

    images = (images01[: columns * columns].clamp(0, 1) * 255).round().to(torch.uint8)
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    pad = 2
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = (
            img.permute(1, 2, 0).numpy()
        )
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(data_b: np.ndarray, generated: dict[str, np.ndarray], path: Path) -> None:
    plt = _pyplot()
    bins = np.linspace(0, 1, 31)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, sampler in zip(axes, SAMPLERS, strict=True):
        ax.hist(data_b, bins=bins, density=True, color="0.75", label="data")
        for name, colour in (("a", "tab:red"), ("b", "tab:blue")):
            ax.hist(generated[f"{name}_{sampler}"], bins=bins, density=True, histtype="step", lw=2, color=colour,
                    label=MODELS[name][0])
        ax.set_title(SAMPLERS[sampler].split(",")[0] if sampler == "natural" else "ours: DPM++2M, logsnr",
                     fontsize=9)
        ax.set_xlabel("per-image mean brightness")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_log_snr(path: Path, steps: int) -> dict[str, list[int]]:
    """log-SNR against t for SD's schedule and its ZTSNR rescale, with the grids at ``steps`` steps marked.

    Returns the marked grids."""
    plt = _pyplot()
    default = VPSchedule.from_config(**SD_SCHEDULE)
    ztsnr = default.zero_terminal_snr()
    t = torch.arange(1000, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grids = {
            "leading (SD1.5, steps_offset=1)": (default, _grid(make_scheduler("a", "natural"), steps), "v", "tab:red"),
            "logsnr (ours), default schedule": (default, _grid(make_scheduler("a", "ours"), steps), "x", "tab:orange"),
            "trailing (Lin et al.)": (ztsnr, _grid(make_scheduler("b", "natural"), steps), "o", "tab:blue"),
            "logsnr (ours), ZTSNR schedule": (ztsnr, _grid(make_scheduler("b", "ours"), steps), "+", "tab:green"),
        }
    floor = float(ztsnr.log_snr(998)) - 1.5  # where the -inf of the ZTSNR schedule is drawn
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(t, default.log_snr(t), color="tab:red", lw=1.2, label="SD default (scaled_linear)")
    z = ztsnr.log_snr(t).clamp(min=floor)
    ax.plot(t, z, color="tab:blue", lw=1.2, label="ZTSNR-rescaled")
    for label, (schedule, grid, marker, colour) in grids.items():
        y = schedule.log_snr(torch.tensor(grid, dtype=torch.float64)).clamp(min=floor)
        ax.plot(grid, y, ls="none", marker=marker, ms=6, mfc="none" if marker in "ov" else colour, color=colour,
                label=f"{label}: t = {grid[0]}, {grid[1]}, ..., {grid[-1]}")
    ax.annotate("log-SNR = -inf at t = 999", (999, floor), xytext=(640, floor + 0.3), fontsize=8,
                arrowprops=dict(arrowstyle="->", lw=0.8))
    ax.set_xlabel("training timestep t")
    ax.set_ylabel("log SNR = log(alpha^2 / sigma^2)")
    ax.set_title(f"SD schedule vs its ZTSNR rescale; timesteps of each spacing at {steps} steps", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {label: grid for label, (_, grid, _, _) in grids.items()}


def _grid(scheduler, steps: int) -> list[int]:
    scheduler.set_timesteps(steps)
    return [int(round(float(v))) for v in scheduler.timesteps]


# --- report --------------------------------------------------------------------------------------------------


def conclusion(runs: dict[str, dict], data_stats: dict[str, float]) -> tuple[list[str], dict[str, bool]]:
    """Verdict lines computed from the numbers. (b) beats (a) for a sampler setting when its brightness-std
    ratio is closer to 1 (in log) *and* its W1 distance to the data's brightness distribution is smaller."""
    lines, verdict = [], {}
    for sampler in SAMPLERS:
        a, b = runs[f"a_{sampler}"], runs[f"b_{sampler}"]
        err_a, err_b = abs(math.log(a["std_ratio"])), abs(math.log(b["std_ratio"]))
        better = err_b < err_a and b["w1"] < a["w1"]
        verdict[f"b_beats_a_{sampler}"] = better
        name = "natural samplers" if sampler == "natural" else "our sampler"
        exact = (f"an exact model would give {a['exact_model_std_ratio']:.2f}x (a) and "
                 f"{b['exact_model_std_ratio']:.2f}x (b)")
        if better:
            lines.append(
                f"- {name}: (b) beats (a). Brightness std {b['std_ratio']:.2f}x the data's for (b) against "
                f"{a['std_ratio']:.2f}x for (a) ({exact}); 5-95% range {b['p5']:.2f}..{b['p95']:.2f} (b) vs "
                f"{a['p5']:.2f}..{a['p95']:.2f} (a) vs {data_stats['p5']:.2f}..{data_stats['p95']:.2f} (data); "
                f"W1 distance to the data {b['w1']:.3f} (b) vs {a['w1']:.3f} (a)."
            )
        else:
            why = []
            if b["std_ratio"] < 0.85:
                why.append(f"(b)'s brightness spread also shrank ({b['std_ratio']:.2f}x"
                           + (f"; its first step alone explains {b['exact_model_std_ratio']:.2f}x"
                              if b["exact_model_std_ratio"] < 0.95 else "")
                           + "): the model has not learned to resolve global brightness in the first, high-noise "
                           "steps within this budget")
            if abs(math.log(b["std_ratio"])) < abs(math.log(a["std_ratio"])) and b["w1"] >= a["w1"]:
                why.append(f"(b)'s spread is closer to the data's but its mean is off ({b['mean']:.3f} vs "
                           f"{data_stats['mean']:.3f}), so its W1 distance is not smaller")
            if a["std_ratio"] > 0.85:
                why.append(f"(a) did not collapse ({a['std_ratio']:.2f}x; {exact}): at this image size the "
                           "terminal-SNR leak is weak, or the model has not learned to read brightness from it")
            if not why:
                why.append("the two are within the sampling error of this number of samples")
            lines.append(
                f"- {name}: (b) does NOT beat (a) on both the std ratio and the W1 distance (std ratio "
                f"{b['std_ratio']:.2f} vs {a['std_ratio']:.2f}, W1 {b['w1']:.3f} vs {a['w1']:.3f}); "
                + "; ".join(why) + "."
            )
    return lines, verdict


def markdown_table(data_stats: dict, runs: dict[str, dict]) -> str:
    head = ("| model | sampler | mean | std | p5 | p95 | std / data std | W1 to data |\n"
            "|---|---|---|---|---|---|---|---|\n")
    rows = [f"| data | - | {data_stats['mean']:.3f} | {data_stats['std']:.3f} | {data_stats['p5']:.3f} | "
            f"{data_stats['p95']:.3f} | 1.000 | 0.000 |"]
    for key in (f"{m}_{sampler}" for sampler in SAMPLERS for m in MODELS):
        run = runs[key]
        rows.append(f"| {run['model']} | {run['sampler']} | {run['mean']:.3f} | {run['std']:.3f} | {run['p5']:.3f} | "
                    f"{run['p95']:.3f} | {run['std_ratio']:.3f} | {run['w1']:.3f} |")
    return head + "\n".join(rows)


def sampler_label(model_name: str, sampler: str, steps: int) -> str:
    if sampler == "ours":
        return f"ours: DPM++2M, logsnr, {steps} steps"
    if model_name == "a":
        return f"DDIM leading, steps_offset=1 (SD1.5), {steps} steps"
    return f"DDIM trailing (Lin et al.), {steps} steps"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16x16, tiny model, few hundred steps (< 1 minute)")
    parser.add_argument("--output_dir", default="lighting_curse_out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 2, 1 with --quick: the tiny model gains nothing from a "
                        "second thread, and on a busy 2-core machine OpenMP spin-waits make 2 many times slower)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    try:
        return _run(args, settings, out)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, settings: Settings, out: Path) -> dict:
    start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    print(f"lighting curse ({mode}): {settings}")
    images, levels = make_dataset(settings.num_images, settings.size, seed=args.seed)
    data_b = brightness(images)
    data = torch.from_numpy(images) * 2 - 1
    data_stats = brightness_stats(data_b)
    num_values = 3 * settings.size**2

    noise = torch.randn((settings.num_samples, 3, settings.size, settings.size),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    runs, generated, training, samples = {}, {}, {}, {}
    for name, (label, ztsnr, prediction_type) in MODELS.items():
        print(f"training {label}")
        schedule = VPSchedule.from_config(**SD_SCHEDULE, rescale_betas_zero_snr=ztsnr)
        model, log = train(data, schedule, prediction_type, settings, args.seed)
        training[name] = log
        for sampler in SAMPLERS:
            scheduler = make_scheduler(name, sampler)
            images01 = generate(model, scheduler, noise, settings.sample_steps, settings.sample_batch)
            key = f"{name}_{sampler}"
            generated[key] = brightness(images01)
            runs[key] = {
                "model": label, "sampler": sampler_label(name, sampler, settings.sample_steps),
                **brightness_stats(generated[key], data_b),
                **exact_model_prediction(scheduler, settings.sample_steps, num_values, data_stats["std"] ** 2),
            }
            if sampler == "natural":
                samples[name] = images01
            print(f"  {key}: brightness std ratio {runs[key]['std_ratio']:.3f} (exact-model prediction "
                  f"{runs[key]['exact_model_std_ratio']:.3f})")

    save_grid(torch.from_numpy(images[: settings.num_samples]), out / "samples_data.png")
    save_grid(samples["a"], out / "samples_a.png")
    save_grid(samples["b"], out / "samples_b.png")
    plot_histograms(data_b, generated, out / "brightness_hist.png")
    grids = plot_log_snr(out / "log_snr.png", settings.sample_steps)

    lines, verdict = conclusion(runs, data_stats)
    table = markdown_table(data_stats, runs)
    runtime = time.perf_counter() - start
    text = (
        f"# Uniform lighting curse, trained ({mode} mode, seed {args.seed})\n\n"
        f"{settings.num_images} synthetic {settings.size}x{settings.size} RGB images, brightness uniform on "
        f"{BRIGHTNESS_RANGE[0]}..{BRIGHTNESS_RANGE[1]}; UNet2DModel {settings.channels}, "
        f"{settings.train_steps} AdamW steps of batch {settings.batch_size} per model; "
        f"{settings.num_samples} samples per row from the same noise. Per-image mean brightness, pixels in [0, 1].\n\n"
        f"{table}\n\n"
        "Std ratio an exact model would give (Gaussian approximation, from the first two sampled timesteps): "
        + ", ".join(f"{k} {v['exact_model_std_ratio']:.2f} (t = {v['start_timestep']}, {v['second_timestep']})"
                    for k, v in runs.items())
        + ".\n\n" + "\n".join(lines) + f"\n\nRuntime {runtime:.0f} s ({torch.get_num_threads()} threads).\n"
    )
    print()
    print(text)
    (out / "lighting_curse.md").write_text(text, encoding="utf-8")
    results = {
        "mode": mode, "seed": args.seed, "settings": asdict(settings), "runtime_s": runtime,
        "threads": torch.get_num_threads(), "data": data_stats,
        "data_generator": {"brightness_range": list(BRIGHTNESS_RANGE), "levels_std": float(np.std(levels))},
        "runs": runs, "training": training, "grids": grids, "conclusion": lines, **verdict,
        "files": sorted({p.name for p in out.iterdir() if p.suffix in (".md", ".png")} | {"results.json"}),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
