"""Image-caption data: loading, validation of bad files, transforms, bucketing and encoding caches."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ztsnr.training.data import (
    BucketBatchSampler,
    CachedEncodings,
    ImageCaptionDataset,
    ImageTransform,
    cache_image_encodings,
    collate_fn,
    image_to_tensor,
    load_image_caption_dataset,
    make_buckets,
    nearest_bucket,
    resize_and_crop,
    to_rgb,
    validate_image_caption_dataset,
)

LOGGER = "diffusers_ztsnr.training.data"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _rgb(w: int = 40, h: int = 30, color: tuple[int, int, int] = (10, 20, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _write_folder(root: Path, files: dict[str, Image.Image | bytes], captions: dict[str, object] | None = None) -> Path:
    """Write images (PIL or raw bytes) and a metadata.jsonl (caption "a photo of <name>" unless given)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            content.save(root / name)
    captions = captions if captions is not None else {name: f"a photo of {name}" for name in files}
    with open(root / "metadata.jsonl", "w") as f:
        for name, caption in captions.items():
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return root


def _from_files(
    tmp_path: Path, files: dict[str, Image.Image | bytes], captions: list | None = None
) -> datasets.Dataset:
    """A datasets.Dataset with an Image column over files written to tmp_path (faster than imagefolder)."""
    root = tmp_path / "files"
    root.mkdir(exist_ok=True)
    paths = []
    for name, content in files.items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            content.save(root / name)
        paths.append(str(root / name))
    captions = captions if captions is not None else [f"caption {name}" for name in files]
    return datasets.Dataset.from_dict({"image": paths, "text": captions}).cast_column("image", datasets.Image())


def _gradient(w: int, h: int) -> Image.Image:
    """Red = 4 * column, green = 4 * row."""
    x = np.arange(w, dtype=np.uint8)[None, :].repeat(h, 0) * 4
    y = np.arange(h, dtype=np.uint8)[:, None].repeat(w, 1) * 4
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1), "RGB")


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return ((t + 1) * 127.5).round().to(torch.int64).numpy()


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def test_imagefolder_with_metadata_loads_captions(tmp_path):
    folder = _write_folder(tmp_path / "data", {f"{i}.png": _rgb(color=(i * 60, 0, 0)) for i in range(3)})
    ds = load_image_caption_dataset(train_data_dir=folder, cache_dir=tmp_path / "hf")
    assert len(ds) == 3 and set(ds.column_names) >= {"image", "text"}
    assert sorted(ds["text"]) == ["a photo of 0.png", "a photo of 1.png", "a photo of 2.png"]

    items = ImageCaptionDataset(ds, resolution=16, num_workers=1)
    item = items[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert item["caption"].startswith("a photo of") and item["original_size"] == (30, 40)

    # the Hub code path (datasets.load_dataset(name, config)) also accepts a local folder as the name
    by_name = load_image_caption_dataset(dataset_name=str(folder), cache_dir=tmp_path / "hf")
    assert sorted(by_name["text"]) == sorted(ds["text"])


def test_load_errors_are_clear(tmp_path):
    folder = _write_folder(tmp_path / "data", {"a.png": _rgb()})
    with pytest.raises(ValueError, match="exactly one of --train_data_dir"):
        load_image_caption_dataset()
    with pytest.raises(ValueError, match="exactly one of --train_data_dir"):
        load_image_caption_dataset(train_data_dir=folder, dataset_name="x/y")
    with pytest.raises(ValueError, match="not a directory"):
        load_image_caption_dataset(train_data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match=r"--caption_column 'caption'.*available columns: \['image', 'text'\]"):
        load_image_caption_dataset(train_data_dir=folder, caption_column="caption", cache_dir=tmp_path / "hf")
    with pytest.raises(ValueError, match=r"--image_column 'img'.*\['image', 'text'\]"):
        load_image_caption_dataset(train_data_dir=folder, image_column="img", cache_dir=tmp_path / "hf")

    bare = tmp_path / "bare"
    bare.mkdir()
    _rgb().save(bare / "a.png")
    with pytest.raises(ValueError, match=r'no metadata.jsonl.*\{"file_name": "0001.png", "text": '):
        load_image_caption_dataset(train_data_dir=bare)
    (bare / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_image_caption_dataset(train_data_dir=bare)
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="no image files"):
        load_image_caption_dataset(train_data_dir=no_images)


# ---------------------------------------------------------------------------------------------------------------
# modes and value range
# ---------------------------------------------------------------------------------------------------------------


def test_every_mode_becomes_rgb_with_the_right_range(tmp_path):
    white16 = Image.fromarray(np.full((30, 40), 65535, np.uint16))
    black16 = Image.fromarray(np.zeros((30, 40), np.uint16))
    assert white16.mode == "I;16"
    mid16 = Image.fromarray(np.full((30, 40), 128 * 257, np.uint16))
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 20, 30))  # left half opaque black, right half transparent
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 0
    files = {
        "white16.png": white16,
        "black16.png": black16,
        "mid16.tif": mid16,
        "rgba.png": rgba,
        "la.png": Image.new("LA", (40, 30), (0, 0)),  # fully transparent -> white
        "l.png": Image.new("L", (40, 30), 64),
        "p.png": palette,
        "p_transparent.png": palette_t,
        "cmyk.tif": Image.new("CMYK", (40, 30), (0, 0, 0, 255)),  # full black ink
        "one_bit.png": Image.new("1", (40, 30), 1),
    }
    ds = ImageCaptionDataset(_from_files(tmp_path, files), resolution=30, num_workers=1)
    assert len(ds) == len(files)
    out = {name: ds[i]["pixel_values"] for i, name in enumerate(files)}
    for name, t in out.items():
        assert t.shape == (3, 30, 30), name
        assert t.min() >= -1 and t.max() <= 1, name
    assert torch.all(out["white16.png"] == 1) and torch.all(out["black16.png"] == -1)
    assert np.all(_to_uint8(out["mid16.tif"]) == 128)
    # RGBA composited on white: center crop (left 5) keeps columns 5..34; 5..19 were opaque black
    rgba_t = _to_uint8(out["rgba.png"])
    assert np.all(rgba_t[:, :, :15] == 0) and np.all(rgba_t[:, :, 15:] == 255)
    assert np.all(_to_uint8(out["la.png"]) == 255)
    assert np.all(_to_uint8(out["l.png"]) == 64)
    assert np.all(_to_uint8(out["p.png"])[:, 0, 0] == [255, 0, 0])
    assert np.all(_to_uint8(out["p_transparent.png"]) == 255)
    assert np.all(_to_uint8(out["cmyk.tif"]) == 0)
    assert np.all(_to_uint8(out["one_bit.png"]) == 255)

    # 32-bit integer and float modes, directly
    assert np.all(np.asarray(to_rgb(Image.new("I", (4, 4), 65535))) == 255)
    assert np.all(np.asarray(to_rgb(Image.new("F", (4, 4), 1.0))) == 255)
    assert np.all(np.asarray(to_rgb(Image.new("F", (4, 4), 0.5))) == 128)
    assert torch.all(image_to_tensor(Image.new("RGB", (2, 2), (255, 0, 255)))[1] == -1)


def test_exif_rotation_is_applied_to_sizes_and_pixels(tmp_path):
    image = _rgb(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    ds = ImageCaptionDataset(_from_files(tmp_path, {"rot.jpg": path.read_bytes()}), resolution=10, num_workers=1)
    assert ds.sizes == [(40, 30)] and ds[0]["original_size"] == (40, 30)


# ---------------------------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------------------------


def _bad_files() -> dict[str, bytes]:
    good = _png_bytes(Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)))
    return {"truncated.png": good[: len(good) // 2], "zero.jpg": b"", "text.png": b"this is not an image\n"}


def test_bad_images_are_skipped_and_counted_up_front(tmp_path, caplog):
    files = {f"good{i}.png": _rgb(color=(i, i, i)) for i in range(3)}
    files.update(_bad_files())
    folder = _write_folder(tmp_path / "data", files)
    raw = load_image_caption_dataset(train_data_dir=folder, cache_dir=tmp_path / "hf")
    assert len(raw) == 6
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageCaptionDataset(raw, resolution=16, num_workers=2)
    assert len(ds) == 3
    reasons = {name: reason for _row, name, reason in ds.report.bad_images}
    assert reasons == {"truncated.png": "truncated", "zero.jpg": "empty file", "text.png": "not an image"}
    summary = ds.report.summary()
    assert "skipped 3 of 6 images:" in summary
    for text in ("truncated.png (truncated)", "zero.jpg (empty file)", "text.png (not an image)"):
        assert text in summary and text in caplog.text
    assert str(folder / "zero.jpg") in caplog.text  # per-file warnings name the full path
    assert {ds[i]["caption"] for i in range(len(ds))} == {f"a photo of good{i}.png" for i in range(3)}


def test_header_validation_falls_back_lazily(tmp_path, caplog):
    files = {"good0.png": _rgb(), "truncated.png": _bad_files()["truncated.png"], "good1.png": _rgb()}
    raw = _from_files(tmp_path, files)
    ds = ImageCaptionDataset(raw, resolution=16, validation="header", num_workers=1)
    assert len(ds) == 3  # a header parse does not see the truncation...
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        item = ds[1]  # ...the item does: it warns and serves the next valid item instead
    assert item["index"] == 2 and item["pixel_values"].shape == (3, 16, 16)
    assert ds.lazy_skipped == [(1, "truncated.png", "truncated")]
    assert "truncated.png" in caplog.text
    # full validation catches it up front
    assert len(ImageCaptionDataset(raw, resolution=16, num_workers=1)) == 2


def test_all_bad_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no usable image.*skipped 3 of 3 images"):
        ImageCaptionDataset(_from_files(tmp_path, _bad_files()), resolution=16, num_workers=1)


def test_missing_captions_skip_rows_or_fail_when_all_missing(tmp_path, caplog):
    files = {f"{i}.png": _rgb() for i in range(4)}
    raw = _from_files(tmp_path, files, captions=["one", None, "", "four"])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageCaptionDataset(raw, resolution=8, num_workers=1)
    assert len(ds) == 3 and ds.source_indices == [0, 2, 3]
    assert ds.report.missing_captions == [(1, "1.png")]
    assert "skipped 1 of 4 rows without a caption: 1.png" in caplog.text
    assert ds[1]["caption"] == ""  # an empty caption is a valid (unconditional) caption

    # a list of strings is a set of alternative captions (an empty list is no caption)
    paths = [str(tmp_path / "files" / f"{i}.png") for i in range(2)]
    alts = datasets.Dataset.from_dict({"image": paths, "text": [["alt a", "alt b"], []]})
    alt_ds = ImageCaptionDataset(alts, resolution=8, num_workers=1)
    assert len(alt_ds) == 1 and alt_ds.report.missing_captions == [(1, "1.png")]
    assert {alt_ds.caption(0, torch.Generator().manual_seed(s)) for s in range(20)} == {"alt a", "alt b"}
    assert alt_ds.with_options(random_caption=False).caption(0, torch.Generator()) == "alt a"

    none = datasets.Dataset.from_dict({"image": [str(tmp_path / "files" / "0.png")] * 2, "text": [None, None]})
    with pytest.raises(ValueError, match="--caption_column"):
        ImageCaptionDataset(none, resolution=8, num_workers=1)
    with pytest.raises(ValueError, match=r"--caption_column 'caption'.*\['image', 'text'\]"):
        validate_image_caption_dataset(none, caption_column="caption")


# ---------------------------------------------------------------------------------------------------------------
# crops, flips, randomness
# ---------------------------------------------------------------------------------------------------------------


def test_center_crop_takes_the_center_and_flip_mirrors():
    image = _gradient(40, 30)  # shorter side 30 == resolution: no resize, crop columns 5..34
    out = ImageTransform(30, center_crop=True)(image)
    px = _to_uint8(out["pixel_values"])
    assert out["original_size"] == (30, 40) and out["crop_top_left"] == (0, 5)
    assert px[0, 0, 0] == 20 and px[0, 0, -1] == 4 * 34 and px[1, -1, 0] == 4 * 29

    flipped = ImageTransform(30, center_crop=True, random_flip=True)(image, flip=True)
    assert torch.equal(flipped["pixel_values"], out["pixel_values"].flip(-1))
    assert flipped["crop_top_left"] == (0, 40 - 5 - 30)

    tall = resize_and_crop(_gradient(30, 40), (30, 30))  # 30 wide, 40 tall: rows 5..34
    assert tall[1] == (5, 0)
    resized, top_left = resize_and_crop(_gradient(40, 30), (15, 15), interpolation="bicubic")
    assert resized.size == (15, 15) and top_left == (0, 2)  # 40x30 -> 20x15, left = round(2.5) = 2


def test_random_crops_and_flips_are_reproducible(tmp_path):
    raw = _from_files(tmp_path, {f"{i}.png": _gradient(40, 30) for i in range(6)})
    kwargs = dict(resolution=20, center_crop=False, random_flip=True, num_workers=1)
    a = ImageCaptionDataset(raw, seed=7, **kwargs)
    b = ImageCaptionDataset(raw, seed=7, report=a.report, **kwargs)
    c = ImageCaptionDataset(raw, seed=8, report=a.report, **kwargs)

    def crops(ds):
        return [(ds[i]["crop_top_left"], ds[i]["pixel_values"]) for i in range(len(ds))]

    first = crops(a)
    assert all(ca == cb and torch.equal(ta, tb) for (ca, ta), (cb, tb) in zip(first, crops(b), strict=True))
    assert [c0 for c0, _ in first] != [c0 for c0, _ in crops(c)]
    a.set_epoch(1)
    assert [c0 for c0, _ in first] != [c0 for c0, _ in crops(a)]
    lefts = {c0[1] for c0, _ in first}
    assert len(lefts) > 1 and all(0 <= left <= 27 - 20 for left in lefts)  # 40x30 -> 27x20, then crop 20x20


# ---------------------------------------------------------------------------------------------------------------
# bucketing
# ---------------------------------------------------------------------------------------------------------------


def test_make_buckets():
    buckets = make_buckets(64, step=16, max_ratio=2.0)
    assert (64, 64) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0 and h * w <= 64 * 64 and max(h / w, w / h) <= 2.0
        assert (w, h) in buckets
    assert any(w > h for h, w in buckets) and any(h > w for h, w in buckets)
    big = make_buckets(1024)
    assert (1024, 1024) in big and all(0.85 * 1024**2 <= h * w <= 1024**2 for h, w in big)
    assert nearest_bucket((30, 60), buckets)[1] > nearest_bucket((30, 60), buckets)[0]
    assert nearest_bucket((60, 30), buckets)[0] > nearest_bucket((60, 30), buckets)[1]
    assert nearest_bucket((50, 50), buckets) == (64, 64)
    with pytest.raises(ValueError):
        make_buckets(32, step=64)


def _mixed_sizes() -> list[tuple[int, int]]:
    return [(30, 60)] * 7 + [(60, 30)] * 5 + [(40, 40)] * 4


def test_bucket_sampler_single_size_batches_deterministic_and_complete():
    sizes, buckets = _mixed_sizes(), make_buckets(64, step=16)
    item_bucket = [nearest_bucket(s, buckets) for s in sizes]
    assert item_bucket[0] != item_bucket[7]  # wide and tall land in different buckets

    sampler = BucketBatchSampler(sizes, buckets, batch_size=3, seed=1, fill_incomplete=False)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 3 + 2 + 2
    assert all(len({item_bucket[i] for i in batch}) == 1 for batch in epoch0)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(len(sizes)))  # each item once
    epoch1 = list(sampler)  # advances by itself
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(len(sizes)))
    again = BucketBatchSampler(sizes, buckets, batch_size=3, seed=1, fill_incomplete=False)
    assert list(again) == epoch0
    again.set_epoch(1)
    assert list(again) == epoch1
    assert list(BucketBatchSampler(sizes, buckets, batch_size=3, seed=2, fill_incomplete=False)) != epoch0

    full = list(BucketBatchSampler(sizes, buckets, batch_size=3, seed=1))  # default: top up short batches
    assert all(len(b) == 3 for b in full) and set(i for b in full for i in b) == set(range(len(sizes)))
    assert all(len({item_bucket[i] for i in batch}) == 1 for batch in full)
    dropped = BucketBatchSampler(sizes, buckets, batch_size=3, seed=1, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 2 + 1 + 1

    one_group = list(BucketBatchSampler(sizes, None, batch_size=4, seed=0))
    assert len(one_group) == 4 and sorted(i for b in one_group for i in b) == list(range(len(sizes)))


def test_bucket_sampler_under_accelerate_sharding():
    from accelerate.data_loader import BatchSamplerShard

    sizes, buckets = _mixed_sizes(), make_buckets(64, step=16)
    item_bucket = [nearest_bucket(s, buckets) for s in sizes]
    sampler = BucketBatchSampler(sizes, buckets, batch_size=3, seed=3)
    seen = set()
    lengths = []
    for rank in range(2):
        sampler.set_epoch(0)
        shard = list(BatchSamplerShard(sampler, num_processes=2, process_index=rank))
        lengths.append(len(shard))
        assert all(len(b) == 3 and len({item_bucket[i] for i in b}) == 1 for b in shard)
        seen.update(i for b in shard for i in b)
    assert seen == set(range(len(sizes))) and lengths[0] == lengths[1]


def test_bucketed_dataloader_stacks_one_size_per_batch(tmp_path):
    files = {f"w{i}.png": _rgb(60, 30) for i in range(3)}
    files.update({f"t{i}.png": _rgb(30, 60) for i in range(3)})
    ds = ImageCaptionDataset(_from_files(tmp_path, files), resolution=32, buckets=make_buckets(32, step=8), seed=0)
    sampler = BucketBatchSampler(ds.sizes, ds.buckets, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn)
    shapes = set()
    for batch in loader:
        b, c, h, w = batch["pixel_values"].shape
        shapes.add((h, w))
        assert batch["original_size"].shape == (b, 2) and batch["crop_top_left"].shape == (b, 2)
        assert batch["index"].dtype == torch.long and len(batch["caption"]) == b
    assert len(shapes) == 2 and all(h * w <= 32 * 32 for h, w in shapes)
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate_fn([ds[0], ds[3]])


# ---------------------------------------------------------------------------------------------------------------
# caching
# ---------------------------------------------------------------------------------------------------------------


class _Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"x": torch.full((2,), float(i))}


def _square_encoder(calls):
    def encode(batch):
        calls.append(len(batch["x"]))
        return {"y": batch["x"] ** 2, "z": batch["x"].sum(-1, keepdim=True)}

    return encode


def test_cache_hits_misses_and_rebuilds_corrupt_entries(tmp_path):
    key = {"model": "tiny", "revision": None, "resolution": 64}
    calls: list[int] = []
    first = CachedEncodings(tmp_path, key).build(_Squares(), _square_encoder(calls), batch_size=2)
    assert (first.misses, first.hits, first.encode_calls) == (5, 0, 3) and calls == [2, 2, 1]
    assert json.loads((first.path / "key.json").read_text())["resolution"] == 64
    assert torch.equal(first.load(3)["y"], torch.full((2,), 9.0))
    assert not list(first.path.rglob("*.tmp"))

    calls.clear()
    second = CachedEncodings(tmp_path, dict(reversed(list(key.items())))).build(_Squares(), _square_encoder(calls))
    assert second.path == first.path and (second.hits, second.misses, second.encode_calls) == (5, 0, 0)
    assert calls == []

    changed = CachedEncodings(tmp_path, {**key, "resolution": 32}).build(_Squares(), _square_encoder(calls))
    assert changed.path != first.path and changed.misses == 5 and changed.hits == 0

    # corruption: a truncated file, a bit flip in tensor data, and a file of another item copied over
    entry = first.entry_path
    data = entry(1).read_bytes()
    entry(1).write_bytes(data[: len(data) // 2])
    flipped = bytearray(entry(2).read_bytes())
    flipped[-1] ^= 0xFF
    entry(2).write_bytes(bytes(flipped))
    entry(4).write_bytes(entry(0).read_bytes())
    calls.clear()
    third = CachedEncodings(tmp_path, key).build(_Squares(), _square_encoder(calls), batch_size=8)
    assert (third.hits, third.misses, third.rebuilt, third.encode_calls) == (2, 3, 3, 1) and calls == [3]
    for i in range(5):
        assert torch.equal(third.load(i, verify=True)["y"], torch.full((2,), float(i * i)))
    with pytest.raises(KeyError, match="build"):
        third.load(99)


def test_a_killed_write_leaves_no_trusted_entry(tmp_path, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    cache = CachedEncodings(tmp_path, {"k": 1})
    with pytest.raises(KeyboardInterrupt):
        cache.build(_Squares(), _square_encoder([]))
    assert not cache.entry_path(0).exists() and not list(cache.path.rglob("*.tmp"))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    stray = cache.entry_path(0).parent / ".00000000.safetensors.1.abc.tmp"
    stray.write_bytes(b"junk")
    again = CachedEncodings(tmp_path, {"k": 1}).build(_Squares(), _square_encoder([]))
    assert again.misses == 5 and again.is_valid(0)


def _pool_encoder(calls):
    def encode(batch):
        calls.append(len(batch["caption"]))
        pixels = batch["pixel_values"]
        return {"latents": torch.nn.functional.avg_pool2d(pixels, 4)}

    return encode


def test_image_cache_with_flip_variants_and_resolution_key(tmp_path):
    files = {f"g{i}.png": _gradient(40, 30) for i in range(3)}
    raw = _from_files(tmp_path, files)
    ds = ImageCaptionDataset(raw, resolution=16, center_crop=True, random_flip=True, seed=0, num_workers=1)
    calls: list[int] = []
    cached = cache_image_encodings(ds, tmp_path / "cache", {"vae": "tiny"}, _pool_encoder(calls), batch_size=2)
    assert cached.cache.misses == 6 and sum(calls) == 6  # plain + flipped
    plain = cached.cache.load(0, "plain")["latents"]
    flipped = cached.cache.load(0, "flipped")["latents"]
    assert torch.allclose(flipped, plain.flip(-1))

    orientations = set()
    for epoch in range(6):
        cached.set_epoch(epoch)
        item = cached[0]
        uncached = ds.with_options()
        uncached.set_epoch(epoch)
        expect = torch.nn.functional.avg_pool2d(uncached[0]["pixel_values"][None], 4)[0]
        assert torch.allclose(item["latents"], expect, atol=1e-6)  # same orientation draw as the live dataset
        assert item["crop_top_left"] == uncached[0]["crop_top_left"] and item["original_size"] == (30, 40)
        orientations.add(bool(torch.equal(item["latents"], flipped)))
    assert orientations == {True, False}
    batch = collate_fn([cached[i] for i in range(3)])
    assert batch["latents"].shape == (3, 3, 4, 4) and batch["caption"][0] == "caption g0.png"

    calls.clear()
    hit = cache_image_encodings(ds, tmp_path / "cache", {"vae": "tiny"}, _pool_encoder(calls))
    assert calls == [] and hit.cache.hits == 6 and hit.cache.misses == 0
    no_flip = ImageCaptionDataset(raw, resolution=16, report=ds.report)
    assert cache_image_encodings(no_flip, tmp_path / "cache", {"vae": "tiny"}, _pool_encoder(calls)).cache.hits == 3
    assert calls == []  # toggling random_flip reuses the plain variant

    bigger = ImageCaptionDataset(raw, resolution=24, random_flip=True, report=ds.report)
    miss = cache_image_encodings(bigger, tmp_path / "cache", {"vae": "tiny"}, _pool_encoder(calls))
    assert miss.cache.hits == 0 and miss.cache.misses == 6 and miss.cache.path != hit.cache.path

    random_crop = ImageCaptionDataset(raw, resolution=16, center_crop=False, report=ds.report)
    with pytest.raises(ValueError, match="--center_crop"):
        cache_image_encodings(random_crop, tmp_path / "cache", {"vae": "tiny"}, _pool_encoder(calls))


def test_image_cache_key_follows_the_data(tmp_path):
    raw = _from_files(tmp_path, {"a.png": _rgb(), "b.png": _rgb()})
    ds = ImageCaptionDataset(raw, resolution=8, num_workers=1)
    first = cache_image_encodings(ds, tmp_path / "cache", {"vae": "tiny"}, _pool_encoder([]))
    path = Path(raw[0]["image"].filename)
    _rgb(color=(200, 0, 0)).save(path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file systems
    ds2 = ImageCaptionDataset(raw, resolution=8, num_workers=1)
    second = cache_image_encodings(ds2, tmp_path / "cache", {"vae": "tiny"}, _pool_encoder([]))
    assert second.cache.path != first.cache.path and second.cache.misses == 2
    assert math.isclose(float(second[0]["latents"][0].mean()), 200 / 127.5 - 1, abs_tol=1e-5)
