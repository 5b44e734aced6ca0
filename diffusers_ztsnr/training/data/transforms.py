"""Image transforms in PIL + numpy + torch (no torchvision): any mode to RGB, resize to cover, crop (center or
drawn from a generator), mirror, and a ``[3, H, W]`` tensor in ``[-1, 1]``. Sizes are ``(height, width)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .images import Size

_INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, P with a transparent index) is composited over ``background`` (white). 16-bit
    integer modes (``I;16*``, and ``I``, which PIL uses for 16-bit PNG/TIFF) are read as 0..65535 and scaled by
    1/257 (PIL's own ``convert`` would clip them at 255); ``F`` is read as 0..1 if its maximum is <= 1 else
    0..255. CMYK, YCbCr, 1-bit, L and others go through PIL's ``convert("RGB")``.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image).astype(np.float64)
        array = np.clip(array, 0, 65535) / 257.0
        return Image.fromarray(np.round(array).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
        return Image.fromarray(np.round(np.clip(array * scale, 0, 255)).astype(np.uint8), mode="L").convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _cover_size(image_size: tuple[int, int], target: Size) -> Size:
    """``(h, w)`` of the smallest aspect-preserving resize of a ``(w, h)`` PIL size that covers ``target``."""
    width, height = image_size
    scale = max(target[0] / height, target[1] / width)
    return max(target[0], round(height * scale)), max(target[1], round(width * scale))


def _draw_crop(resized: Size, target: Size, generator: torch.Generator | None) -> tuple[int, int]:
    top = int(torch.randint(0, resized[0] - target[0] + 1, (1,), generator=generator).item())
    left = int(torch.randint(0, resized[1] - target[1] + 1, (1,), generator=generator).item())
    return top, left


def _resize_crop_flip(
    image: Image.Image, target: Size, top_left: tuple[int, int] | None, flip: bool, interpolation: str
) -> tuple[Image.Image, Size]:
    """Resize to cover ``target``, crop at ``top_left`` (``None``: center), maybe mirror."""
    th, tw = target
    new_h, new_w = _cover_size(image.size, target)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=_INTERPOLATIONS[interpolation])
    if top_left is None:
        top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
    else:
        top, left = top_left
    if (top, left, th, tw) != (0, 0, new_h, new_w):
        image = image.crop((left, top, left + tw, top + th))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - tw
    return image, (top, left)


def _check_target(target_size: Sequence[int], interpolation: str) -> Size:
    th, tw = int(target_size[0]), int(target_size[1])
    if th <= 0 or tw <= 0:
        raise ValueError(f"target size must be positive, got {tuple(target_size)}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
    return th, tw


def resize_and_crop(
    image: Image.Image,
    target_size: Size,
    *,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
    interpolation: str = "lanczos",
) -> tuple[Image.Image, Size]:
    """Resize ``image`` to cover ``target_size`` (``(h, w)``), crop it to exactly that size, optionally mirror it.

    For a square target this is "shorter side to ``resolution``, then crop". A random crop draws its offset
    (top, then left) from ``generator``. Returns the image and ``crop_top_left`` ``(top, left)`` in the resized
    image's coordinates; when flipped, ``left`` is measured in the mirrored image (``resized_w - left - w``), which
    is what SDXL's crop conditioning describes.
    """
    target = _check_target(target_size, interpolation)
    top_left = None if center_crop else _draw_crop(_cover_size(image.size, target), target, generator)
    return _resize_crop_flip(image, target, top_left, flip, interpolation)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (any mode, via :func:`to_rgb`) -> float32 ``[3, H, W]`` in ``[-1, 1]`` (0 -> -1, 255 -> +1)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageTransform:
    """EXIF-rotate, convert to RGB, resize + crop to a target size, maybe flip, and tensorize.

    Args:
        resolution: the square target side when no ``target_size`` is given per call.
        center_crop: center crop (deterministic) or a random crop drawn from the call's generator.
        random_flip: mirror with probability 0.5, drawn from the call's generator.
        interpolation: ``"lanczos"`` (default), ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
    """

    def __init__(
        self, resolution: int, center_crop: bool = True, random_flip: bool = False, interpolation: str = "lanczos"
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        _check_target((resolution, resolution), interpolation)
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.interpolation = interpolation

    def __call__(
        self,
        image: Image.Image,
        *,
        target_size: Size | None = None,
        generator: torch.Generator | None = None,
        flip: bool | None = None,
        mask: Image.Image | None = None,
    ) -> dict[str, Any]:
        """Return ``{"pixel_values": [3, h, w] in [-1, 1], "original_size": (h, w), "crop_top_left": (t, l)}``.

        ``original_size`` is the source size after EXIF rotation. Random draws from ``generator``, in order: crop
        top and left (random crop only), then the flip (``random_flip`` and ``flip is None`` only);
        ``flip=True/False`` forces the orientation without a draw. A loss ``mask`` (same size as ``image``) gets
        the same EXIF rotation, resize, crop and flip and is returned as ``"loss_mask"``: float ``[1, h, w]`` in
        [0, 1], its red channel / 255 (:mod:`.masks`).
        """
        image = _exif_transposed(image)
        image = to_rgb(image)
        original_size = (image.height, image.width)
        target = _check_target(target_size or (self.resolution, self.resolution), self.interpolation)
        top_left = None if self.center_crop else _draw_crop(_cover_size(image.size, target), target, generator)
        if flip is None:
            flip = self.random_flip and bool(torch.rand((), generator=generator).item() < 0.5)
        image, crop_top_left = _resize_crop_flip(image, target, top_left, flip, self.interpolation)
        out = {"pixel_values": image_to_tensor(image), "original_size": original_size, "crop_top_left": crop_top_left}
        if mask is not None:
            red = to_rgb(_exif_transposed(mask)).getchannel("R")
            red, _ = _resize_crop_flip(red, target, top_left, flip, self.interpolation)
            out["loss_mask"] = torch.from_numpy(np.asarray(red, dtype=np.float32) / 255.0)[None]
        return out


def _exif_transposed(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: keep the stored orientation
        return image

