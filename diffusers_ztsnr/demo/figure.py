"""Before / after: the same prompts and seeds on the epsilon base (SD's schedule and sampler) and on the
v-prediction + zero-terminal-SNR LoRA (our scheduler), with the brightness spread of each against the data's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..imaging import tile_images
from .data import TONES, caption, mean_brightness

#: the (shape, colour) pairs drawn for every tone in the figure
FIGURE_SUBJECTS = (("disc", "red"), ("square", "blue"), ("disc", "yellow"), ("square", "green"))


@dataclass
class Side:
    """Generated images ``(n, 3, h, w)`` in [-1, 1], their prompts' tones, and the label of the side."""

    label: str
    images: torch.Tensor
    tones: list[str]

    @property
    def brightness(self) -> torch.Tensor:
        return mean_brightness(self.images)


def figure_prompts(images_per_prompt: int) -> tuple[list[str], list[str], list[int]]:
    """Prompts, their tones and the noise seed of each image: every subject on every tone, the same seeds."""
    prompts, tones, seeds = [], [], []
    for tone in TONES:
        for shape, color in FIGURE_SUBJECTS:
            for k in range(images_per_prompt):
                prompts.append(caption(shape, color, tone))
                tones.append(tone)
                seeds.append(k)
    return prompts, tones, seeds


def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, size: int,
           **kwargs) -> torch.Tensor:
    """One image per prompt, each from its own seeded generator (so both sides start from the same noise)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=generators, output_type="pt", **kwargs)
    return out.images * 2 - 1


def spread(brightness: torch.Tensor) -> float:
    """The brightness spread: the standard deviation of the per-image mean brightness."""
    return float(brightness.std())


def separation(brightness: torch.Tensor, tones: list[str]) -> float:
    """How far apart the lighting the prompts ask for comes out: mean brightness of the images whose prompt asks
    for a bright background minus that of those asking for a dark one."""
    def mean_of(tone: str) -> float:
        return float(brightness[[t == tone for t in tones]].mean())

    return mean_of("bright") - mean_of("dark")


def _shown(side: Side, per_subject: int) -> torch.Tensor:
    """The first ``per_subject`` seeds of every (tone, subject): a readable figure; the spread uses them all."""
    per_prompt = len(side.images) // (len(TONES) * len(FIGURE_SUBJECTS))
    keep = [i for i in range(len(side.images)) if i % per_prompt < per_subject]
    return side.images[keep]


def _strip(images: torch.Tensor, columns: int) -> np.ndarray:
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return tile_images(pixels, columns)


def draw_figure(before: Side, after: Side, data_brightness: torch.Tensor, data_tones: list[str], path: Path) -> Path:
    """Two image panels (before, after; one row per requested tone) and the per-image brightness of each side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_subject = min(2, len(before.images) // (len(TONES) * len(FIGURE_SUBJECTS)))
    columns = per_subject * len(FIGURE_SUBJECTS)
    data_spread = spread(data_brightness)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    for ax, side in zip(axes[:2], (before, after), strict=True):
        ax.imshow(_strip(_shown(side, per_subject), columns), interpolation="nearest")
        ratio = spread(side.brightness) / data_spread
        apart = separation(side.brightness, side.tones) / separation(data_brightness, data_tones)
        ax.set_title(f"{side.label}\nbrightness spread {ratio:.0%} of the data's, bright - dark prompts {apart:.0%}"
                     f" ({len(side.images)} images)", fontsize=9)
        size = side.images.shape[-1]
        ax.set_yticks([size * (i + 0.5) for i in range(len(TONES))], list(TONES))
        ax.set_ylabel("background the prompt asks for")
        ax.set_xticks([size * columns * (i + 0.5) / len(FIGURE_SUBJECTS) for i in range(len(FIGURE_SUBJECTS))],
                      [f"{color} {shape}" for shape, color in FIGURE_SUBJECTS], fontsize=8)
    ax = axes[2]
    groups = [("data", data_brightness, data_tones), (before.label.split(":")[0], before.brightness, before.tones),
              (after.label.split(":")[0], after.brightness, after.tones)]
    colors = {"dark": "#333333", "grey": "#888888", "bright": "#d9a400"}
    for x, (_, values, tones) in enumerate(groups):
        for tone in TONES:
            picked = values[[t == tone for t in tones]].numpy()
            jitter = np.linspace(-0.25, 0.25, len(picked)) if len(picked) > 1 else np.zeros(1)
            ax.scatter(x + jitter, picked, s=12, color=colors[tone], label=tone if x == 0 else None)
        ax.text(x, 1.04, f"spread {spread(values):.3f}", ha="center", fontsize=9)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylim(-0.22, 1.1)  # room below 0 for the legend, clear of the points
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("mean brightness of each image (0 black, 1 white)")
    ax.legend(title="prompt asks for", loc="lower center", ncol=3, fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
