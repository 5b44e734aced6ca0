"""Image-caption items with a reference image beside the target (image-editing training: FLUX.1 Kontext).

The reference of a row comes from ``cond_image_column``: an image cell (``{"path", "bytes"}``, a PIL image) or a
path string, relative to ``data_dir`` (``--train_data_dir``) unless absolute. It is first resized to the target
image's size, then given exactly the target's resize, crop, flip and bucket: its transform draws from the item's
generator what the target's drew, so both crops cover the same region (diffusers' Kontext script crops both
images with one set of crop parameters likewise).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, ImageOps

from .dataset import ImageCaptionDataset
from .images import _image_ref, _open_image
from .transforms import _INTERPOLATIONS, to_rgb


class ReferenceImageDataset(ImageCaptionDataset):
    """An :class:`ImageCaptionDataset` whose items also hold ``cond_pixel_values`` (``[3, h, w]`` in ``[-1, 1]``,
    the target's shape). Every kept row must have a readable reference: construction checks each one's header and
    raises a one-line ``ValueError`` naming the row and the column otherwise."""

    def __init__(self, dataset: datasets.Dataset, *, cond_image_column: str, data_dir: str | os.PathLike | None = None,
                 **kwargs: Any) -> None:
        if cond_image_column not in dataset.column_names:
            raise ValueError(f"--cond_image_column {cond_image_column}: the dataset has no such column (columns: "
                             f"{', '.join(dataset.column_names)})")
        if isinstance(dataset.features.get(cond_image_column), datasets.Image):
            dataset = dataset.cast_column(cond_image_column, datasets.Image(decode=False))
        self._references = dataset.select_columns([cond_image_column])
        self.cond_image_column = cond_image_column
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        super().__init__(dataset, **kwargs)
        self._reference_fingerprints = [self._check_reference(i) for i in range(len(self))]

    def _cell(self, index: int) -> Any:
        """Item ``index``'s reference cell; a relative path string is taken relative to ``data_dir``."""
        value = self._references[self.report.kept_indices[index]][self.cond_image_column]
        if isinstance(value, (str, os.PathLike)) and self.data_dir is not None and not Path(value).is_absolute():
            return str(self.data_dir / value)
        return value

    def _check_reference(self, index: int) -> str:
        """Open item ``index``'s reference (header only); returns its fingerprint (path, size and mtime, or a hash of
        its bytes)."""
        row = self.report.kept_indices[index]
        value = self._cell(index)
        written = self._references[row][self.cond_image_column]  # as the dataset holds it, for the message
        if not isinstance(written, (str, os.PathLike)):
            written = _image_ref(written)[0] or "<image bytes>"
        try:
            path, data, pil = _image_ref(value)
            if pil is None:
                with Image.open(path if data is None else io.BytesIO(data)) as image:
                    image.size  # noqa: B018  (the header is read on open)
        except Exception as error:  # one line for any missing / unreadable reference
            raise ValueError(f"--cond_image_column {self.cond_image_column}: row {row}'s reference image "
                             f"{str(written)!r} cannot be read ({type(error).__name__}: {error}); every training row "
                             "needs a reference image") from error
        if data is not None:
            return hashlib.sha256(data).hexdigest()[:16]
        if path is not None and os.path.exists(path):
            stat = os.stat(path)
            return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"
        return f"row {row}"

    def fingerprint(self) -> str:
        """The target images' and captions' fingerprint, combined with the references'."""
        h = hashlib.sha256(super().fingerprint().encode())
        h.update("\n".join(self._reference_fingerprints).encode())
        return h.hexdigest()[:16]

    def reference_pixels(self, index: int, candidate: int) -> Any:
        """Item ``index``'s reference (of source row ``candidate``, the item actually served), resized to the
        target's source size, then transformed as the target was: same generator, so the same crop and flip."""
        reference = to_rgb(ImageOps.exif_transpose(_open_image(self._cell(candidate))))
        height, width = self.report.sizes[candidate]
        if reference.size != (width, height):
            reference = reference.resize((width, height), resample=_INTERPOLATIONS[self.transform.interpolation])
        out = self.transform(reference, target_size=self.target_size(index), generator=self.generator_for(index),
                             flip=self.force_flip)
        return out["pixel_values"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["cond_pixel_values"] = self.reference_pixels(int(index), item["index"])
        return item
