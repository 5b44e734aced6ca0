"""The demo's data: shapes on dark, grey and bright backgrounds, with captions that say which.

Backgrounds are drawn per tone from disjoint brightness ranges, so a caption names the brightness and the
per-image mean brightness of the data spreads widely (the spread a non-zero-terminal-SNR model cannot reach).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..testing.demo_data import COLORS, shape_mask

SHAPES = ("disc", "square")

#: background brightness range (0 black .. 1 white) of each tone named in the captions
TONES = {"dark": (0.0, 0.5), "grey": (0.25, 0.75), "bright": (0.5, 1.0)}


def caption(shape: str, color: str, tone: str) -> str:
    return f"a {color} {shape} on a {tone} background"


@dataclass
class ShapeSet:
    """Images as float tensors in [-1, 1] (``(n, 3, size, size)``), their captions and the tone each names."""

    images: torch.Tensor
    captions: list[str]
    tones: list[str]


def make_shapes(num_images: int, size: int, seed: int) -> ShapeSet:
    """``num_images`` images cycling through every (tone, shape, colour); positions and shades from ``seed``."""
    rng = np.random.default_rng(seed)
    arrays, captions, tones = [], [], []
    combos = [(t, s, c) for t in TONES for s in SHAPES for c in COLORS]
    for i in range(num_images):
        tone, shape, color = combos[i % len(combos)]
        background = float(rng.uniform(*TONES[tone]))
        arrays.append(draw(shape, COLORS[color], background, size, rng))
        captions.append(caption(shape, color, tone))
        tones.append(tone)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return ShapeSet(images, captions, tones)


def draw(shape: str, color: tuple[int, int, int], background: float, size: int,
         rng: np.random.Generator) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image: a shape of about half the image's width near the centre."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    cy, cx = rng.uniform(0.4, 0.6, size=2)
    radius = rng.uniform(0.16, 0.24)
    mask = shape_mask(shape, yy, xx, cy, cx, radius * (0.9 if shape == "square" else 1.0))  # equal areas, roughly
    canvas = np.full((size, size, 3), background * 255.0)
    canvas[mask] = color
    return canvas.clip(0, 255).astype(np.uint8)


def write_imagefolder(shapes: ShapeSet, folder: Path) -> Path:
    """The set as PNG files plus ``metadata.jsonl`` (``file_name``, ``text``): what ``--train_data_dir`` reads."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((shapes.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as rows:
        for i, (image, text) in enumerate(zip(pixels, shapes.captions, strict=True)):
            Image.fromarray(image).save(folder / f"{i:04d}.png")
            rows.write(json.dumps({"file_name": f"{i:04d}.png", "text": text}) + "\n")
    return folder


def mean_brightness(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean brightness in [0, 1] of ``(n, 3, h, w)`` images in [-1, 1]."""
    return ((images.clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3))
