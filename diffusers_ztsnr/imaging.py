"""Laying images out in a grid: the training run's validation grids and the demo's figure panels.

Images are channels-last arrays, ``[N, H, W, C]``, placed row by row (image ``i`` at row ``i // columns``, column
``i % columns``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["image_grid", "tile_images"]


def tile_images(pixels: np.ndarray, columns: int, fill: float = 0) -> np.ndarray:
    """``[N, H, W, C]`` -> one ``[rows * H, columns * W, C]`` array of ``pixels``' dtype, ``columns`` images wide.

    Cells after the last image (an incomplete last row) hold ``fill``.
    """
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    canvas = np.full((rows * h, columns * w, c), fill, dtype=pixels.dtype)
    for i, image in enumerate(pixels):
        r, col = divmod(i, columns)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return canvas


def image_grid(images: np.ndarray, columns: int) -> PIL.Image.Image:
    """``[N, H, W, 3]`` floats in [0, 1] -> one PIL image, ``columns`` wide; empty cells are white."""
    from PIL import Image

    canvas = tile_images(np.asarray(images, dtype=np.float32), columns, fill=1.0)
    return Image.fromarray((canvas.clip(0, 1) * 255).round().astype(np.uint8))
