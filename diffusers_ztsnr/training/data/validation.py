"""Validation of an image-caption dataset: every image opened once, every caption checked, bad rows skipped, counted
and named. Sizes are ``(height, width)``, after the EXIF orientation."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
from PIL import Image

from .images import Size, _check_pixels, _classify_error, _display_name, _exif_size, _image_ref
from .transforms import to_rgb

# One logger for the package, named after it: records keep the name "diffusers_ztsnr.training.data" whichever
# file they come from, so one level set on that name covers all of them.
logger = logging.getLogger(__package__)

_MAX_LISTED = 20  # bad files named one by one in warnings / summaries before "... and N more"


@dataclass
class ValidationReport:
    """What :func:`validate_image_caption_dataset` kept and skipped. Per-kept lists are aligned."""

    total: int
    kept_indices: list[int] = field(default_factory=list)  # rows of the source dataset that are usable
    sizes: list[Size] = field(default_factory=list)  # (h, w) of each kept image, after EXIF rotation
    captions: list[str | list[str]] = field(default_factory=list)
    fingerprints: list[str] = field(default_factory=list)  # path:size:mtime or a hash of embedded bytes
    bad_images: list[tuple[int, str, str]] = field(default_factory=list)  # (row, name, reason)
    missing_captions: list[tuple[int, str]] = field(default_factory=list)  # (row, name)

    @property
    def num_kept(self) -> int:
        return len(self.kept_indices)

    def summary(self) -> str:
        """One line: ``kept N of M rows; skipped 2 of 40 images: a.png (truncated), ...``."""
        parts = [f"kept {self.num_kept} of {self.total} rows"]
        if self.bad_images:
            names = [f"{name} ({reason})" for _row, name, reason in self.bad_images[:_MAX_LISTED]]
            more = len(self.bad_images) - _MAX_LISTED
            parts.append(
                f"skipped {len(self.bad_images)} of {self.total} images: "
                + ", ".join(names)
                + (f" and {more} more" if more > 0 else "")
            )
        if self.missing_captions:
            names = [name for _row, name in self.missing_captions[:_MAX_LISTED]]
            more = len(self.missing_captions) - _MAX_LISTED
            parts.append(
                f"skipped {len(self.missing_captions)} of {self.total} rows without a caption: "
                + ", ".join(names)
                + (f" and {more} more" if more > 0 else "")
            )
        return "; ".join(parts)


def _unique_suffixes(groups: Iterable[set[str]]) -> dict[str, str]:
    """For paths that share a basename: each path -> its shortest trailing part (``"b/x.png"``) unique in its group."""
    out: dict[str, str] = {}
    for paths in groups:
        parts = {path: Path(path).parts for path in paths}
        for path, mine in parts.items():
            for k in range(1, len(mine) + 1):
                if all(other[-k:] != mine[-k:] for q, other in parts.items() if q != path):
                    break
            out[path] = "/".join(mine[-k:])
    return out


def _check_image(value: Any, row: int, mode: str) -> tuple[Size | None, str, str]:
    """Return ``(size or None, reason, fingerprint)`` for one image cell."""
    try:
        path, data, pil = _image_ref(value)
    except TypeError as e:
        return None, str(e), ""
    try:
        if pil is not None:
            _check_pixels(pil)
            pil.load()
            return _exif_size(pil), "", f"pil:{row}"
        if data is not None:
            if len(data) == 0:
                return None, "empty file", ""
            fingerprint = "sha1:" + hashlib.sha1(data).hexdigest()
        elif path:
            stat = os.stat(path)
            if stat.st_size == 0:
                return None, "empty file", ""
            fingerprint = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
        else:
            return None, "no image (neither bytes nor path)", ""
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            _check_pixels(image)  # before any decode: an image over MAX_IMAGE_PIXELS is never decoded
            if mode == "header":
                return _exif_size(image, header_only=True), "", fingerprint
            image.verify()  # structure / CRC checks (catches truncated PNGs even with LOAD_TRUNCATED_IMAGES)
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()  # a full decode (catches truncated JPEGs)
            to_rgb(image)  # and a mode we can convert
            return _exif_size(image), "", fingerprint
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return None, _classify_error(e), ""


def _caption_ok(caption: Any) -> bool:
    if isinstance(caption, str):
        return True
    return isinstance(caption, (list, tuple)) and len(caption) > 0 and all(isinstance(c, str) for c in caption)

@dataclass
class _SkippedNames:
    """The paths seen so far, to name skipped files by their shortest unique path suffix (``"b/x.png"`` beside
    ``"a/x.png"``) once every row has been seen."""

    first_path: dict[str, str] = field(default_factory=dict)  # basename -> first path seen
    shared: dict[str, set[str]] = field(default_factory=dict)  # basename -> all its paths, shared basenames only
    skipped_paths: dict[int, str] = field(default_factory=dict)  # row -> path, for skipped rows

    def see(self, path: str) -> None:
        base = os.path.basename(path)
        if self.first_path.setdefault(base, path) != path:
            self.shared.setdefault(base, {self.first_path[base]}).add(path)

    def rename(self, report: ValidationReport) -> None:
        """Rename the skipped rows of ``report`` whose basename several files share."""
        if not self.shared:
            return
        names = _unique_suffixes(self.shared.values())
        report.bad_images = [
            (row, names.get(self.skipped_paths.get(row, ""), name), reason) for row, name, reason in report.bad_images
        ]
        report.missing_captions = [
            (row, names.get(self.skipped_paths.get(row, ""), name)) for row, name in report.missing_captions
        ]


def _check_arguments(dataset: datasets.Dataset, image_column: str, caption_column: str, mode: str) -> list[str]:
    """Raise for a missing column, an empty dataset or an unknown mode; return the dataset's columns."""
    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ValueError(f"{flag} {column!r} is not a column; available columns: {columns}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    if mode not in ("full", "header"):
        raise ValueError(f"mode must be 'full' or 'header', got {mode!r}")
    return columns


def _rows_with_captions(
    start: int, images: list[Any], captions: list[Any], report: ValidationReport, names: _SkippedNames
) -> list[tuple[int, Any, Any]]:
    """``(row, image cell, caption)`` of the rows of one chunk that have a caption; the others go to
    ``report.missing_captions``."""
    todo = []
    rows = list(range(start, start + len(images)))
    for row, value, caption in zip(rows, images, captions, strict=True):
        try:
            path = _image_ref(value)[0]
        except TypeError:
            path = None
        if path:
            path = os.path.normpath(path)
            names.see(path)
        if _caption_ok(caption):
            todo.append((row, value, caption))
        else:
            report.missing_captions.append((row, _display_name(path, row)))
            if path:
                names.skipped_paths[row] = path
    return todo


def _skip_bad_image(row: int, value: Any, reason: str, report: ValidationReport, names: _SkippedNames) -> None:
    """Count one unreadable image in ``report.bad_images``; warn with its full path (the first few only)."""
    path = _image_ref(value)[0] if not reason.startswith("unsupported") else None
    report.bad_images.append((row, _display_name(path, row), reason))
    if path:
        names.skipped_paths[row] = os.path.normpath(path)
    if len(report.bad_images) <= _MAX_LISTED:
        hint = (
            f" (over PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; raise it to keep the image)"
            if reason == "too large"
            else ""
        )
        logger.warning("skipping image %s (row %d): %s%s", path or "<embedded bytes>", row, reason, hint)


def _check_chunk(
    todo: list[tuple[int, Any, Any]],
    mode: str,
    executor: ThreadPoolExecutor | None,
    report: ValidationReport,
    names: _SkippedNames,
) -> None:
    """Check the images of ``todo`` (in ``executor``'s threads, if any) and add each to ``report``, in row order."""
    if executor is not None:
        results = list(executor.map(lambda item: _check_image(item[1], item[0], mode), todo))
    else:
        results = [_check_image(value, row, mode) for row, value, _caption in todo]
    for (row, value, caption), (size, reason, fingerprint) in zip(todo, results, strict=True):
        if size is None:
            _skip_bad_image(row, value, reason, report, names)
            continue
        report.kept_indices.append(row)
        report.sizes.append(size)
        report.captions.append(list(caption) if isinstance(caption, (list, tuple)) else caption)
        report.fingerprints.append(fingerprint)


def validate_image_caption_dataset(
    dataset: datasets.Dataset,
    image_column: str = "image",
    caption_column: str = "text",
    mode: Literal["full", "header"] = "full",
    num_workers: int | None = None,
    chunk_size: int = 256,
) -> ValidationReport:
    """Open every image once and check every caption; return what is usable.

    ``mode="full"`` runs PIL's ``verify()`` and a full decode (catches truncated files; costs one decode per image,
    run in ``num_workers`` threads); ``mode="header"`` only parses headers (catches zero-byte, missing and non-image
    files, not truncation; the per-item fallback of :class:`ImageCaptionDataset` covers the rest). Each bad file is
    logged as a warning with its full path, then one summary line (:meth:`ValidationReport.summary`).

    Raises:
        ValueError: a column is missing, the dataset is empty, no row has a caption, or no image is readable.
    """
    columns = _check_arguments(dataset, image_column, caption_column, mode)
    total = len(dataset)
    if isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = dataset.select_columns([image_column, caption_column])
    report = ValidationReport(total=total)
    names = _SkippedNames()
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    executor = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for start in range(0, total, chunk_size):
            chunk = dataset[start : start + chunk_size]
            todo = _rows_with_captions(start, chunk[image_column], chunk[caption_column], report, names)
            _check_chunk(todo, mode, executor, report, names)
    finally:
        if executor is not None:
            executor.shutdown()
    names.rename(report)
    if len(report.missing_captions) == total:
        raise ValueError(
            f"no row of column {caption_column!r} holds a caption (all {total} are None or not strings); "
            f"check --caption_column (available columns: {columns})"
        )
    if report.num_kept == 0:
        raise ValueError(f"no usable image in the dataset: {report.summary()}")
    if report.bad_images or report.missing_captions:
        logger.warning(report.summary())
    return report
