"""Image-caption data for fine-tuning: loading, validation, transforms, aspect-ratio bucketing and encoding caches.

Everything here is PIL + numpy + torch (no torchvision). Sizes are always ``(height, width)``.

Pipeline, as the training scripts use it::

    raw = load_image_caption_dataset(train_data_dir="data/")           # a datasets.Dataset
    ds = ImageCaptionDataset(raw, resolution=1024, center_crop=False, random_flip=True,
                             buckets=make_buckets(1024), seed=42)      # validates every image once, up front
    sampler = BucketBatchSampler(ds.sizes, ds.buckets, batch_size=4, seed=42)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn)

Design decisions
----------------
* **Bad images are found up front.** ``datasets``' imagefolder decodes lazily, so a truncated or non-image file
  would otherwise crash training hours in. :func:`validate_image_caption_dataset` opens every image once
  (``verify()`` then a full ``load()`` in ``"full"`` mode; header only in ``"header"`` mode), drops the bad rows,
  logs one warning per bad file (full path) and a summary such as
  ``skipped 2 of 40 images: a.png (truncated), b.jpg (not an image)``. It also records each image's size (after
  EXIF rotation), which bucketing needs anyway. As a safety net, :class:`ImageCaptionDataset` still catches a
  decode error at ``__getitem__`` time (a file changed after validation), warns, counts it in ``lazy_skipped``
  and falls back to the next valid item at the same target size.
* **Missing captions** (``None`` or not a string / list of strings) skip their row, counted and warned; if *no*
  row has a caption the column is surely wrong and a ``ValueError`` names ``--caption_column``. An empty string
  is a valid (unconditional) caption. A list of strings is a set of alternative captions: one is drawn per item.
* **Data faults, case by case** (``tests/test_data_faults.py`` holds the table). Skipped and counted in
  ``report.bad_images`` as ``(row, name, reason)``: zero-byte file (``"empty file"``), truncated file
  (``"truncated"``), non-image file with an image extension (``"not an image"``), metadata row whose file is
  missing (``"missing file"``), image over ``PIL.Image.MAX_IMAGE_PIXELS`` (``"too large"``: rejected from its
  header, never decoded, even between 1x and 2x the limit where PIL itself only warns; raise the limit to keep
  such images). ``name`` is the file's basename, or its shortest unique path suffix (``"b/x.png"``) when
  several files share the basename. Skipped and counted in ``report.missing_captions``: ``None`` / absent
  caption, a list that is empty or holds non-strings, any other non-string cell (in a ``metadata.jsonl`` an empty
  list is accepted only among list captions; beside string captions, or as a file's only captions, it is a
  ``ValueError`` at ``file:line`` saying "an empty list of captions"). Converted to RGB in ``[-1, 1]``
  (see :func:`to_rgb`): RGBA / LA / PA / P with transparency (over white), L, 1-bit, CMYK, 16-bit ``I;16*`` and
  ``I`` (scaled by 1/257, no wraparound), ``F``; EXIF orientation is applied. A ``metadata.jsonl`` that names
  one file on two rows, has a non-string caption (number, object, list of non-strings), mixes string and list
  captions, or has a line without ``file_name`` / not a JSON object is a ``ValueError`` from
  :func:`load_image_caption_dataset` naming ``file:line`` and the fix (``datasets`` would otherwise train the
  image twice, or fail with an Arrow error that names neither).
* **Kept, but warned about** (one warning line each per :class:`ImageCaptionDataset`, with the count and the
  first five names and sizes): images upscaled more than 4x to their training size (for square crops a shorter
  side under ``resolution / 4``, e.g. under 128 px at 512: relative, so that tiny test resolutions stay quiet),
  and images with an aspect ratio over 4:1 (e.g. 10000x10, of which a crop keeps a sliver). Both are trained on.
* **Symlinks.** A symlink under ``--train_data_dir`` (file or folder) that points outside it is a ``ValueError``
  naming the link and its target, unless ``follow_symlinks=True`` (``--follow_symlinks``): ``datasets`` follows
  such links silently. A ``metadata.jsonl`` may start with a UTF-8 byte-order mark.
* **Reproducible randomness.** Every random choice of an item (crop offset, flip, caption choice) comes from a
  ``torch.Generator`` seeded from ``(seed, epoch, index)``, so results do not depend on worker count, worker
  order or process rank. ``set_epoch`` changes the draws (accelerate calls it on the dataset each epoch).
* **Caching freezes augmentation.** A cached latent is one fixed crop of one fixed orientation. Policy:
  random *flip* is supported by caching both orientations (``plain`` and ``flipped`` variants, 2x encode cost
  and disk) and drawing one per item and epoch; random *crop* is refused with a ``ValueError`` (use
  ``--center_crop`` or turn caching off). Alternative captions (lists) are frozen to their first entry
  when cached.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".pjpeg", ".pjp", ".ppm", ".pgm"}
)
METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_MAX_LISTED = 20  # bad files named one by one in warnings / summaries before "... and N more"
SMALL_IMAGE_UPSCALE = 4.0  # images upscaled more than this to cover their training size are warned about
MAX_ASPECT_RATIO = 4.0  # images longer than this many times their other side are warned about
_SIZE_EXAMPLES = 5  # images named in those warnings before "... and N more"

Size = tuple[int, int]  # (height, width)

__all__ = [
    "BucketBatchSampler",
    "CachedEncodings",
    "CachedImageCaptionDataset",
    "ImageCaptionDataset",
    "ImageTransform",
    "ValidationReport",
    "assign_buckets",
    "cache_image_encodings",
    "collate_fn",
    "image_to_tensor",
    "load_image_caption_dataset",
    "make_buckets",
    "nearest_bucket",
    "resize_and_crop",
    "to_rgb",
    "validate_image_caption_dataset",
]


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _find_metadata(data_dir: Path) -> list[Path]:
    found = []
    for root, _dirs, files in os.walk(data_dir):
        found.extend(Path(root) / name for name in files if name in METADATA_FILENAMES)
    return sorted(found)


def _count_image_files(data_dir: Path) -> int:
    return sum(
        1
        for _root, _dirs, files in os.walk(data_dir)
        for name in files
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS
    )


_FILE_NAME_KEY = re.compile(r"^(.*_)?file_names?$")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list of non-strings"
    return f"a {type(value).__name__}"


def _caption_kind(caption: Any, where: str, caption_column: str) -> str | None:
    """``"a string"``, ``"a list of strings"``, ``"an empty list"`` or ``None`` (null / absent: skipped and counted
    later); raise a ``ValueError`` naming ``where`` and the fix for any other value."""
    if caption is None:
        return None
    if isinstance(caption, str):
        return "a string"
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return "a list of strings" if caption else "an empty list"
    raise ValueError(
        f"{where}: caption {caption_column!r} is {_json_kind(caption)} ({json.dumps(caption)[:60]}): "
        'a caption is a string (quote numbers: "3"), a list of alternative strings, or null to skip the row'
    )


def _check_caption_kinds(path: Path, line_no: int, kind: str, kinds: dict[str, int], caption_column: str) -> None:
    """Raise if ``kinds`` (kind -> first line) mixes strings with lists, or an empty list with strings.

    An empty list beside list captions is a row without a caption (skipped and counted later); beside string
    captions Arrow cannot load it, so it is named at its own line.
    """
    other = next((k for k in kinds if k not in (kind, "an empty list")), None)
    if kind != "an empty list" and other is not None:
        raise ValueError(
            f"{path}:{line_no}: caption {caption_column!r} is {kind} but line {kinds[other]} has {other}: use one "
            'type per file (write single captions as one-element lists, ["a photo of a cat"])'
        )
    if "an empty list" in kinds and "a string" in kinds:
        raise ValueError(
            f"{path}:{kinds['an empty list']}: caption {caption_column!r} is an empty list of captions ([]) in a "
            f'file of string captions (line {kinds["a string"]}): write a caption string ("" for an unconditional '
            "caption), or null to skip the row"
        )


def _check_metadata_jsonl(path: Path, caption_column: str, seen: dict[str, tuple[Path, int]]) -> None:
    """Raise a ``ValueError`` naming ``path:line`` and the fix for rows the imagefolder loader would mishandle.

    Checked per line: a JSON object, with a ``file_name`` (or ``*_file_name(s)``) key, naming a file no other row
    names (``seen`` maps each resolved ``file_name`` to its first ``(file, line)`` and spans metadata files), and
    a caption that is a string, a list of strings or null/absent, with one of string / list per file. An empty
    list (``[]``) is allowed only among list captions (then it is a row without a caption), and not in a file
    where no line has a caption. ``datasets`` trains a twice-named file twice, and fails with an Arrow "changed
    from string to number" error on mixed types. A leading UTF-8 byte-order mark is skipped (``datasets`` reads
    such a file correctly too).
    """
    example = '{"file_name": "0001.png", "' + caption_column + '": "a photo of a cat"}'
    kinds: dict[str, int] = {}  # "a string" / "a list of strings" / "an empty list" -> first line
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where} is not valid JSON ({e.msg}): write one object per line, e.g. {example}"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{where} is {_json_kind(row)}, not a JSON object: write e.g. {example}")
            if not any(_FILE_NAME_KEY.match(key) for key in row):
                raise ValueError(f'{where} has no "file_name": every line names its image, e.g. {example}')
            name = row.get("file_name")
            if isinstance(name, str):
                target = os.path.normpath(path.parent / name)
                if target in seen:
                    first, first_line = seen[target]
                    raise ValueError(
                        f"{where} names {name!r} again (first at {first}:{first_line}): give each image one row; for "
                        f'several captions of one image use a list, {{"file_name": {json.dumps(name)}, '
                        f'"{caption_column}": ["caption 1", "caption 2"]}}'
                    )
                seen[target] = (path, line_no)
            kind = _caption_kind(row.get(caption_column), where, caption_column)
            if kind is not None:
                kinds.setdefault(kind, line_no)
                _check_caption_kinds(path, line_no, kind, kinds, caption_column)
    if list(kinds) == ["an empty list"]:
        raise ValueError(
            f"{path}:{kinds['an empty list']}: caption {caption_column!r} is an empty list of captions ([]) and no "
            f'line of the file has a caption: give each row at least one, e.g. ["a photo of a cat"], or null to '
            "skip the row"
        )


def _outside_symlinks(data_dir: Path) -> list[tuple[Path, Path]]:
    """``(link, resolved target)`` of every symlink under ``data_dir`` (file or folder, found without following
    any link) whose target lies outside ``data_dir``'s real path; sorted by link."""
    root = data_dir.resolve()
    found = []
    folders = [data_dir]
    while folders:
        try:
            entries = list(os.scandir(folders.pop()))
        except OSError:  # unreadable folder: skipped, as os.walk does
            continue
        for entry in entries:
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                if not target.is_relative_to(root):
                    found.append((Path(entry.path), target))
            elif entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
    return sorted(found)


def _check_symlinks(data_dir: Path) -> None:
    """Raise a one-line ``ValueError`` naming the first symlink under ``data_dir`` that points outside it."""
    links = _outside_symlinks(data_dir)
    if not links:
        return
    link, target = links[0]
    kind = "folder" if target.is_dir() else "file"
    more = f" (and {len(links) - 1} more such links)" if len(links) > 1 else ""
    raise ValueError(
        f"{link} is a symlink to {target}, outside --train_data_dir {str(data_dir)!r}{more}: move or copy the "
        f"{kind} into --train_data_dir, or pass --follow_symlinks (follow_symlinks=True) to train on what the "
        "links point to"
    )


def _load_image_folder(
    data_dir: Path, caption_column: str, cache_dir: str | None, split: str, follow_symlinks: bool
) -> datasets.DatasetDict | datasets.Dataset:
    """The checks and the ``imagefolder`` load of :func:`load_image_caption_dataset` for a local folder."""
    if not data_dir.is_dir():
        raise ValueError(f"--train_data_dir {str(data_dir)!r} is not a directory")
    if not follow_symlinks:
        _check_symlinks(data_dir)
    metadata = _find_metadata(data_dir)
    if not metadata:
        raise ValueError(
            f"no metadata.jsonl in {str(data_dir)!r}: captions come from a metadata.jsonl beside the images, one "
            'JSON object per line such as {"file_name": "0001.png", "' + caption_column + '": "a photo of a '
            'cat"} (metadata.csv with a file_name column also works)'
        )
    if all(p.stat().st_size == 0 for p in metadata):
        raise ValueError(f"{', '.join(str(p) for p in metadata)} is empty: add one line per image")
    seen: dict[str, tuple[Path, int]] = {}
    for path in metadata:
        if path.suffix == ".jsonl":
            _check_metadata_jsonl(path, caption_column, seen)
    n_files = _count_image_files(data_dir)
    if n_files == 0:
        raise ValueError(f"no image files in {str(data_dir)!r}")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(data_dir), cache_dir=cache_dir, split=split)
    if 0 < len(dataset) < n_files:
        logger.warning(
            "%d of %d image files in %s have no metadata row and are ignored", n_files - len(dataset), n_files, data_dir
        )
    return dataset


def load_image_caption_dataset(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
    follow_symlinks: bool = False,
) -> datasets.Dataset:
    """Load an image-caption ``datasets.Dataset`` from a local imagefolder or a Hub dataset.

    Exactly one of ``train_data_dir`` (a folder of images with a ``metadata.jsonl`` whose lines look like
    ``{"file_name": "0001.png", "text": "a caption"}``; ``metadata.csv``/``.parquet`` work too) or
    ``dataset_name`` (a Hub repo id, or anything else ``datasets.load_dataset`` accepts, e.g. a local folder)
    must be given. Images are not decoded or checked here: see :func:`validate_image_caption_dataset`.

    A symlink inside ``train_data_dir`` (file or folder) whose target lies outside it is refused unless
    ``follow_symlinks`` (``--follow_symlinks``); links that stay inside the folder are always fine.
    ``follow_symlinks`` does not apply to ``dataset_name``.

    Raises:
        ValueError: neither or both sources given; the folder is missing, has no metadata file or no images, or
            holds a symlink to outside it (without ``follow_symlinks``; the message names the link, its target and
            the flag); the dataset is empty; ``image_column`` or ``caption_column`` is not a column (the message
            lists the available columns and names the ``--image_column`` / ``--caption_column`` flag); a
            ``metadata.jsonl`` line is not a JSON object, has no ``file_name``, names a file an earlier line names,
            or has a caption that is not a string / list of strings / null, mixes string and list captions, or
            has an empty list among string captions or as the file's only kind of caption (the message names
            ``file:line`` and the fix).
    """
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError(
            "give exactly one of --train_data_dir (a local image folder with metadata.jsonl captions) or "
            f"--dataset_name (a Hub dataset); got train_data_dir={train_data_dir!r}, dataset_name={dataset_name!r}"
        )
    cache_dir = None if cache_dir is None else str(cache_dir)
    if train_data_dir is not None:
        data_dir = Path(train_data_dir)
        dataset = _load_image_folder(data_dir, caption_column, cache_dir, split, follow_symlinks)
        source = f"--train_data_dir {str(data_dir)!r}"
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
        source = f"--dataset_name {dataset_name!r}"
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{source} split {split!r} is a {type(dataset).__name__}, expected a map-style Dataset")
    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ValueError(
                f"{flag} {column!r} is not a column of {source}; available columns: {columns}. Pass {flag} <name>."
            )
    if len(dataset) == 0:
        raise ValueError(f"{source} split {split!r} is empty")
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


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
    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ValueError(f"{flag} {column!r} is not a column; available columns: {columns}")
    total = len(dataset)
    if total == 0:
        raise ValueError("the dataset is empty")
    if mode not in ("full", "header"):
        raise ValueError(f"mode must be 'full' or 'header', got {mode!r}")
    if isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = dataset.select_columns([image_column, caption_column])
    report = ValidationReport(total=total)
    first_path: dict[str, str] = {}  # basename -> first path seen, to spot basenames shared by several files
    shared: dict[str, set[str]] = {}  # basename -> all its paths, for shared basenames only
    skipped_paths: dict[int, str] = {}  # row -> path, for skipped rows (renamed at the end if shared)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    executor = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for start in range(0, total, chunk_size):
            chunk = dataset[start : start + chunk_size]
            rows = list(range(start, start + len(chunk[image_column])))
            todo = []
            for row, value, caption in zip(rows, chunk[image_column], chunk[caption_column], strict=True):
                try:
                    path = _image_ref(value)[0]
                except TypeError:
                    path = None
                if path:
                    path = os.path.normpath(path)
                    base = os.path.basename(path)
                    if first_path.setdefault(base, path) != path:
                        shared.setdefault(base, {first_path[base]}).add(path)
                if _caption_ok(caption):
                    todo.append((row, value, caption))
                else:
                    report.missing_captions.append((row, _display_name(path, row)))
                    if path:
                        skipped_paths[row] = path
            if executor is not None:
                results = list(executor.map(lambda item: _check_image(item[1], item[0], mode), todo))
            else:
                results = [_check_image(value, row, mode) for row, value, _caption in todo]
            for (row, value, caption), (size, reason, fingerprint) in zip(todo, results, strict=True):
                if size is None:
                    path = _image_ref(value)[0] if not reason.startswith("unsupported") else None
                    report.bad_images.append((row, _display_name(path, row), reason))
                    if path:
                        skipped_paths[row] = os.path.normpath(path)
                    if len(report.bad_images) <= _MAX_LISTED:
                        hint = (
                            f" (over PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; raise it to keep the image)"
                            if reason == "too large"
                            else ""
                        )
                        logger.warning(
                            "skipping image %s (row %d): %s%s", path or "<embedded bytes>", row, reason, hint
                        )
                    continue
                report.kept_indices.append(row)
                report.sizes.append(size)
                report.captions.append(list(caption) if isinstance(caption, (list, tuple)) else caption)
                report.fingerprints.append(fingerprint)
    finally:
        if executor is not None:
            executor.shutdown()
    if shared:  # name skipped files by their shortest unique path suffix, e.g. "b/x.png" beside "a/x.png"
        names = _unique_suffixes(shared.values())
        report.bad_images = [
            (row, names.get(skipped_paths.get(row, ""), name), reason) for row, name, reason in report.bad_images
        ]
        report.missing_captions = [
            (row, names.get(skipped_paths.get(row, ""), name)) for row, name in report.missing_captions
        ]
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


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------

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
    ) -> dict[str, Any]:
        """Return ``{"pixel_values": [3, h, w] in [-1, 1], "original_size": (h, w), "crop_top_left": (t, l)}``.

        ``original_size`` is the source size after EXIF rotation. Random draws from ``generator``, in order: crop
        top and left (random crop only), then the flip (``random_flip`` and ``flip is None`` only);
        ``flip=True/False`` forces the orientation without a draw.
        """
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # malformed EXIF: keep the stored orientation
            pass
        image = to_rgb(image)
        original_size = (image.height, image.width)
        target = _check_target(target_size or (self.resolution, self.resolution), self.interpolation)
        top_left = None if self.center_crop else _draw_crop(_cover_size(image.size, target), target, generator)
        if flip is None:
            flip = self.random_flip and bool(torch.rand((), generator=generator).item() < 0.5)
        image, crop_top_left = _resize_crop_flip(image, target, top_left, flip, self.interpolation)
        return {"pixel_values": image_to_tensor(image), "original_size": original_size, "crop_top_left": crop_top_left}


# ----------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------------------


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[Size]:
    """Bucket sizes ``(h, w)``, multiples of ``step``, area at most (and close to) ``resolution**2``.

    For every width ``w`` the tallest ``h`` (a multiple of ``step``) with ``h * w <= resolution**2`` is taken,
    with its transpose; buckets more elongated than ``max_ratio`` are dropped, and of buckets with the same aspect
    ratio only the largest is kept. Sorted from tallest to widest.
    """
    if step <= 0 or resolution < step:
        raise ValueError(f"need 0 < step <= resolution, got step={step}, resolution={resolution}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    best: dict[tuple[int, int], Size] = {}
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        for bh, bw in ((h, w), (w, h)):
            if max(bh / bw, bw / bh) > max_ratio + 1e-9:
                continue
            g = math.gcd(bh, bw)
            ratio = (bh // g, bw // g)
            if ratio not in best or bh * bw > best[ratio][0] * best[ratio][1]:
                best[ratio] = (bh, bw)
    return sorted(best.values(), key=lambda s: (s[1] / s[0], s[0]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest (in log ratio) to ``size``'s; ties go to the first listed."""
    if not buckets:
        raise ValueError("no buckets")
    log_ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - log_ratio))


def assign_buckets(sizes: Sequence[Size], buckets: Sequence[Size]) -> list[Size]:
    """:func:`nearest_bucket` for every size."""
    return [nearest_bucket(s, buckets) for s in sizes]


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices whose images share one bucket, so every batch stacks to one tensor size.

    ``sizes`` are the items' source ``(h, w)`` (:attr:`ImageCaptionDataset.sizes`); each item goes to the bucket
    nearest in aspect ratio (:func:`nearest_bucket`), as :class:`ImageCaptionDataset` does with the same
    ``buckets``. ``buckets=None`` makes one group (every item is cropped to the same square): plain batches.

    Each epoch shuffles the indices within every bucket, cuts them into batches, and shuffles the batch order,
    all from a generator seeded with ``seed + epoch``: deterministic for a seed, different per epoch. The epoch
    advances by itself after each full iteration; :meth:`set_epoch` sets it (accelerate calls it in a single
    process; call it yourself when resuming).

    Incomplete batches (a bucket's remainder): ``drop_last=True`` drops them; otherwise, by default
    (``fill_incomplete=True``) they are topped up with other items of the same bucket, so every batch has exactly
    ``batch_size`` items and each item appears at least once per epoch; with ``fill_incomplete=False`` short batches
    are yielded as they are and each item appears exactly once.

    Under accelerate multi-process (DDP) this is a plain batch sampler: ``accelerator.prepare`` wraps it in a
    ``BatchSamplerShard`` that deals whole batches round-robin to the processes (every rank must use the same
    seed). That wrapper assumes full batches (a short batch mid-epoch would be dropped and the end-of-epoch
    padding would mix buckets), so keep ``fill_incomplete=True`` or ``drop_last=True`` there.
    """

    def __init__(
        self,
        sizes: Sequence[Size],
        buckets: Sequence[Size] | None,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
        fill_incomplete: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(sizes) == 0:
            raise ValueError("no items to sample")
        if generator is not None:  # draw a seed once so that set_epoch keeps working
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.fill_incomplete = bool(fill_incomplete)
        self.epoch = 0
        # Without buckets every item is cropped to one square size: a single group.
        self.item_buckets = assign_buckets(sizes, buckets) if buckets else [(0, 0)] * len(sizes)
        groups: dict[Size, list[int]] = {}
        for index, bucket in enumerate(self.item_buckets):
            groups.setdefault(bucket, []).append(index)
        self.groups = dict(sorted(groups.items()))

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s shuffle for the next iteration."""
        self.epoch = int(epoch)

    def _num_batches(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return sum(self._num_batches(len(items)) for items in self.groups.values())

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, in order (pure: does not advance the epoch)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches: list[list[int]] = []
        for items in self.groups.values():
            if self.shuffle:
                items = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
            for start in range(0, len(items), self.batch_size):
                batch = items[start : start + self.batch_size]
                if len(batch) < self.batch_size:
                    if self.drop_last:
                        continue
                    if self.fill_incomplete:
                        need = self.batch_size - len(batch)
                        fillers = [items[i % len(items)] for i in range(need)]  # earliest items of this bucket
                        batch = batch + fillers
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        yield from self.batches(epoch)
        self.epoch = epoch + 1


# ----------------------------------------------------------------------------------------------------------------
# Torch dataset
# ----------------------------------------------------------------------------------------------------------------


def _unusual_sizes(sizes: Sequence[Size], targets: Sequence[Size]) -> tuple[list[int], list[int]]:
    """Indices of images upscaled more than :data:`SMALL_IMAGE_UPSCALE` to cover their target ``(h, w)``, and of
    images whose longer side is more than :data:`MAX_ASPECT_RATIO` times their shorter side."""
    small, elongated = [], []
    for index, ((h, w), (th, tw)) in enumerate(zip(sizes, targets, strict=True)):
        h, w = max(h, 1), max(w, 1)
        if max(th / h, tw / w) > SMALL_IMAGE_UPSCALE:
            small.append(index)
        if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
            elongated.append(index)
    return small, elongated


def _item_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """A validated image-caption dataset with transforms; items are ready for :func:`collate_fn`.

    Items: ``{"pixel_values": float [3, h, w] in [-1, 1], "caption": str, "original_size": (h, w),
    "crop_top_left": (top, left), "index": int}``; ``index`` is the position in this dataset (``source_indices``
    maps it back to the wrapped ``datasets.Dataset`` row). With ``buckets`` each item is cropped to its nearest
    bucket (by aspect ratio), else to ``resolution x resolution``.

    Construction runs :func:`validate_image_caption_dataset` (unless a ``report`` is passed), so bad images and
    rows without a caption are skipped up front. Randomness per item comes from ``(seed, epoch, index)``.

    Construction also lists, and warns about once (one line each, with the count and a few names), images that
    are kept but train poorly: ``small_images`` (indices of images upscaled more than :data:`SMALL_IMAGE_UPSCALE`
    = 4x to cover their training size, i.e. a shorter side under ``resolution / 4`` for square crops) and
    ``elongated_images`` (an aspect ratio over :data:`MAX_ASPECT_RATIO` = 4:1, of which a crop keeps little).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        *,
        image_column: str = "image",
        caption_column: str = "text",
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        buckets: Sequence[Size] | None = None,
        interpolation: str = "lanczos",
        seed: int = 0,
        validation: Literal["full", "header"] = "full",
        num_workers: int | None = None,
        report: ValidationReport | None = None,
    ) -> None:
        self.report = report or validate_image_caption_dataset(
            dataset, image_column, caption_column, mode=validation, num_workers=num_workers
        )
        if isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self._dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.transform = ImageTransform(resolution, center_crop, random_flip, interpolation)
        self.buckets: list[Size] | None = [tuple(b) for b in buckets] if buckets else None
        self._targets = assign_buckets(self.report.sizes, self.buckets) if self.buckets else None
        self.seed = int(seed)
        self.epoch = 0
        self.force_flip: bool | None = None  # None: random per item when random_flip; True/False: forced
        self.random_caption = True  # draw among alternative captions (lists); False: always the first
        self.lazy_skipped: list[tuple[int, str, str]] = []  # (index, name, reason) of decode failures at run time
        self.small_images, self.elongated_images = _unusual_sizes(
            self.report.sizes, [self.target_size(i) for i in range(len(self))]
        )
        self._warn_unusual_sizes()

    def _warn_unusual_sizes(self) -> None:
        """One warning for :attr:`small_images` and one for :attr:`elongated_images`, each with the count and the
        first :data:`_SIZE_EXAMPLES` names and sizes; nothing when there are none. The images stay in."""
        res = self.resolution
        hint = "" if self.buckets else f" (for {res}x{res} crops: a shorter side under {res / SMALL_IMAGE_UPSCALE:g}px)"
        groups = (
            (self.small_images, f"are upscaled more than {SMALL_IMAGE_UPSCALE:g}x to their training size{hint}, "
             "which blurs them"),
            (self.elongated_images, f"have an aspect ratio over {MAX_ASPECT_RATIO:g}:1, so their crop keeps only a "
             "small part of them"),
        )
        for indices, what in groups:
            if not indices:
                continue
            examples = []
            for index in indices[:_SIZE_EXAMPLES]:
                row = self.report.kept_indices[index]
                try:
                    path = _image_ref(self._dataset[row][self.image_column])[0]
                except Exception:
                    path = None
                h, w = self.report.sizes[index]
                examples.append(f"{_display_name(path, row)} ({w}x{h})")
            more = len(indices) - len(examples)
            logger.warning(
                "%d of %d images %s; trained on anyway: %s%s (sizes are width x height)",
                len(indices), len(self), what, ", ".join(examples), f" and {more} more" if more > 0 else "",
            )

    # -- introspection ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.report.num_kept

    @property
    def sizes(self) -> list[Size]:
        """``(h, w)`` of every item's source image (after EXIF rotation), for :class:`BucketBatchSampler`."""
        return list(self.report.sizes)

    @property
    def source_indices(self) -> list[int]:
        return list(self.report.kept_indices)

    @property
    def resolution(self) -> int:
        return self.transform.resolution

    @property
    def center_crop(self) -> bool:
        return self.transform.center_crop

    @property
    def random_flip(self) -> bool:
        return self.transform.random_flip

    def target_size(self, index: int) -> Size:
        """The ``(h, w)`` item ``index`` is cropped to: its bucket, or ``(resolution, resolution)``."""
        if self._targets is not None:
            return self._targets[index]
        return (self.transform.resolution, self.transform.resolution)

    def fingerprint(self) -> str:
        """A hash of the kept items (file path, size and mtime, or embedded bytes; captions): changes with the data."""
        h = hashlib.sha256()
        for row, fp, caption in zip(
            self.report.kept_indices, self.report.fingerprints, self.report.captions, strict=True
        ):
            h.update(json.dumps([row, fp, caption]).encode())
        return h.hexdigest()[:16]

    # -- randomness ----------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's crops / flips / caption choices (accelerate calls this each epoch)."""
        self.epoch = int(epoch)

    def generator_for(self, index: int) -> torch.Generator:
        """The generator of item ``index`` at the current epoch."""
        return torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))

    def with_options(self, *, flip: bool | None = None, random_caption: bool | None = None) -> ImageCaptionDataset:
        """A shallow copy with the flip forced (``True``/``False``) or random (``None``), for caching."""
        clone = copy.copy(self)
        clone.force_flip = flip
        if random_caption is not None:
            clone.random_caption = random_caption
        return clone

    def caption(self, index: int, generator: torch.Generator | None = None) -> str:
        """Item ``index``'s caption; one of a list of alternatives is drawn from ``generator``."""
        caption = self.report.captions[index]
        if isinstance(caption, str):
            return caption
        if self.random_caption and generator is not None and len(caption) > 1:
            return caption[int(torch.randint(0, len(caption), (1,), generator=generator).item())]
        return caption[0]

    # -- items -----------------------------------------------------------------------------------------------------
    def load_image(self, index: int) -> Image.Image:
        """Decode item ``index``'s source image (raises on decode errors)."""
        row = self.report.kept_indices[index]
        return _open_image(self._dataset[row][self.image_column])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        target = self.target_size(index)
        generator = self.generator_for(index)
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            try:
                image = self.load_image(candidate)
            except Exception as e:  # any decode failure falls back to the next item
                row = self.report.kept_indices[candidate]
                try:
                    path = _image_ref(self._dataset[row][self.image_column])[0]
                except Exception:
                    path = None
                reason = _classify_error(e)
                self.lazy_skipped.append((candidate, _display_name(path, row), reason))
                logger.warning(
                    "image %s (row %d) failed to decode (%s); using the next item", path or "<bytes>", row, reason
                )
                continue
            out = self.transform(image, target_size=target, generator=generator, flip=self.force_flip)
            out["caption"] = self.caption(candidate, generator)
            out["index"] = candidate
            return out
        raise RuntimeError("no image of the dataset could be decoded")


def collate_fn(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of items into a batch.

    Tensors are stacked (all must share one shape: use :class:`BucketBatchSampler` with buckets), ``pixel_values``
    as a contiguous float tensor; ``original_size`` / ``crop_top_left`` / ``index`` and other ints or int tuples
    become ``long`` tensors (``[B, 2]`` / ``[B]``); strings (``caption``) stay a list.
    """
    if not examples:
        raise ValueError("empty batch")
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot stack {key!r} of shapes {sorted(shapes)}: batch images of one bucket "
                    "(BucketBatchSampler) or train at a single resolution"
                )
            stacked = torch.stack(values)
            batch[key] = stacked.to(memory_format=torch.contiguous_format).float() if key == "pixel_values" else stacked
        elif isinstance(first, bool) or isinstance(first, str):
            batch[key] = values
        elif isinstance(first, int) or (isinstance(first, (tuple, list)) and all(isinstance(x, int) for x in first)):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Encoding caches
# ----------------------------------------------------------------------------------------------------------------

CACHE_FORMAT_VERSION = 1
_VARIANT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_STALE_TMP_SECONDS = 3600.0


def _canonical_json(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CachedEncodings:
    """Per-item encodings (VAE latents, text embeddings, ...) computed once and stored on disk.

    Entries live in ``cache_dir/<hash>/<variant>/<index>.safetensors``, where ``<hash>`` is a stable hash of
    ``key`` (``json.dumps(sort_keys=True)``; non-JSON values via ``str``), and ``cache_dir/<hash>/key.json`` holds
    the key for humans. So the key must name everything the encodings depend on (model id and revision, dtype,
    resolution, crop and bucket settings, text encoder, data fingerprint): a changed key is a new folder, i.e. a
    miss and a rebuild.

    Safety: every file is written to a temporary name then ``os.replace``-d, so a killed run never leaves a
    half-written entry under a trusted name; every entry stores a sha256 of its tensors plus its key hash, index
    and variant in the safetensors metadata, and :meth:`build` re-reads and checks each one, rebuilding any that
    is missing, truncated or corrupt. Counters (per item, cumulative): ``hits``, ``misses`` (encoded),
    ``rebuilt`` (present but corrupt, hence re-encoded; also counted in ``misses``), ``encode_calls``.

    Multi-process: build on the main process first (``with accelerator.main_process_first(): cache.build(...)``);
    the other ranks then only hit. Concurrent builders are safe (atomic replaces of identical content), only
    wasteful.
    """

    def __init__(self, cache_dir: str | os.PathLike, key: Mapping[str, Any]) -> None:
        self.key = {"_format": CACHE_FORMAT_VERSION, **dict(key)}
        self.key_json = _canonical_json(self.key)
        self.key_hash = hashlib.sha256(self.key_json.encode()).hexdigest()[:20]
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / self.key_hash
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0
        self.encode_calls = 0

    # -- files -----------------------------------------------------------------------------------------------------
    def entry_path(self, index: int, variant: str = "default") -> Path:
        if not _VARIANT_RE.match(variant):
            raise ValueError(f"variant must match {_VARIANT_RE.pattern}, got {variant!r}")
        return self.path / variant / f"{int(index):08d}.safetensors"

    @staticmethod
    def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            write(str(tmp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _prepare(self) -> None:
        key_file = self.path / "key.json"
        if key_file.exists():
            try:
                stored = key_file.read_text()
            except OSError:
                stored = ""
            if stored.strip() != self.key_json:
                logger.warning("cache %s holds another key; rebuilding it", self.path)
                shutil.rmtree(self.path, ignore_errors=True)
        if not key_file.exists():
            self._atomic_write(key_file, lambda tmp: Path(tmp).write_text(self.key_json + "\n"))
        now = time.time()
        for tmp in self.path.rglob(".*.tmp"):  # temporaries of killed runs
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()
            except OSError:
                pass

    def _read(self, index: int, variant: str, verify: bool) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        path = self.entry_path(index, variant)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception:  # truncated / garbage file
            return None
        expected = {"key_hash": self.key_hash, "index": str(int(index)), "variant": variant}
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        if verify and meta.get("sha256") != _tensor_digest(tensors):
            return None
        return tensors

    def _write(self, index: int, variant: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        meta = {
            "key_hash": self.key_hash,
            "index": str(int(index)),
            "variant": variant,
            "sha256": _tensor_digest(tensors),
        }
        self._atomic_write(self.entry_path(index, variant), lambda tmp: save_file(tensors, tmp, metadata=meta))

    # -- API -------------------------------------------------------------------------------------------------------
    def is_valid(self, index: int, variant: str = "default") -> bool:
        """Whether entry ``index`` exists and passes its checks (reads and hashes the file)."""
        return self._read(index, variant, verify=True) is not None

    def build(
        self,
        dataset: torch.utils.data.Dataset,
        encode_fn: Callable[[Any], Mapping[str, torch.Tensor]],
        *,
        batch_size: int = 8,
        collate: Callable[[list[Any]], Any] | None = None,
        variant: str = "default",
        indices: Sequence[int] | None = None,
        group_fn: Callable[[int], Hashable] | None = None,
        num_workers: int = 0,
    ) -> CachedEncodings:
        """Encode every item of ``indices`` (default: all of ``dataset``) that has no valid entry yet.

        Items are batched ``batch_size`` at a time, only with items of the same ``group_fn(index)`` (e.g. the
        bucket, so that images stack), collated with ``collate`` (default :func:`collate_fn`) and passed to
        ``encode_fn(batch) -> {name: tensor [B, ...]}``; row ``j`` of each tensor is item ``j``'s entry.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._prepare()
        indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        missing = []
        for i in indices:
            if self._read(i, variant, verify=True) is not None:
                self.hits += 1
                continue
            if self.entry_path(i, variant).exists():
                self.rebuilt += 1
                logger.warning("cache entry %s is corrupt or incomplete; rebuilding it", self.entry_path(i, variant))
            missing.append(i)
        if not missing:
            return self
        groups: dict[Hashable, list[int]] = {}
        for i in missing:
            groups.setdefault(group_fn(i) if group_fn else None, []).append(i)
        chunks = [items[s : s + batch_size] for items in groups.values() for s in range(0, len(items), batch_size)]
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=chunks, collate_fn=collate or collate_fn, num_workers=num_workers
        )
        for chunk, batch in zip(chunks, loader, strict=True):
            with torch.no_grad():
                out = encode_fn(batch)
            self.encode_calls += 1
            if not isinstance(out, Mapping) or not out:
                raise TypeError(f"encode_fn must return a non-empty dict of tensors, got {type(out).__name__}")
            for name, value in out.items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != len(chunk):
                    raise ValueError(
                        f"encode_fn output {name!r} must be a tensor with a batch dimension of {len(chunk)}, got "
                        f"{getattr(value, 'shape', type(value).__name__)}"
                    )
            for j, i in enumerate(chunk):
                self._write(i, variant, {name: v[j].detach().cpu().contiguous().clone() for name, v in out.items()})
                self.misses += 1
        return self

    def load(self, index: int, variant: str = "default", verify: bool = False) -> dict[str, torch.Tensor]:
        """Entry ``index``'s tensors (``verify=True`` also re-checks the hash). Raises ``KeyError`` if absent/bad."""
        tensors = self._read(index, variant, verify=verify)
        if tensors is None:
            raise KeyError(
                f"no valid cache entry for item {index} ({variant}) in {self.path}: run build() first, or delete "
                "the folder to rebuild"
            )
        return tensors

    def clear(self) -> None:
        """Delete this key's cache folder."""
        shutil.rmtree(self.path, ignore_errors=True)


class CachedImageCaptionDataset(torch.utils.data.Dataset):
    """Items of an :class:`ImageCaptionDataset` with the images replaced by cached encodings.

    Items: the ``encode_fn`` outputs for the item (e.g. ``"latents"``, ``"prompt_embeds"``) plus ``"caption"``,
    ``"original_size"``, ``"crop_top_left"`` and ``"index"``. With ``random_flip`` each item draws its
    orientation per epoch from ``(seed, epoch, index)`` and gets the matching cached variant (the crop offset of a
    flipped item differs, and is stored per variant).
    """

    def __init__(self, dataset: ImageCaptionDataset, cache: CachedEncodings) -> None:
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def sizes(self) -> list[Size]:
        return self.dataset.sizes

    @property
    def buckets(self) -> list[Size] | None:
        return self.dataset.buckets

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        flip = False
        if self.dataset.random_flip:
            flip = bool(torch.rand((), generator=self.dataset.generator_for(index)).item() < 0.5)
        tensors = self.cache.load(index, "flipped" if flip else "plain")
        out: dict[str, Any] = {k: v for k, v in tensors.items() if k not in ("original_size", "crop_top_left")}
        out["caption"] = self.dataset.caption(index)  # alternatives are frozen to the first (as encoded)
        out["original_size"] = tuple(int(x) for x in tensors["original_size"].tolist())
        out["crop_top_left"] = tuple(int(x) for x in tensors["crop_top_left"].tolist())
        out["index"] = index
        return out


def cache_image_encodings(
    dataset: ImageCaptionDataset,
    cache_dir: str | os.PathLike,
    key: Mapping[str, Any],
    encode_fn: Callable[[dict[str, Any]], Mapping[str, torch.Tensor]],
    *,
    batch_size: int = 8,
    num_workers: int = 0,
) -> CachedImageCaptionDataset:
    """Encode ``dataset`` once into a :class:`CachedEncodings` and return a dataset that serves the encodings.

    ``encode_fn`` gets a :func:`collate_fn` batch (``pixel_values``, ``caption``, ...) of one bucket and returns
    ``{name: tensor [B, ...]}`` (latents, text embeddings, ...). ``key`` names the models (ids, revisions, dtype);
    resolution, crop, buckets, interpolation and a fingerprint of the data are added to it. ``random_flip`` is not
    part of the key: orientations are separate variants, so toggling it reuses the plain encodings.

    Raises:
        ValueError: ``dataset`` uses random crops, which a cache would freeze (use ``center_crop=True``, i.e.
            ``--center_crop``, or train without caching).
    """
    if not dataset.center_crop:
        raise ValueError(
            "caching encodings freezes random crops (every epoch would reuse one crop): use --center_crop with "
            "caching, or turn caching off to keep random crops"
        )
    full_key = {
        **dict(key),
        "data": {
            "fingerprint": dataset.fingerprint(),
            "resolution": dataset.resolution,
            "center_crop": True,
            "buckets": dataset.buckets,
            "interpolation": dataset.transform.interpolation,
        },
    }
    cache = CachedEncodings(cache_dir, full_key)

    def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = dict(encode_fn(batch))
        out.setdefault("original_size", batch["original_size"])
        out.setdefault("crop_top_left", batch["crop_top_left"])
        return out

    flips = (False, True) if dataset.random_flip else (False,)
    for flip in flips:
        cache.build(
            dataset.with_options(flip=flip, random_caption=False),
            encode,
            batch_size=batch_size,
            variant="flipped" if flip else "plain",
            group_fn=dataset.target_size,
            num_workers=num_workers,
        )
    return CachedImageCaptionDataset(dataset.with_options(random_caption=False), cache)
