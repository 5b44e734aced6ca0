"""Loading an image-caption ``datasets.Dataset`` from a local imagefolder (``metadata.jsonl`` captions, symlinks
checked) or from the Hub. Images are neither decoded nor checked here (see :mod:`.validation`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets

from .masks import is_mask_file
from .metadata import _check_metadata_jsonl

# One logger for the package, named after it: records keep the name "diffusers_ztsnr.training.data" whichever
# file they come from, so one level set on that name covers all of them.
logger = logging.getLogger(__package__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".pjpeg", ".pjp", ".ppm", ".pgm"}
)
METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


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
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(name)
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

