"""Aspect-ratio buckets: bucket sizes for a resolution, the nearest bucket of an image, and a batch sampler whose
batches hold one bucket each, shuffled from ``seed + epoch``. Sizes are ``(height, width)``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from .images import Size


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
    ``targets``, every item's training ``(h, w)`` given directly, groups by it instead (several datasets at several
    resolutions).

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
        targets: Sequence[Size] | None = None,
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
        if targets is not None:  # each item's training size given (several datasets at several resolutions)
            self.item_buckets = [tuple(t) for t in targets]
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

