"""Several datasets trained as one, each repeated a number of times per epoch (sd-scripts' ``num_repeats``).

An epoch of :class:`RepeatedDatasets` serves every item of dataset ``d`` exactly ``repeats[d]`` times (with plain
batches; a bucket sampler's top-up of a bucket's last batch adds a few). Each repeat of an item draws its own crop,
flip and caption: repeat ``k`` of epoch ``e`` is drawn as the dataset's epoch ``e * repeats + k``. Datasets may
have their own resolution: :attr:`targets` gives every item's training size, and batches must group by it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .images import Size


@dataclass
class CombinedReport:
    """The skipped images and captions of every dataset (what the run summary lists)."""

    bad_images: list = field(default_factory=list)
    missing_captions: list = field(default_factory=list)


class RepeatedDatasets(torch.utils.data.Dataset):
    """``parts`` (image-caption datasets, or their cached encodings) served as one, part ``d`` ``repeats[d]`` times.

    Index ``k`` maps to ``(part, repeat, item)`` in order: part 0's items repeat 0, then repeat 1, ..., then part 1.
    """

    def __init__(self, parts: Sequence[Any], repeats: Sequence[int]) -> None:
        if len(parts) != len(repeats) or not parts:
            raise ValueError("give one repeat count per dataset, and at least one dataset")
        if any(int(r) < 1 for r in repeats):
            raise ValueError(f"repeats must be >= 1, got {list(repeats)}")
        self.parts, self.repeats = list(parts), [int(r) for r in repeats]
        self.epoch = 0
        self._map = [(p, k, i) for p, (part, r) in enumerate(zip(self.parts, self.repeats, strict=True))
                     for k in range(r) for i in range(len(part))]

    def with_parts(self, parts: Sequence[Any]) -> RepeatedDatasets:
        """The same repeats over other parts (e.g. each part's cached encodings)."""
        return RepeatedDatasets(parts, self.repeats)

    def __len__(self) -> int:
        return len(self._map)

    def locate(self, index: int) -> tuple[int, int, int]:
        """``(part, repeat, item)`` of index ``index``."""
        return self._map[int(index)]

    @property
    def sizes(self) -> list[Size]:
        return [self.parts[p].sizes[i] for p, _, i in self._map]

    @property
    def buckets(self) -> None:
        return None  # items are grouped by :attr:`targets`

    @property
    def targets(self) -> list[Size]:
        """Every item's training ``(h, w)`` (its dataset's bucket or square), for grouping batches."""
        return [self._image_set(p).target_size(i) for p, _, i in self._map]

    def _image_set(self, p: int) -> Any:
        part = self.parts[p]
        return getattr(part, "dataset", part)  # a cached part wraps its image-caption dataset

    @property
    def report(self) -> CombinedReport:
        report = CombinedReport()
        for p in range(len(self.parts)):
            part_report = self._image_set(p).report
            report.bad_images += list(part_report.bad_images)
            report.missing_captions += list(part_report.missing_captions)
        return report

    def fingerprint(self) -> str:
        """A hash of every part's fingerprint, resolution and repeats: changes with any of them."""
        record = [[self._image_set(p).fingerprint(), self._image_set(p).resolution, r]
                  for p, r in enumerate(self.repeats)]
        return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p, k, i = self.locate(index)
        part = self.parts[p]
        part.set_epoch(self.epoch * self.repeats[p] + k)  # each repeat draws its own crop, flip and caption
        return part[i]
