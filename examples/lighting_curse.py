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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.training.objectives import (
    check_objective_config,
    diffusion_loss,
    noisy_latents,
    sample_timesteps,
    training_target,
)

# the data, the samplers and the report are sibling modules: importable however this file is run or loaded
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lighting_curse_report import conclusion, report_text, save_figures  # noqa: E402
from lighting_curse_setup import (  # noqa: E402
    BRIGHTNESS_RANGE,
    MODELS,
    SAMPLERS,
    SD_SCHEDULE,
    brightness,
    brightness_stats,
    make_dataset,
    make_scheduler,
    sampler_label,
)


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


def _train_and_sample(args: argparse.Namespace, settings: Settings, data: torch.Tensor, data_b: np.ndarray,
                      data_stats: dict[str, float]) -> tuple[dict, dict, dict, dict]:
    """Train each model variant, sample it with each sampler from the same noise. Returns the runs' statistics,
    the generated brightness values, the training logs and the natural samplers' images, each keyed by run."""
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
    return runs, generated, training, samples


def _run(args: argparse.Namespace, settings: Settings, out: Path) -> dict:
    start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    print(f"lighting curse ({mode}): {settings}")
    images, levels = make_dataset(settings.num_images, settings.size, seed=args.seed)
    data_b = brightness(images)
    data = torch.from_numpy(images) * 2 - 1
    data_stats = brightness_stats(data_b)
    runs, generated, training, samples = _train_and_sample(args, settings, data, data_b, data_stats)
    grids = save_figures(out, torch.from_numpy(images[: settings.num_samples]), samples, data_b, generated,
                         settings.sample_steps)

    lines, verdict = conclusion(runs, data_stats)
    runtime = time.perf_counter() - start
    text = report_text(mode, args.seed, settings, data_stats, runs, lines, runtime)
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
