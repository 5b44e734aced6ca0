"""Serving an :class:`~.dataset.ImageCaptionDataset` from cached encodings: the dataset that reads them, and the
function that builds the cache (both orientations when flips are random; random crops refused)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .cache import CachedEncodings
from .dataset import ImageCaptionDataset
from .images import Size
from .masks import latent_mask


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
    resolution, crop, buckets, interpolation and a fingerprint of the data (its loss masks included) are added to it.
    A batch's ``loss_mask`` is stored averaged to the grid of its ``latents``. ``random_flip`` is not
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
        if "loss_mask" in batch and "latents" in out:  # stored on the latent grid, beside the latents
            out["loss_mask"] = latent_mask(batch["loss_mask"], out["latents"]).cpu()
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
