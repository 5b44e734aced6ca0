"""An on-disk cache of per-item encodings (VAE latents, text embeddings, ...): one safetensors file per item under a
folder named by a hash of everything the encodings depend on, written atomically and checked by a stored sha256."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .dataset import collate_fn

# One logger for the package, named after it: records keep the name "diffusers_ztsnr.training.data" whichever
# file they come from, so one level set on that name covers all of them.
logger = logging.getLogger(__package__)

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


def _batches_by_group(
    indices: Sequence[int], batch_size: int, group_fn: Callable[[int], Hashable] | None
) -> list[list[int]]:
    """``indices`` grouped by ``group_fn`` (in order of first appearance), each group cut into ``batch_size`` runs."""
    groups: dict[Hashable, list[int]] = {}
    for i in indices:
        groups.setdefault(group_fn(i) if group_fn else None, []).append(i)
    return [items[s : s + batch_size] for items in groups.values() for s in range(0, len(items), batch_size)]


def _check_encoded(out: Any, batch_size: int) -> None:
    """Raise unless ``out`` is a non-empty dict of tensors with a batch dimension of ``batch_size``."""
    if not isinstance(out, Mapping) or not out:
        raise TypeError(f"encode_fn must return a non-empty dict of tensors, got {type(out).__name__}")
    for name, value in out.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch_size:
            raise ValueError(
                f"encode_fn output {name!r} must be a tensor with a batch dimension of {batch_size}, got "
                f"{getattr(value, 'shape', type(value).__name__)}"
            )


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
        missing = self._missing(indices, variant)
        if not missing:
            return self
        chunks = _batches_by_group(missing, batch_size, group_fn)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=chunks, collate_fn=collate or collate_fn, num_workers=num_workers
        )
        for chunk, batch in zip(chunks, loader, strict=True):
            with torch.no_grad():
                out = encode_fn(batch)
            self.encode_calls += 1
            _check_encoded(out, len(chunk))
            for j, i in enumerate(chunk):
                self._write(i, variant, {name: v[j].detach().cpu().contiguous().clone() for name, v in out.items()})
                self.misses += 1
        return self

    def _missing(self, indices: Sequence[int], variant: str) -> list[int]:
        """The items of ``indices`` without a valid entry (counting hits, and corrupt entries as ``rebuilt``)."""
        missing = []
        for i in indices:
            if self._read(i, variant, verify=True) is not None:
                self.hits += 1
                continue
            if self.entry_path(i, variant).exists():
                self.rebuilt += 1
                logger.warning("cache entry %s is corrupt or incomplete; rebuilding it", self.entry_path(i, variant))
            missing.append(i)
        return missing

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
