"""Did an epsilon -> v-prediction + zero-terminal-SNR conversion take? Two measurements and a verdict.

1. **x0 at the first step.** Sampling starts from pure noise. At SNR 0 the exact x0 prediction is the mean image
   for the prompt, so it cannot depend on which noise was drawn; an unconverted model's x0 at its first step (SNR
   0.0047 for SD's schedule, ``x0 = (x - sigma * eps_hat) / alpha``) follows the noise. Per prompt the probe draws
   ``draws`` noises, takes the UNet's prediction at the scheduler's first timestep as x0
   (:func:`~diffusers_ztsnr.parameterization.predicted_x0`), and reports its spread across draws (std per latent
   element, averaged) and its **noise share**: the part of the prediction's energy that changes with the draw
   (``mean Var_draws(x0) / mean E_draws[x0**2]``; 0 for a prediction that ignores the noise, about 1 for one that
   follows it). Being a ratio, it compares models of different parameterizations and schedules.
2. **Brightness range.** Images generated for prompts asking for dark, mid and bright scenes: the range of their
   mean brightness against the range the training data spans (5th to 95th percentile of per-image brightness).

Verdict: **converted** when the converted model's noise share is below 10% of the unconverted base's and (given the
data) its brightness range covers at least 80% of the data's. SD 1.x / 2.x pipelines (one CLIP text encoder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .parameterization import predicted_x0
from .schedule import VPSchedule

DEFAULT_PROMPTS = ("a dark scene at night", "a scene in grey light", "a bright scene in daylight")
NOISE_SHARE_RATIO = 0.10
BRIGHTNESS_COVERAGE = 0.80


@dataclass
class ProbeResult:
    """Per prompt: x0 spread and noise share at the first step, and the mean brightness of generated images."""

    x0_spread: dict[str, float]
    noise_share: dict[str, float]
    brightness: dict[str, float]

    @property
    def mean_noise_share(self) -> float:
        return float(np.mean(list(self.noise_share.values())))

    @property
    def brightness_range(self) -> float:
        values = list(self.brightness.values())
        return float(max(values) - min(values)) if values else 0.0


@torch.no_grad()
def first_step_x0(pipe, prompt: str, draws: int = 8, resolution: int = 64, seed: int = 0) -> tuple[float, float]:
    """``(spread, noise share)`` of the UNet's x0 prediction at the scheduler's first timestep over ``draws``
    noises (the conditional prediction, no guidance)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    schedule = VPSchedule.from_scheduler_config(dict(scheduler.config))
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor([float(t)], dtype=torch.float64)))
    embeds = pipe.encode_prompt(prompt, pipe.device, 1, do_classifier_free_guidance=False)[0]
    size = resolution // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(draws, pipe.unet.config.in_channels, size, size, generator=generator)
    latents = latents.to(pipe.device, pipe.unet.dtype) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    output = pipe.unet(latents, t, embeds.expand(draws, -1, -1)).sample
    x0 = predicted_x0(output, latents, alpha, sigma, scheduler.config.prediction_type).double()
    variance = x0.var(dim=0, unbiased=False)
    return float(variance.sqrt().mean()), float(variance.mean() / x0.pow(2).mean().clamp(min=1e-30))


def generated_brightness(pipe, prompt: str, images: int = 2, resolution: int = 64, steps: int = 20,
                         seed: int = 0, **call_kwargs) -> float:
    """Mean brightness (0 black, 1 white) of ``images`` images generated for ``prompt``."""
    generator = torch.Generator().manual_seed(seed)
    out = pipe([prompt] * images, num_inference_steps=steps, height=resolution, width=resolution,
               generator=generator, output_type="np", **call_kwargs).images
    return float(np.asarray(out, dtype=np.float64).mean())


def data_brightness_range(folder: str | Path, low: float = 5, high: float = 95) -> float:
    """The ``low``-to-``high`` percentile range of the per-image mean brightness of the images in ``folder``."""
    from PIL import Image

    paths = [p for p in sorted(Path(folder).rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    if not paths:
        raise ValueError(f"--data {folder}: no .png / .jpg / .jpeg / .webp images in it")
    values = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64).mean() / 255 for p in paths]
    return float(np.percentile(values, high) - np.percentile(values, low))


def probe(pipe, prompts: tuple[str, ...] = DEFAULT_PROMPTS, draws: int = 8, resolution: int = 64, steps: int = 20,
          images: int = 2, seed: int = 0, **call_kwargs) -> ProbeResult:
    """Both measurements of :mod:`this module <diffusers_ztsnr.probe>` for ``pipe`` as configured (its scheduler
    included)."""
    spread, share, bright = {}, {}, {}
    for prompt in prompts:
        spread[prompt], share[prompt] = first_step_x0(pipe, prompt, draws, resolution, seed)
        bright[prompt] = generated_brightness(pipe, prompt, images, resolution, steps, seed, **call_kwargs)
    return ProbeResult(spread, share, bright)


def verdict(converted: ProbeResult, base: ProbeResult, data_range: float | None = None) -> tuple[bool, list[str]]:
    """``(converted?, the lines that say why)``."""
    ratio = converted.mean_noise_share / max(base.mean_noise_share, 1e-30)
    lines = [f"x0 noise share at the first step: converted {converted.mean_noise_share:.3f}, base "
             f"{base.mean_noise_share:.3f} ({ratio:.1%} of the base's; converted needs < {NOISE_SHARE_RATIO:.0%})"]
    ok = ratio < NOISE_SHARE_RATIO
    if data_range is not None:
        coverage = converted.brightness_range / max(data_range, 1e-30)
        lines.append(f"generated brightness range: converted {converted.brightness_range:.3f}, base "
                     f"{base.brightness_range:.3f}, data {data_range:.3f} (converted covers {coverage:.0%}; needs "
                     f">= {BRIGHTNESS_COVERAGE:.0%})")
        ok = ok and coverage >= BRIGHTNESS_COVERAGE
    return ok, lines


@dataclass
class ConversionReport:
    """A base pipeline probed as it was and with a converted LoRA (and its scheduler) loaded: both results, the
    training data's brightness range (when given), the verdict and the lines that say why."""

    base: ProbeResult
    converted: ProbeResult
    data_range: float | None
    converted_ok: bool
    reasons: list[str]

    def lines(self) -> list[str]:
        """One line per prompt, the reasons, and the verdict: what ``diffusers-ztsnr probe-conversion`` prints."""
        out = [f"{prompt!r}: x0 spread base {self.base.x0_spread[prompt]:.3f} -> "
               f"{self.converted.x0_spread[prompt]:.3f}, noise share {self.base.noise_share[prompt]:.3f} -> "
               f"{self.converted.noise_share[prompt]:.3f}, brightness {self.base.brightness[prompt]:.3f} -> "
               f"{self.converted.brightness[prompt]:.3f}" for prompt in self.base.x0_spread]
        return [*out, *self.reasons, "verdict: converted" if self.converted_ok else "verdict: not converted"]

    def to_json(self) -> dict[str, Any]:
        return {"base": asdict(self.base), "converted": asdict(self.converted), "data_range": self.data_range,
                "converted_ok": self.converted_ok, "reasons": self.reasons}


def probe_conversion(pipe, lora_dir: str | Path, data: str | Path | None = None,
                     prompts: tuple[str, ...] = DEFAULT_PROMPTS, guidance_scale: float = 5.0,
                     **probe_kwargs: Any) -> ConversionReport:
    """Probe ``pipe`` (the unconverted base, with its own scheduler), then load the LoRA and the scheduler of the
    output folder ``lora_dir`` into it and probe again (images with ``guidance_rescale=0.7``, Lin et al.'s value
    for zero-terminal-SNR models). ``probe_kwargs``: :func:`probe`'s ``draws``, ``resolution``, ``steps``,
    ``images``, ``seed``. The pipeline keeps the LoRA and the scheduler afterwards."""
    from .schedulers import ZTSNRUniPCMultistepScheduler

    base = probe(pipe, prompts, guidance_scale=guidance_scale, **probe_kwargs)
    pipe.load_lora_weights(str(lora_dir))
    pipe.scheduler = ZTSNRUniPCMultistepScheduler.from_pretrained(str(lora_dir), subfolder="scheduler")
    converted = probe(pipe, prompts, guidance_scale=guidance_scale, guidance_rescale=0.7, **probe_kwargs)
    data_range = data_brightness_range(data) if data else None
    ok, reasons = verdict(converted, base, data_range)
    return ConversionReport(base, converted, data_range, ok, reasons)
