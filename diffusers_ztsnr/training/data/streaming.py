"""Streaming training data: batches read shard by shard from a :mod:`.shards` source, never held whole.

Order: each epoch the shard list is shuffled from ``seed + epoch`` and process ``rank`` of ``world`` reads shards
``rank::world`` of it, in that order, sample by sample (no sample-level shuffle: write shards already shuffled).
Each sample is transformed as the map-style dataset's items are (:class:`.transforms.ImageTransform`), its random
crop, flip and caption choice drawn from ``(seed, epoch, shard, offset)``.

Batches: a sample goes to the buffer of its bucket (nearest in aspect ratio; one square bucket without
bucketing); a full buffer is a batch. At the end of an epoch the partly filled buffers are emitted as short batches
(in bucket order), so every sample is trained once per epoch. The stream runs epoch after epoch without end: the
run's length is ``--max_train_steps``.

Position: every batch carries the stream's :class:`StreamState` after it (epoch, the next sample to read, and the
samples waiting in bucket buffers). A checkpoint records the state of the last batch trained on; a stream started
from it re-reads only the waiting samples (from their shards) and goes on from the next one, so a resumed run gets
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..arguments import InputError
from .buckets import nearest_bucket
from .dataset import collate_fn
from .images import Size
from .shards import RawSample, StreamError, read_with_retries
from .transforms import ImageTransform, _exif_transposed

logger = logging.getLogger(__package__)


@dataclass
class StreamState:
    """Where a rank's stream stands: ``epoch``; ``cursor`` ``[j, k]``, the next sample to read (sample ``k`` of the
    ``j``-th shard this rank reads this epoch); ``pending``, the ``[j, k]`` of samples read but not yet batched."""

    epoch: int = 0
    cursor: list[int] = field(default_factory=lambda: [0, 0])
    pending: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": list(self.cursor), "pending": [list(p) for p in self.pending]}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StreamState:
        return cls(int(record["epoch"]), [int(v) for v in record["cursor"]], [[int(a), int(b)] for a, b in
                                                                           record["pending"]])


@dataclass
class StreamReport:
    """Samples skipped while streaming (what the run summary lists): ``(name, reason)`` pairs."""

    bad_images: list = field(default_factory=list)
    missing_captions: list = field(default_factory=list)


def _sample_seed(seed: int, epoch: int, shard: int, offset: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{shard}:{offset}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class StreamingImageCaptionDataset(torch.utils.data.IterableDataset):
    """Batches (``collate_fn``'s dicts, plus ``"stream_state"``) streamed from ``source`` for one rank.

    ``source`` has ``names`` (one per shard), ``read(shard, start)`` (its :class:`.shards.RawSample` from offset
    ``start`` on) and ``fingerprint()``. ``state`` is where the stream starts (a checkpoint's, or the beginning).
    """

    def __init__(self, source: Any, *, transform: ImageTransform, batch_size: int, seed: int = 0,
                 buckets: Sequence[Size] | None = None, rank: int = 0, world: int = 1, retries: int = 3) -> None:
        if world > len(source.names):
            raise InputError(f"{len(source.names)} shard(s) for {world} processes: give at least one shard per "
                             "process (--train_data_shards, or the data files of a streamed --dataset_name); rank i "
                             "reads shards i, i + world, ...")
        self.source, self.transform, self.batch_size, self.seed = source, transform, int(batch_size), int(seed)
        self.buckets = [tuple(b) for b in buckets] if buckets else None
        self.rank, self.world, self.retries = rank, world, retries
        self.state = StreamState()
        #: the samples skipped so far, filled by :class:`StreamLoader` in the training process (from a worker's
        #: batches too): ``(name, reason)`` pairs
        self.report = StreamReport()
        self._skipped: list[tuple[str, str, str]] = []  # (kind, name, reason) since the last batch

    @property
    def resolution(self) -> int:
        return self.transform.resolution

    def fingerprint(self) -> str:
        return self.source.fingerprint()

    def shard_order(self, epoch: int) -> list[int]:
        """The shards this rank reads in ``epoch``, in order."""
        order = torch.randperm(len(self.source.names), generator=torch.Generator().manual_seed(self.seed + epoch))
        return order.tolist()[self.rank :: self.world]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        state = StreamState.from_dict(self.state.to_dict())
        yield from self.epoch_batches(state)
        while True:  # whole epochs from here on: one without a batch would loop for ever
            state = StreamState(state.epoch + 1)
            served = False
            for batch in self.epoch_batches(state):
                served = True
                yield batch
            if not served:
                names = [self.source.names[i] for i in self.shard_order(state.epoch)]
                raise StreamError(f"no usable sample in {len(names)} shard(s) ({', '.join(names[:3])}...): every "
                                  "sample lacks a caption or a readable image (see the warnings above)")

    def epoch_batches(self, state: StreamState) -> Iterator[dict[str, Any]]:
        """The batches of ``state.epoch`` from ``state`` on, each with the state after it."""
        order, epoch = self.shard_order(state.epoch), state.epoch
        cursor, waiting = tuple(state.cursor), {tuple(p) for p in state.pending}
        buffers: dict[Size, list[tuple[tuple[int, int], RawSample, Image.Image]]] = {}
        first = min([cursor, *waiting])
        for j in range(first[0], len(order)):
            start = first[1] if j == first[0] else 0
            for sample in read_with_retries(self.source, order[j], start, self.retries):
                where = (j, sample.offset)
                replay = where < cursor
                if replay and where not in waiting:
                    continue  # batched before the checkpoint
                image = self._open(sample, log=not replay)
                if image is None:
                    continue
                bucket = self._bucket(image)
                buffers.setdefault(bucket, []).append((where, sample, image))
                if not replay and len(buffers[bucket]) == self.batch_size:
                    items = buffers.pop(bucket)
                    yield self._batch(epoch, items, [j, sample.offset + 1], buffers)
        for bucket in sorted(buffers):  # the end of the epoch: what is left, as short batches
            items = buffers.pop(bucket)
            yield self._batch(epoch, items, [len(order), 0], buffers)

    def _bucket(self, image: Image.Image) -> Size:
        if self.buckets is None:
            return (self.resolution, self.resolution)
        return nearest_bucket((image.height, image.width), self.buckets)

    def _open(self, sample: RawSample, log: bool) -> Image.Image | None:
        """The sample's image (decoded lazily by PIL), or ``None`` (logged and reported) when it has none, no
        caption, or cannot be read."""
        name = f"{self.source.names[sample.shard]}:{sample.key}"
        if sample.caption is None or (isinstance(sample.caption, list) and not sample.caption):
            if log:
                self._skipped.append(("missing_captions", name, "no caption"))
                logger.warning("sample %s has no caption (.txt or .json); skipped", name)
            return None
        try:
            if sample.image is None:
                raise ValueError("no image file")
            image = Image.open(io.BytesIO(sample.image))
            image.load()
            return _exif_transposed(image)  # buckets by the upright size, as the map-style dataset does
        except Exception as error:  # any decode failure: the sample is skipped, as in the map-style dataset
            if log:
                self._skipped.append(("bad_images", name, f"{type(error).__name__}: {error}"))
                logger.warning("sample %s has no readable image (%s); skipped", name, error)
            return None

    def _batch(self, epoch: int, items: list, cursor: list[int], buffers: dict) -> dict[str, Any]:
        examples = []
        for _, sample, image in items:
            generator = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, sample.shard, sample.offset))
            target = self._bucket(image)
            out = self.transform(image, target_size=target, generator=generator)
            caption = sample.caption
            if isinstance(caption, list):
                pick = int(torch.randint(0, len(caption), (1,), generator=generator).item()) if len(caption) > 1 else 0
                caption = caption[pick]
            out["caption"] = caption
            examples.append(out)
        pending = sorted(where for group in buffers.values() for where, _, _ in group)
        batch = collate_fn(examples)
        batch["stream_state"] = StreamState(epoch, cursor, [list(p) for p in pending]).to_dict()
        batch["stream_skipped"], self._skipped = self._skipped, []
        return batch


def _as_is(batch: Any) -> Any:
    return batch


class StreamLoader:
    """The training loop's view of a stream: iterates the batches (through a ``DataLoader`` so
    ``--dataloader_num_workers`` 1 decodes ahead) and remembers the state of the last batch handed out."""

    def __init__(self, dataset: StreamingImageCaptionDataset, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.position = dataset, dataset.state.to_dict()
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=_as_is,
                                                  num_workers=min(num_workers, 1), pin_memory=pin_memory)
        self.gathered: list[dict[str, Any]] = [self.position]

    def set_epoch(self, epoch: int) -> None:
        """No-op: the stream counts its own epochs (the loop runs it as one endless epoch)."""

    def start_at(self, state: dict[str, Any]) -> None:
        self.dataset.state = StreamState.from_dict(state)
        self.position = self.dataset.state.to_dict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.position = batch.pop("stream_state")
            for kind, name, reason in batch.pop("stream_skipped"):
                getattr(self.dataset.report, kind).append((name, reason))
            yield batch

    def gather(self, accelerator: Any) -> None:
        """Collect every rank's position (a collective call: every rank calls it before a checkpoint)."""
        if accelerator.num_processes == 1:
            self.gathered = [self.position]
            return
        from accelerate.utils import gather_object

        self.gathered = list(gather_object([self.position]))
