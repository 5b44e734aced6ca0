"""Sample sources for streaming: webdataset-style tar shards (local paths or http(s) URLs) and ``datasets``
streaming datasets, read shard by shard, with retries. http(s) URLs are read with ``urllib`` as a stream; other
URL schemes (``s3://``, ``gs://``, ``file://``) through ``fsspec``.

A tar shard follows the webdataset convention: the files of one sample share a key, the path up to the first dot
of the file name (``a/0001.jpg`` and ``a/0001.txt`` are sample ``a/0001``); the files of a sample are adjacent in
the tar. A sample holds one image (``jpg``, ``jpeg``, ``png``, ``webp``, ...) and a caption: a ``txt`` file (UTF-8)
or a ``json`` object whose caption key (``--caption_column``, else ``caption`` or ``text``) is a string or a list
of alternatives. Every sample is named by ``(shard, offset)``: the shard's position in the expanded shard list and
the sample's position in the shard.

A tar that ends without its end-of-archive blocks is truncated (``tarfile`` would end such a stream silently at a
member boundary); that, a read error or an HTTP error is retried (``retries`` more times, with a short backoff)
from the sample where it stopped, then raised as :class:`StreamError` naming the shard: never a short epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..arguments import InputError
from .loading import IMAGE_EXTENSIONS

logger = logging.getLogger(__package__)

#: seconds before retry ``n`` (1-based) of a failed shard: ``BACKOFF_SECONDS * 2 ** (n - 1)``
BACKOFF_SECONDS = 0.5
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_TAR_END = 1024  # two zero blocks end a tar archive


class StreamError(InputError):
    """A shard could not be read after its retries (the message names it; the scripts print it as one line)."""


@dataclass
class RawSample:
    """One sample as stored: its ``(shard, offset)``, key, encoded image bytes and caption (``None``: none)."""

    shard: int
    offset: int
    key: str
    image: bytes | None
    caption: str | list[str] | None


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand ``{000000..000009}`` ranges (zero padding kept, several ranges multiply) in one spec or each of a
    list; ``"a-{0..2}.tar"`` -> ``a-0.tar, a-1.tar, a-2.tar``."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in specs:
        match = _BRACES.search(item)
        if match is None:
            out.append(item)
            continue
        low, high = match.group(1), match.group(2)
        if int(high) < int(low):
            raise InputError(f"--train_data_shards {item!r}: the range {{{low}..{high}}} runs backwards")
        width = len(low) if low.startswith("0") else 0
        for n in range(int(low), int(high) + 1):
            out += expand_shards(item[: match.start()] + str(n).zfill(width) + item[match.end():])
    return out


def is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def _fsspec_url(name: str) -> bool:
    """Another scheme (``s3://``, ``gs://``, ``file://``, ...): read through ``fsspec`` (installed with datasets)."""
    return "://" in name and not is_url(name)


def shard_size(name: str, timeout: float = 30.0) -> int:
    """A shard's size in bytes: the local file's, the HTTP ``Content-Length`` of a HEAD request (-1 unknown), or
    what ``fsspec`` reports for other schemes."""
    if _fsspec_url(name):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(name)
            return int(fs.size(path))
        except (OSError, ValueError) as error:
            raise InputError(f"--train_data_shards {name}: {error}") from None
    if not is_url(name):
        try:
            return Path(name).expanduser().stat().st_size
        except OSError as error:
            raise InputError(f"--train_data_shards {name}: {error.strerror or error}") from None
    request = urllib.request.Request(name, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only
            return int(response.headers.get("Content-Length", -1))
    except urllib.error.HTTPError as error:
        if error.code in (405, 501):  # a server without HEAD: the size stays unknown, the name still counts
            return -1
        raise InputError(f"--train_data_shards {name}: {error}") from None
    except OSError as error:
        raise InputError(f"--train_data_shards {name}: {error}") from None


def _open(name: str, timeout: float = 60.0) -> BinaryIO:
    if _fsspec_url(name):
        import fsspec

        return fsspec.open(name, "rb").open()
    if is_url(name):
        return urllib.request.urlopen(name, timeout=timeout)  # noqa: S310 - http(s) only (is_url)
    return open(Path(name).expanduser(), "rb")


class _CountingReader:
    """A read-only stream that counts the bytes it returns (to find a tar's end-of-archive blocks)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data

    def drained(self) -> int:
        while self.read(1 << 16):
            pass
        return self.count


def _caption_of(files: dict[str, bytes], caption_column: str) -> str | list[str] | None:
    if "txt" in files:
        return files["txt"].decode("utf-8").strip()
    if "json" in files:
        record = json.loads(files["json"].decode("utf-8"))
        for key in (caption_column, "caption", "text"):
            if isinstance(record, dict) and isinstance(record.get(key), (str, list)):
                return record[key]
    return None


def _image_of(files: dict[str, bytes]) -> bytes | None:
    for ext, data in files.items():
        if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS and not ext.endswith("masklabel.png"):
            return data
    return None


def _split_name(path: str) -> tuple[str, str]:
    folder, _, base = path.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar(name: str, shard: int, caption_column: str) -> Iterator[RawSample]:
    """Every sample of tar shard ``name`` in order; raises ``tarfile.ReadError`` on a truncated archive."""
    with _open(name) as raw:
        reader = _CountingReader(raw)
        tar = tarfile.open(fileobj=reader, mode="r|*")
        key, files, offset = None, {}, 0
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _split_name(member.name)
            if key is not None and member_key != key:
                yield RawSample(shard, offset, key, _image_of(files), _caption_of(files, caption_column))
                offset, files = offset + 1, {}
            key = member_key
            files[ext] = tar.extractfile(member).read()
        end = tar.offset
        if reader.drained() < end + _TAR_END:
            raise tarfile.ReadError(f"truncated after {end} bytes (no end-of-archive blocks)")
        if key is not None:
            yield RawSample(shard, offset, key, _image_of(files), _caption_of(files, caption_column))


class TarShards:
    """Webdataset-style tar shards: ``names`` (expanded paths or URLs), read with :func:`iter_tar`."""

    def __init__(self, names: Sequence[str], caption_column: str = "text") -> None:
        if not names:
            raise InputError("--train_data_shards names no shard")
        self.names, self.caption_column = list(names), caption_column

    def read(self, shard: int, start: int) -> Iterator[RawSample]:
        for sample in iter_tar(self.names[shard], shard, self.caption_column):
            if sample.offset >= start:
                yield sample

    def fingerprint(self) -> str:
        """A hash of the shard names (local paths resolved) and sizes (file size or HTTP Content-Length): the
        contents are not read."""
        record = [[n if "://" in n else str(Path(n).expanduser().resolve()), shard_size(n)] for n in self.names]
        return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]


class HubStream:
    """A ``datasets`` streaming dataset (``load_dataset(..., streaming=True)``), its ``n_shards`` as the shards."""

    def __init__(self, name: str, config: str | None, split: str, image_column: str, caption_column: str,
                 cache_dir: str | None = None) -> None:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split, streaming=True, cache_dir=cache_dir)
        columns = list(dataset.column_names or [])
        for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
            if columns and column not in columns:
                raise InputError(f"{flag} {column!r} is not a column of --dataset_name {name!r}; available columns: "
                                 f"{columns}. Pass {flag} <name>.")
        if isinstance(dataset.features.get(image_column) if dataset.features else None, datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.name, self.config, self.split = dataset, name, config, split
        self.image_column, self.caption_column = image_column, caption_column
        self.names = [f"{name}[shard {i}]" for i in range(dataset.n_shards)]

    def read(self, shard: int, start: int) -> Iterator[RawSample]:
        part = self.dataset.shard(num_shards=len(self.names), index=shard)
        for offset, row in enumerate(part):
            if offset >= start:
                yield RawSample(shard, offset, str(offset), _row_image(row[self.image_column]),
                                row.get(self.caption_column))

    def fingerprint(self) -> str:
        """A hash of the name, config and split, and of a local folder's file names and sizes."""
        record: list[Any] = [self.name, self.config, self.split]
        folder = Path(self.name).expanduser()
        if folder.is_dir():
            record += sorted([str(p.relative_to(folder)), p.stat().st_size] for p in folder.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]


def _row_image(cell: Any) -> bytes | None:
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path") and os.path.isfile(cell["path"]):
            return Path(cell["path"]).read_bytes()
    return cell if isinstance(cell, bytes) else None


def read_with_retries(source: Any, shard: int, start: int, retries: int) -> Iterator[RawSample]:
    """``source.read(shard, start)``, reopened after a failure at the next sample it owes, up to ``retries`` times
    (backoff :data:`BACKOFF_SECONDS`, doubling); then :class:`StreamError` naming the shard and the error."""
    failures = 0
    while True:
        try:
            for sample in source.read(shard, start):
                start = sample.offset + 1
                yield sample
            return
        except (OSError, tarfile.TarError, EOFError, ValueError) as error:
            failures += 1
            reason = f"{type(error).__name__}: {error}"
            if failures > retries:
                raise StreamError(f"shard {source.names[shard]} failed at sample {start} after {failures} tries "
                                  f"({reason}); fix or remove the shard, or raise --stream_retries") from None
            logger.warning("shard %s failed at sample %d (%s); retry %d of %d", source.names[shard], start,
                           reason, failures, retries)
            time.sleep(BACKOFF_SECONDS * 2 ** (failures - 1))
