"""The figures and the written report of ``examples/lighting_curse.py``: sample grids, brightness histograms,
the log-SNR figure with each spacing's grid, the table and the verdict."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from lighting_curse_setup import BRIGHTNESS_RANGE, MODELS, SAMPLERS, SD_SCHEDULE, make_scheduler

from diffusers_ztsnr.schedule import VPSchedule

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


def save_figures(out: Path, data_images01: torch.Tensor, samples: dict[str, torch.Tensor], data_b: np.ndarray,
                 generated: dict[str, np.ndarray], steps: int) -> dict[str, list[int]]:
    """The sample grids (data, a, b), the brightness histograms and the log-SNR figure; returns its grids."""
    save_grid(data_images01, out / "samples_data.png")
    save_grid(samples["a"], out / "samples_a.png")
    save_grid(samples["b"], out / "samples_b.png")
    plot_histograms(data_b, generated, out / "brightness_hist.png")
    return plot_log_snr(out / "log_snr.png", steps)


def report_text(mode: str, seed: int, settings, data_stats: dict, runs: dict[str, dict], lines: list[str],
                runtime: float) -> str:
    """``lighting_curse.md``: the setup, the table, the exact-model ratios, the verdict and the runtime."""
    table = markdown_table(data_stats, runs)
    return (
        f"# Uniform lighting curse, trained ({mode} mode, seed {seed})\n\n"
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
