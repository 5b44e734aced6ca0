"""DreamBooth prior preservation (Ruiz et al. 2023): every training item carries a class item beside it.

The class images are the base model's own samples of the class prompt; training on them beside the instance images
keeps the model's prior of the class while it learns the instance. Each batch holds ``B`` instance items and, under
``"prior"``, ``B`` class items (diffusers' ``train_dreambooth_lora.py`` stacks the two; here they stay two batches,
so instance images in an aspect-ratio bucket and square class images never have to share one tensor shape).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from .dataset import collate_fn
from .images import Size
from .loading import IMAGE_EXTENSIONS
from .masks import is_mask_file


def class_image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (sorted by name; none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(p.name))


def class_image_dataset(files: Sequence[Path], class_prompt: str) -> datasets.Dataset:
    """The class images as an image-caption ``datasets.Dataset`` (column ``image``; ``text``: the class prompt)."""
    table = {"image": [str(f) for f in files], "text": [class_prompt] * len(files)}
    return datasets.Dataset.from_dict(table).cast_column("image", datasets.Image(decode=False))


class PriorPreservationDataset(torch.utils.data.Dataset):
    """The instance dataset with a class item beside each item, under ``"prior"``.

    Item ``i`` of epoch ``e`` gets class item ``(i + e * len(instance)) % len(class)``: every class image is used in
    turn over the epochs, even when there are far more class than instance images (diffusers' usual 100 class
    images for 5 instance images). Sizes and buckets (for :class:`~.buckets.BucketBatchSampler`) are the instance
    set's; collate batches with :meth:`collate`.
    """

    def __init__(self, instance: Any, classes: Any) -> None:
        if len(classes) == 0:
            raise ValueError("prior preservation needs at least one class image")
        self.instance = instance
        self.classes = classes
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.instance)

    @property
    def sizes(self) -> list[Size]:
        return self.instance.sizes

    @property
    def buckets(self) -> list[Size] | None:
        return self.instance.buckets

    @property
    def targets(self) -> list[Size] | None:
        """The instance items' training sizes when they are given per item (several datasets), else ``None``."""
        return getattr(self.instance, "targets", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.instance.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def class_index(self, index: int) -> int:
        return (int(index) + self.epoch * len(self.instance)) % len(self.classes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.instance[index])
        item["prior"] = self.classes[self.class_index(index)]
        return item

    @staticmethod
    def collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """:func:`collate_fn` of the instance items, with their class items collated under ``"prior"``."""
        batch = collate_fn([{k: v for k, v in e.items() if k != "prior"} for e in examples])
        batch["prior"] = collate_fn([e["prior"] for e in examples])
        return batch
