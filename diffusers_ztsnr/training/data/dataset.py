"""The torch dataset of validated image-caption items, and the collate function that stacks them into a batch.
Every random choice of an item comes from a generator seeded with ``(seed, epoch, index)``."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import datasets
import torch
from PIL import Image

from ..arguments import InputError
from .buckets import assign_buckets
from .images import Size, _classify_error, _display_name, _image_ref, _open_image
from .masks import find_masks
from .transforms import ImageTransform
from .validation import ValidationReport, validate_image_caption_dataset

# One logger for the package, named after it: records keep the name "diffusers_ztsnr.training.data" whichever
# file they come from, so one level set on that name covers all of them.
logger = logging.getLogger(__package__)

SMALL_IMAGE_UPSCALE = 4.0  # images upscaled more than this to cover their training size are warned about
MAX_ASPECT_RATIO = 4.0  # images longer than this many times their other side are warned about
_SIZE_EXAMPLES = 5  # images named in those warnings before "... and N more"


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

    Loss masks (``masks=True``: ``<stem>-masklabel.png`` beside each image; ``mask_column``: a column of mask
    images; :mod:`.masks`) are checked up front (present, readable, their image's size) and served as
    ``"loss_mask"`` ``[1, h, w]`` in [0, 1], transformed exactly as their image.

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
        masks: bool = False,
        mask_column: str | None = None,
    ) -> None:
        self.report = report or validate_image_caption_dataset(
            dataset, image_column, caption_column, mode=validation, num_workers=num_workers
        )
        for column in (image_column, mask_column):
            if column is not None and isinstance(dataset.features.get(column), datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self._dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        #: every kept item's loss-mask cell (``masks`` / ``mask_column``; :mod:`.masks`), else ``None``
        self.masks: list[Any] | None = None
        self._mask_fingerprints: list[str] = []
        if masks or mask_column:
            self.masks, self._mask_fingerprints = self._find_masks(dataset, mask_column)
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

    def _find_masks(self, dataset: datasets.Dataset, mask_column: str | None) -> tuple[list[Any], list[str]]:
        if mask_column is not None and mask_column not in dataset.column_names:
            raise InputError(f"--mask_column {mask_column!r} is not a column of the dataset (columns: "
                             f"{dataset.column_names}); in a metadata.jsonl name each mask under "
                             f"\"{mask_column}_file_name\"")
        rows = self.report.kept_indices
        image_cells = list(self._dataset[self.image_column])  # one column read, not one read per row
        images = [image_cells[row] for row in rows]
        cells = None
        if mask_column:
            mask_cells = list(dataset[mask_column])
            cells = [mask_cells[row] for row in rows]
        return find_masks(images, cells, rows, self.report.sizes)

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
        """A hash of the kept items (file path, size and mtime, or embedded bytes; captions; loss masks when used):
        changes with the data."""
        h = hashlib.sha256()
        for row, fp, caption in zip(
            self.report.kept_indices, self.report.fingerprints, self.report.captions, strict=True
        ):
            h.update(json.dumps([row, fp, caption]).encode())
        for fp in self._mask_fingerprints:  # none without masks: the fingerprint of unmasked data is unchanged
            h.update(json.dumps(["mask", fp]).encode())
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
            mask = _open_image(self.masks[candidate]) if self.masks is not None else None
            out = self.transform(image, target_size=target, generator=generator, flip=self.force_flip, mask=mask)
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

