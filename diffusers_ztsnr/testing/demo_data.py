"""A small image + caption dataset generated deterministically, for the offline demo and the tests.

Coloured squares, discs and stripes on backgrounds whose brightness runs from near black to near white
(the global-brightness variation that a non-ZTSNR schedule cannot learn), written as an imagefolder:
PNG files plus ``metadata.jsonl`` with ``file_name`` / ``text`` columns, as ``datasets`` expects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["COLORS", "SHAPES", "demo_image", "make_demo_dataset", "shape_mask"]

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "disc", "stripes")


def shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float) -> np.ndarray:
    """Pixels inside a disc of ``radius`` or a square of half-side ``radius`` centred at ``(cy, cx)`` (``yy``,
    ``xx``: pixel coordinates in [0, 1))."""
    if shape == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    if shape == "square":
        return (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < radius)
    raise ValueError(f"shape={shape!r}; allowed: disc, square")


def demo_image(shape: str, color: tuple[int, int, int], background: float, size: int,
               rng: np.random.Generator) -> PIL.Image.Image:
    """One ``size`` x ``size`` RGB image: ``shape`` in ``color`` on a grey level ``background`` in [0, 1], with a
    little noise; position, size and stripe frequency are drawn from ``rng``."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    canvas = np.full((size, size, 3), background * 255.0)
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    radius = rng.uniform(0.18, 0.3)
    if shape == "stripes":
        mask = np.sin(xx * rng.uniform(12, 20) + rng.uniform(0, 6)) > 0.3
    else:
        mask = shape_mask(shape, yy, xx, cy, cx, radius)
    canvas[mask] = color
    canvas += rng.normal(0, 6, canvas.shape)  # a little texture: not flat colour only
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def make_demo_dataset(folder: str | Path, num_images: int = 32, size: int = 64, seed: int = 0) -> Path:
    """Write ``num_images`` PNGs and ``metadata.jsonl`` into ``folder``; the same seed gives the same files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        shape = SHAPES[i % len(SHAPES)]
        name = list(COLORS)[(i // len(SHAPES)) % len(COLORS)]
        background = float(rng.uniform(0.03, 0.97))
        tone = "dark" if background < 0.35 else "bright" if background > 0.65 else "grey"
        file_name = f"{i:03d}.png"
        demo_image(shape, COLORS[name], background, size, rng).save(folder / file_name)
        rows.append({"file_name": file_name, "text": f"a {name} {shape} on a {tone} background"})
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder
