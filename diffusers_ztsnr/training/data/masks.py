"""Loss masks: one grayscale image per training image saying where the loss counts (white) and where not (black).

Where a mask comes from, one of:

* OneTrainer's convention, a file beside its image named ``<stem>-masklabel.png`` (``0001.jpg`` ->
  ``0001-masklabel.png``); the imagefolder loader ignores such files (they have no ``metadata.jsonl`` row);
* a dataset column of images (``--mask_column NAME``): in a ``metadata.jsonl`` the key ``NAME_file_name``, which
  ``datasets``' imagefolder loads as the image column ``NAME``; in a Hub dataset any image column.

Values: the red channel (what sd-scripts reads; a grayscale mask reads the same) scaled 0..255 -> 0..1, so 255
trains a pixel fully, 0 not at all, 127 at about half weight. A mask must have its image's size (after the EXIF
rotation of each); it goes through exactly its image's resize, crop, flip and bucket, and is then averaged over each
latent cell (:func:`latent_mask`, an area average: a cell half covered by white weighs 0.5).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..arguments import InputError
from .images import Size, _display_name, _image_ref
from .validation import _check_image

MASK_SUFFIX = "-masklabel.png"


def beside_mask_path(image_path: str) -> str:
    """``<folder>/<stem>-masklabel.png`` for ``<folder>/<stem>.<ext>`` (OneTrainer's mask file name)."""
    folder, name = os.path.split(image_path)
    return os.path.join(folder, os.path.splitext(name)[0] + MASK_SUFFIX)


def is_mask_file(name: str) -> bool:
    """Whether a file name is a loss mask by the beside-the-image convention (not a training image)."""
    return name.lower().endswith(MASK_SUFFIX)


def find_masks(image_cells: Sequence[Any], mask_cells: Sequence[Any] | None, rows: Sequence[int],
               sizes: Sequence[Size]) -> tuple[list[Any], list[str]]:
    """The mask cell of every kept item and its fingerprint, each checked against its image.

    ``image_cells`` / ``mask_cells`` are the kept items' cells (``mask_cells=None``: the ``-masklabel.png`` file
    beside each image), ``rows`` their source rows, ``sizes`` the images' ``(h, w)`` after EXIF rotation.

    Raises:
        InputError: a mask is missing or unreadable, or its size differs from its image's (one line naming both
            files and the fix).
    """
    masks, fingerprints = [], []
    for i, (image_cell, row, size) in enumerate(zip(image_cells, rows, sizes, strict=True)):
        image_path = _image_ref(image_cell)[0]
        image_name = _display_name(image_path, row)
        if mask_cells is None:
            if not image_path:
                raise InputError(f"image {image_name} has no file path, so no {MASK_SUFFIX} file can lie beside it: "
                                 "give the masks as a dataset column (--mask_column)")
            cell: Any = beside_mask_path(image_path)
            if not os.path.isfile(cell):
                raise InputError(f"no loss mask for {image_path}: masked training reads {cell} (white = trained, "
                                 "black = ignored); add it, or a white one to train the whole image")
        else:
            cell = mask_cells[i]
            if cell is None:
                raise InputError(f"image {image_name} has no mask in --mask_column: give every image a mask (a white "
                                 "one trains the whole image)")
        mask_size, reason, fingerprint = _check_image(cell, row, "header")
        mask_name = _image_ref(cell)[0] or f"the mask of {image_name}"
        if mask_size is None:
            raise InputError(f"loss mask {mask_name} cannot be read ({reason}): replace it with a grayscale PNG")
        if tuple(mask_size) != tuple(size):
            raise InputError(f"loss mask {mask_name} is {mask_size[1]}x{mask_size[0]} but its image {image_name} is "
                             f"{size[1]}x{size[0]} (width x height): save the mask at its image's size")
        masks.append(cell)
        fingerprints.append(fingerprint)
    return masks, fingerprints


def latent_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A pixel mask ``[B, 1, H, W]`` averaged over each cell of the latents' grid -> ``[B, 1, h, w]`` on their device.

    An area average (``adaptive_avg_pool2d``; exact for ``H`` a multiple of ``h``, as with the VAE's factor 8). A
    mask already on the latent grid (read from the encodings cache) is returned as it is.
    """
    mask = mask.to(latents.device, torch.float32)
    if mask.ndim == 3:
        mask = mask[:, None]
    grid = tuple(latents.shape[-2:])
    return mask if tuple(mask.shape[-2:]) == grid else F.adaptive_avg_pool2d(mask, grid)
