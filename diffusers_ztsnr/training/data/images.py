"""Image cells of a ``datasets.Dataset`` (a ``{"path", "bytes"}`` dict, a path or a PIL image): their parts, their
displayed size, a full decode, and a short name for a decode error. Sizes are ``(height, width)``."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

Size = tuple[int, int]  # (height, width)


def _image_ref(value: Any) -> tuple[str | None, bytes | None, Image.Image | None]:
    """Split an image cell (``{"path", "bytes"}`` dict, a path string or a PIL image) into its parts."""
    if isinstance(value, Image.Image):
        return getattr(value, "filename", None) or None, None, value
    if isinstance(value, Mapping):
        return value.get("path"), value.get("bytes"), None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value), None, None
    raise TypeError(f"unsupported image cell of type {type(value).__name__}")


def _display_name(path: str | None, row: int) -> str:
    return os.path.basename(path) if path else f"row {row}"


def _check_pixels(image: Image.Image) -> None:
    """Raise ``DecompressionBombError`` if ``image`` (header only, nothing decoded) has more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS``. PIL itself raises only above twice the limit, and between 1x and 2x just warns
    and then decodes the whole image."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(
            f"{width}x{height} = {width * height} pixels is over PIL.Image.MAX_IMAGE_PIXELS = {limit}: downscale the "
            "file, or raise PIL.Image.MAX_IMAGE_PIXELS to train on it"
        )


def _open_image(value: Any) -> Image.Image:
    """Decode one image cell fully (raises on any decode problem, and on an image over ``MAX_IMAGE_PIXELS`` before
    decoding it); the file handle is closed on return."""
    path, data, pil = _image_ref(value)
    if pil is not None:
        _check_pixels(pil)
        pil.load()
        return pil
    source: Any = io.BytesIO(data) if data is not None else path
    if source is None:
        raise ValueError("image cell has neither bytes nor a path")
    with Image.open(source) as image:
        _check_pixels(image)
        image.load()
        return image


def _classify_error(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):  # warning: under -W error
        return "too large"
    message = str(error)
    if "truncated" in message.lower():
        return "truncated"
    return f"unreadable: {type(error).__name__}: {message}"


def _exif_size(image: Image.Image, header_only: bool = False) -> Size:
    """``(h, w)`` as displayed, i.e. after the EXIF orientation. ``header_only`` never triggers a decode (PIL's
    PNG ``getexif`` decodes the whole file to look for an eXIf chunk after the pixel data; those are rare)."""
    width, height = image.size
    if header_only and image.format == "PNG" and "exif" not in image.info:
        return height, width
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not reject a decodable image
        orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)

