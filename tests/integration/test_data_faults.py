"""Data faults: what the training data path does with each kind of bad input.

Every case is built at test time into ``tmp_path`` (PIL / numpy / raw bytes, no downloads) and run through two
sources: ``folder``, a local imagefolder with a ``metadata.jsonl`` read by
``load_image_caption_dataset(train_data_dir=...)``, and ``memory``, an in-memory ``datasets.Dataset`` whose image
column holds the same files as embedded bytes. Each case sits beside one good image, then goes through
``ImageCaptionDataset`` (which validates every image once, up front). Outcomes:

* **skipped (reason)**: counted in ``report.bad_images`` as ``(row, name, reason)``, which train scripts write to
  ``training_summary.json`` as ``skipped_images``; one warning per file (full path) and a summary line.
* **no caption**: the row is counted in ``report.missing_captions`` (named in the summary line).
* **kept**: served as float ``[3, R, R]`` RGB in ``[-1, 1]``; pixel values are checked exactly where noted.
* **error**: ``ValueError`` whose message names the file / line and the fix.

===========================================  ======================================  ==============================
case                                         folder (imagefolder + metadata.jsonl)   memory (datasets.Dataset)
===========================================  ======================================  ==============================
truncated PNG / truncated JPEG               skipped (truncated)                     same
text file named .png                         skipped (not an image)                  same
zero-byte .jpg                               skipped (empty file)                    same
PNG bytes named .jpg                         kept                                    same
decompression bomb 10000x10000 (1-2x PIL's   skipped (too large), never decoded      same
MAX_IMAGE_PIXELS: PIL itself only warns)
decompression bomb 20000x20000 (> 2x limit)  skipped (too large), never decoded      same
metadata row / path naming a missing file    skipped (missing file)                  same
RGBA, LA, P with transparency                kept, composited over white             same
L / 1-bit / CMYK                             kept: 64 -> 64; 1, 0 -> 255, 0;         same
                                             no ink -> 255, full black ink -> 0
16-bit I;16 PNG, 32-bit I TIFF               kept, round(v / 257): 0, 300, 32768     same
                                             (mid-grey), 65535 -> 0, 1, 128, 255
                                             (no wraparound)
48-bit RGB PNG                               kept, same values (no wraparound)       same
F TIFF 0, .25, .5, 1                         kept -> 0, 64, 128, 255                 same
EXIF orientation 6 JPEG                      kept, pixels rotated, (h, w) swapped    same
caption None                                 no caption                              same
caption key absent                           no caption                              (n/a)
caption ""                                   kept, unconditional caption ""          same
caption 3 (int)                              error metadata.jsonl:1 "quote numbers"  error: no row holds a caption,
                                                                                     check --caption_column
caption {"k": 1} (dict)                      error metadata.jsonl:1 "an object"      same as int
caption [1, 2] (list of non-strings)         error metadata.jsonl:1                  (n/a: Arrow cannot mix them)
caption ["alt a", "alt b"] (rows all lists)  kept, one alternative drawn             same
caption [] (rows all lists)                  no caption                              same
string and list captions in one file         error metadata.jsonl:2 "one type per    (n/a)
                                             file"
same basename in two subfolders (a/x.png     b/x.png skipped (truncated), named by   same
good, b/x.png truncated)                     its unique path suffix; a/x.png kept
one file_name on two metadata rows           error metadata.jsonl:2 "names it again  kept twice (a Dataset may
                                             ... use a list"                         repeat an image per caption)
metadata line without file_name / not JSON   error metadata.jsonl:1                  (n/a)
===========================================  ======================================  ==============================

The mixed test puts every folder case that does not abort loading among good and converted images (10 injected
faults: 8 skipped images and 2 rows without a caption; the in-memory copy has 9, no absent caption key), and
checks that a DataLoader with ``collate_fn`` serves only the good ones, finite, in ``[-1, 1]``, shaped
``[B, 3, R, R]``. Bombs are also rejected by header-only validation, and by the per-item decode of a file that
became one after validation.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from diffusers_ztsnr.training.data import ImageCaptionDataset, collate_fn, load_image_caption_dataset

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, for 1-2x bombs

R = 16  # every test image that is checked pixel by pixel is R x R: no resize, no crop
LOGGER = "diffusers_ztsnr.training.data"
ABSENT = object()  # a metadata row without the caption key


# ---------------------------------------------------------------------------------------------------------------
# file builders
# ---------------------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _bands(values: list, dtype: Any) -> np.ndarray:
    """An R x R array of len(values) vertical bands, R // len(values) columns each."""
    return np.repeat(np.asarray(values, dtype=dtype), R // len(values))[None, :].repeat(R, 0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, row: bytes) -> bytes:
    """A valid PNG whose every row is ``row`` (filter byte 0 prepended), compressed in slices of 1000 rows."""
    compressor = zlib.compressobj(9)
    block = (b"\0" + row) * min(height, 1000)
    body = [compressor.compress(block) for _ in range(height // 1000)]
    body.append(compressor.compress((b"\0" + row) * (height % 1000)))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(body))
        + _png_chunk(b"IEND", b"")
    )


@functools.cache
def _bomb(side: int) -> bytes:
    """A real, decodable side x side 1-bit black PNG of a few kB (a decompression bomb)."""
    return _raw_png(side, side, 1, 0, bytes((side + 7) // 8))


def _good(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 256, (R, R, 3), dtype=np.uint8)), "PNG")


def _noise_png() -> bytes:
    return _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")


def _noise_jpeg() -> bytes:
    return _encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")


def _halves(mode: str, left: Any, right: Any) -> Image.Image:
    image = Image.new(mode, (R, R), right)
    image.paste(left, (0, 0, R // 2, R))
    return image


def _palette_transparent() -> bytes:
    image = Image.new("P", (R, R), 0)  # index 0 (red) is transparent; left half is index 1 (blue)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, R // 2, R))
    return _encode(image, "PNG", transparency=0)


def _exif_rotated() -> bytes:
    image = Image.new("RGB", (2 * R, R), (0, 0, 255))  # stored 2R wide, R tall: left half red, right half blue
    image.paste((255, 0, 0), (0, 0, R, R))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: R wide, 2R tall, red on top
    return _encode(image, "JPEG", exif=exif, quality=95)


SIXTEEN = [0, 300, 32768, 65535]  # 300 would wrap to 44 as uint8; 32768 is mid-grey
SIXTEEN_RGB8 = [0, 1, 128, 255]  # round(v / 257)


# ---------------------------------------------------------------------------------------------------------------
# the fault table
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    reason: str  # report.bad_images reason
    name: str  # report.bad_images name


@dataclass(frozen=True)
class NoCaption:
    name: str


@dataclass(frozen=True)
class Kept:
    """Every row of the case is kept; ``check(items)`` gets ``[(relative path, item), ...]`` of the case's rows."""

    check: Callable[[list[tuple[str, dict]]], None] | None = None


@dataclass(frozen=True)
class Error:
    match: str
    type: type[Exception] = ValueError


Outcome = Skipped | NoCaption | Kept | Error


@dataclass(frozen=True)
class Fault:
    id: str
    files: Callable[[], dict[str, bytes]]  # relative path -> content, built when the test runs
    outcome: Outcome | dict[str, Outcome]  # one for both sources, or per source ("folder", "memory")
    rows: list[tuple[Any, Any] | str] | None = None  # (file_name, caption) or a raw metadata line; default 1/file
    good_caption: Any = "good"  # the caption of the good image beside the case (same type as the case's)
    sources: tuple[str, ...] = ("folder", "memory")

    def outcome_for(self, source: str) -> Outcome:
        return self.outcome[source] if isinstance(self.outcome, dict) else self.outcome


def _pixels(expected: list) -> Callable[[list[tuple[str, dict]]], None]:
    """Check that the single item's image is ``len(expected)`` vertical bands of these RGB (or grey) values."""

    def check(items: list[tuple[str, dict]]) -> None:
        ((_name, item),) = items
        values = ((item["pixel_values"] + 1) * 127.5).round().to(torch.int64).numpy()  # [3, R, R] back to 0..255
        width = R // len(expected)
        for band, value in enumerate(expected):
            rgb = value if isinstance(value, tuple) else (value, value, value)
            block = values[:, :, band * width : (band + 1) * width]
            assert np.all(block == np.asarray(rgb)[:, None, None]), (band, rgb, np.unique(block))

    return check


def _mid_grey_16bit(items: list[tuple[str, dict]]) -> None:
    _pixels(SIXTEEN_RGB8)(items)
    ((_name, item),) = items
    mid = item["pixel_values"][:, :, 2 * R // 4 : 3 * R // 4]  # the 32768 band
    assert mid.abs().max() <= 1 / 127.5 + 1e-6  # mid-grey, i.e. ~0 in [-1, 1]


def _rotated(items: list[tuple[str, dict]]) -> None:
    ((_name, item),) = items
    assert item["original_size"] == (2 * R, R)  # (h, w) as displayed
    rgb = ((item["pixel_values"] + 1) * 127.5).numpy()  # center crop of rows R/2 .. 3R/2
    top, bottom = rgb[:, 1 : R // 2 - 1].mean((1, 2)), rgb[:, R // 2 + 1 : -1].mean((1, 2))
    assert np.allclose(top, [255, 0, 0], atol=12) and np.allclose(bottom, [0, 0, 255], atol=12), (top, bottom)


def _captions(expected: set[str]) -> Callable[[list[tuple[str, dict]]], None]:
    def check(items: list[tuple[str, dict]]) -> None:
        assert {item["caption"] for _name, item in items} == expected

    return check


def _alternatives(items: list[tuple[str, dict]]) -> None:
    ((_name, item),) = items
    assert item["caption"] in {"alt a", "alt b"}


def _dup_kept_twice(items: list[tuple[str, dict]]) -> None:
    assert sorted((name, item["caption"]) for name, item in items) == [("dup.png", "first"), ("dup.png", "second")]
    assert torch.equal(items[0][1]["pixel_values"], items[1][1]["pixel_values"])


def _only(name: str) -> Callable[[list[tuple[str, dict]]], None]:
    def check(items: list[tuple[str, dict]]) -> None:
        assert [n for n, _item in items] == [name]

    return check


LINE1 = r"metadata\.jsonl:1"
FAULTS = [
    # -- bad files --------------------------------------------------------------------------------------------------
    Fault("truncated_png", lambda: {"trunc.png": _noise_png()[:-200]}, Skipped("truncated", "trunc.png")),
    Fault("truncated_jpeg", lambda: {"trunc.jpg": _noise_jpeg()[:-400]}, Skipped("truncated", "trunc.jpg")),
    Fault("text_named_png", lambda: {"text.png": b"<html>not an image</html>\n"}, Skipped("not an image", "text.png")),
    Fault("zero_bytes", lambda: {"zero.jpg": b""}, Skipped("empty file", "zero.jpg")),
    Fault("png_named_jpg", lambda: {"png.jpg": _good(3)}, Kept(_only("png.jpg"))),
    Fault("bomb_warn_range", lambda: {"bomb1.png": _bomb(10_000)}, Skipped("too large", "bomb1.png")),
    Fault("bomb_error_range", lambda: {"bomb2.png": _bomb(20_000)}, Skipped("too large", "bomb2.png")),
    Fault("missing_file", dict, Skipped("missing file", "gone.png"), rows=[("gone.png", "a caption")]),
    # -- modes ------------------------------------------------------------------------------------------------------
    Fault(
        "rgba",
        lambda: {"rgba.png": _encode(_halves("RGBA", (0, 0, 0, 255), (0, 0, 0, 0)), "PNG")},
        Kept(_pixels([0, 255])),
    ),
    Fault("la", lambda: {"la.png": _encode(_halves("LA", (0, 255), (0, 0)), "PNG")}, Kept(_pixels([0, 255]))),
    Fault("p_transparency", lambda: {"p.png": _palette_transparent()}, Kept(_pixels([(0, 0, 255), 255]))),
    Fault("grey_l", lambda: {"l.png": _encode(Image.new("L", (R, R), 64), "PNG")}, Kept(_pixels([64]))),
    Fault("one_bit", lambda: {"bit.png": _encode(_halves("1", 1, 0), "PNG")}, Kept(_pixels([255, 0]))),
    Fault(
        "cmyk",
        lambda: {"cmyk.tif": _encode(_halves("CMYK", (0, 0, 0, 0), (0, 0, 0, 255)), "TIFF")},
        Kept(_pixels([255, 0])),
    ),
    Fault(
        "i16_png",
        lambda: {"i16.png": _encode(Image.fromarray(_bands(SIXTEEN, np.uint16)), "PNG")},
        Kept(_mid_grey_16bit),
    ),
    Fault(
        "i32_tiff",
        lambda: {"i32.tif": _encode(Image.fromarray(_bands(SIXTEEN, np.int32)), "TIFF")},
        Kept(_mid_grey_16bit),
    ),
    Fault(
        "rgb48_png",
        lambda: {
            "rgb48.png": _raw_png(R, R, 16, 2, b"".join(struct.pack(">3H", v, v, v) for v in _bands(SIXTEEN, int)[0]))
        },
        Kept(_pixels([0, 1, 128, 255])),
    ),
    Fault(
        "float_tiff",
        lambda: {"f.tif": _encode(Image.fromarray(_bands([0.0, 0.25, 0.5, 1.0], np.float32)), "TIFF")},
        Kept(_pixels([0, 64, 128, 255])),
    ),
    Fault("exif_rotated", lambda: {"rot.jpg": _exif_rotated()}, Kept(_rotated)),
    # -- captions ---------------------------------------------------------------------------------------------------
    Fault("caption_none", lambda: {"none.png": _good(4)}, NoCaption("none.png"), rows=[("none.png", None)]),
    Fault(
        "caption_absent",
        lambda: {"absent.png": _good(5)},
        NoCaption("absent.png"),
        rows=[("absent.png", ABSENT)],
        sources=("folder",),
    ),
    Fault("caption_empty", lambda: {"empty.png": _good(6)}, Kept(_captions({""})), rows=[("empty.png", "")]),
    Fault(
        "caption_int",
        lambda: {"int.png": _good(7)},
        {
            "folder": Error(LINE1 + r": caption 'text' is a number \(3\).*quote numbers"),
            "memory": Error(r"no row of column 'text' holds a caption.*--caption_column"),
        },
        rows=[("int.png", 3)],
        good_caption=7,
    ),
    Fault(
        "caption_dict",
        lambda: {"dict.png": _good(8)},
        {
            "folder": Error(LINE1 + r": caption 'text' is an object .*a list of alternative strings"),
            "memory": Error(r"no row of column 'text' holds a caption.*--caption_column"),
        },
        rows=[("dict.png", {"k": 1})],
        good_caption={"k": 2},
    ),
    Fault(
        "caption_list_of_ints",
        lambda: {"ints.png": _good(9)},
        Error(LINE1 + r": caption 'text' is a list of non-strings \(\[1, 2\]\)"),
        rows=[("ints.png", [1, 2])],
        good_caption=["good"],
        sources=("folder",),
    ),
    Fault(
        "caption_alternatives",
        lambda: {"alt.png": _good(10)},
        Kept(_alternatives),
        rows=[("alt.png", ["alt a", "alt b"])],
        good_caption=["good"],
    ),
    Fault(
        "caption_empty_list",
        lambda: {"nolist.png": _good(11)},
        NoCaption("nolist.png"),
        rows=[("nolist.png", [])],
        good_caption=["good"],
    ),
    Fault(
        "caption_string_and_list",
        lambda: {"alt.png": _good(12)},
        Error(r"metadata\.jsonl:2: caption 'text' is a string but line 1 has a list of strings: use one type"),
        rows=[("alt.png", ["alt a", "alt b"])],
        sources=("folder",),
    ),
    # -- names ------------------------------------------------------------------------------------------------------
    Fault(
        "same_basename_in_subfolders",
        lambda: {"a/x.png": _good(13), "b/x.png": _noise_png()[:-200]},
        Skipped("truncated", "b/x.png"),
    ),
    Fault(
        "duplicate_metadata_rows",
        lambda: {"dup.png": _good(14)},
        {
            "folder": Error(r"metadata\.jsonl:2 names 'dup.png' again \(first at .*metadata\.jsonl:1\).*use a list"),
            "memory": Kept(_dup_kept_twice),
        },
        rows=[("dup.png", "first"), ("dup.png", "second")],
    ),
    Fault(
        "metadata_row_without_file_name",
        lambda: {"a.png": _good(15)},
        Error(LINE1 + r' has no "file_name"'),
        rows=[(None, "a caption")],
        sources=("folder",),
    ),
    Fault(
        "metadata_line_not_json",
        lambda: {"a.png": _good(16)},
        Error(LINE1 + r" is not valid JSON"),
        rows=['{"file_name": "a.png", "text": "unclosed'],
        sources=("folder",),
    ),
]


# ---------------------------------------------------------------------------------------------------------------
# building the two sources
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Built:
    root: Path
    files: dict[str, bytes] = field(default_factory=dict)
    rows: list[tuple[Any, Any] | str] = field(default_factory=list)


def _case_rows(fault: Fault, files: dict[str, bytes], prefix: str = "") -> list[tuple[Any, Any] | str]:
    rows = fault.rows if fault.rows is not None else [(name, f"caption {name}") for name in files]
    out: list[tuple[Any, Any] | str] = []
    for row in rows:
        if isinstance(row, str) or row[0] is None:
            out.append(row)
        else:
            out.append((prefix + row[0], row[1]))
    return out


def _metadata_line(row: tuple[Any, Any] | str) -> str:
    if isinstance(row, str):
        return row
    name, caption = row
    record: dict[str, Any] = {} if name is None else {"file_name": name}
    if caption is not ABSENT:
        record["text"] = caption
    return json.dumps(record)


def _write(built: Built) -> None:
    for name, content in built.files.items():
        path = built.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _as_folder(built: Built, cache_dir: Path) -> datasets.Dataset:
    _write(built)
    (built.root / "metadata.jsonl").write_text("".join(_metadata_line(row) + "\n" for row in built.rows))
    return load_image_caption_dataset(train_data_dir=built.root, cache_dir=cache_dir)


def _as_memory(built: Built) -> datasets.Dataset:
    """Images as embedded bytes named by their relative path; a missing file is an absolute path, no bytes."""
    images, captions = [], []
    for name, caption in built.rows:  # type: ignore[misc]
        if name in built.files:
            images.append({"bytes": built.files[name], "path": name})
        else:
            images.append({"bytes": None, "path": str(built.root / name)})
        captions.append(None if caption is ABSENT else caption)
    return datasets.Dataset.from_dict({"image": images, "text": captions}).cast_column("image", datasets.Image())


def _relative_names(raw: datasets.Dataset, ds: ImageCaptionDataset, root: Path) -> list[str]:
    cells = raw.cast_column("image", datasets.Image(decode=False))["image"]
    paths = [cells[row]["path"] for row in ds.source_indices]
    return [Path(os.path.relpath(p, root) if os.path.isabs(p) else p).as_posix() for p in paths]


@pytest.fixture
def decoded_pixels(monkeypatch) -> list[int]:
    """Pixel counts of every image file PIL decodes (ImageFile.load), to prove bombs are never decoded."""
    seen: list[int] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        seen.append(self.size[0] * self.size[1])
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


def _assert_items_ok(ds: ImageCaptionDataset) -> list[dict]:
    items = [ds[i] for i in range(len(ds))]
    for item in items:
        t = item["pixel_values"]
        assert t.shape == (3, R, R) and t.dtype == torch.float32
        assert torch.isfinite(t).all() and t.min() >= -1 and t.max() <= 1
    assert ds.lazy_skipped == []  # nothing bad got past validation
    return items


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------

CASES = [pytest.param(f, s, id=f"{f.id}-{s}") for f in FAULTS for s in f.sources]


@pytest.mark.parametrize("fault, source", CASES)
def test_fault(fault: Fault, source: str, tmp_path: Path, decoded_pixels: list[int], caplog) -> None:
    files = fault.files()
    built = Built(tmp_path / "data", {**files, "good.png": _good()})
    built.rows = _case_rows(fault, files) + [("good.png", fault.good_caption)]
    outcome = fault.outcome_for(source)

    def make() -> tuple[datasets.Dataset, ImageCaptionDataset]:
        raw = _as_folder(built, tmp_path / "hf") if source == "folder" else _as_memory(built)
        return raw, ImageCaptionDataset(raw, resolution=R, num_workers=1)

    if isinstance(outcome, Error):
        with pytest.raises(outcome.type, match=outcome.match):
            make()
        return

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        raw, ds = make()
    report = ds.report
    n_rows = len(built.rows)
    assert report.total == n_rows
    assert not any(p > Image.MAX_IMAGE_PIXELS for p in decoded_pixels)  # no image over the limit was decoded
    names = _relative_names(raw, ds, built.root)
    items = _assert_items_ok(ds)
    assert "good.png" in names

    if isinstance(outcome, Skipped):
        assert [(name, reason) for _row, name, reason in report.bad_images] == [(outcome.name, outcome.reason)]
        assert report.missing_captions == [] and len(ds) == n_rows - 1
        assert f"{outcome.name} ({outcome.reason})" in report.summary()
        assert f"{outcome.name} ({outcome.reason})" in caplog.text  # the summary line is logged
        assert f"skipped 1 of {n_rows} images" in caplog.text
    elif isinstance(outcome, NoCaption):
        assert [name for _row, name in report.missing_captions] == [outcome.name]
        assert report.bad_images == [] and len(ds) == n_rows - 1
        assert f"skipped 1 of {n_rows} rows without a caption: {outcome.name}" in caplog.text
    else:
        assert report.bad_images == [] and report.missing_captions == [] and len(ds) == n_rows
        case_items = [(n, item) for n, item in zip(names, items, strict=True) if n != "good.png"]
        assert len(case_items) == n_rows - 1
        if outcome.check is not None:
            outcome.check(case_items)


# ---------------------------------------------------------------------------------------------------------------
# all faults at once
# ---------------------------------------------------------------------------------------------------------------


def _mixable(fault: Fault) -> bool:
    """Cases that can share one folder: no load-time error, string captions (one caption type per file)."""
    folder_ok = "folder" in fault.sources and not isinstance(fault.outcome_for("folder"), Error)
    return folder_ok and fault.good_caption == "good"


N_GOOD = 6


@pytest.mark.parametrize("source", ["folder", "memory"])
def test_all_faults_mixed_with_good_images(source: str, tmp_path: Path, decoded_pixels: list[int]) -> None:
    built = Built(tmp_path / "data")
    expected_skips: list[tuple[str, str]] = []  # (name, reason)
    expected_no_caption: list[str] = []
    kept_captions: set[str] = set()
    for fault in filter(_mixable, FAULTS):
        if source == "memory" and source not in fault.sources:
            continue
        files = fault.files()
        prefix = fault.id + "/"  # one subfolder per case: basenames stay unique across cases
        built.files.update({prefix + name: content for name, content in files.items()})
        built.rows += _case_rows(fault, files, prefix)
        outcome = fault.outcome_for(source)
        if isinstance(outcome, Skipped):
            expected_skips.append((outcome.name, outcome.reason))
        elif isinstance(outcome, NoCaption):
            expected_no_caption.append(outcome.name)
        bad = outcome.name if isinstance(outcome, (Skipped, NoCaption)) else None
        kept_captions.update(c for n, c in _case_rows(fault, files) if n != bad)  # type: ignore[misc]
    for i in range(N_GOOD):
        built.files[f"good/good{i}.png"] = _good(100 + i)
        built.rows.append((f"good/good{i}.png", f"good {i}"))
        kept_captions.add(f"good {i}")
    n_faults = len(expected_skips) + len(expected_no_caption)
    if source == "folder":
        assert (len(expected_skips), len(expected_no_caption)) == (8, 2)  # the number the docstring promises

    raw = _as_folder(built, tmp_path / "hf") if source == "folder" else _as_memory(built)
    ds = ImageCaptionDataset(raw, resolution=R, num_workers=2)  # threaded validation
    report = ds.report
    assert sorted((name, reason) for _row, name, reason in report.bad_images) == sorted(expected_skips)
    assert sorted(name for _row, name in report.missing_captions) == sorted(expected_no_caption)
    assert len(report.bad_images) + len(report.missing_captions) == n_faults
    assert len(ds) == len(built.rows) - n_faults
    assert f"skipped {len(expected_skips)} of {len(built.rows)} images" in report.summary()

    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_fn)
    served: list[str] = []
    for batch in loader:
        pixels = batch["pixel_values"]
        assert pixels.ndim == 4 and pixels.shape[1:] == (3, R, R) and pixels.shape[0] == len(batch["caption"])
        assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
        assert pixels.min() >= -1 and pixels.max() <= 1
        served += batch["caption"]
    assert len(served) == len(ds) and set(served) == kept_captions
    assert ds.lazy_skipped == []
    assert not any(p > Image.MAX_IMAGE_PIXELS for p in decoded_pixels)


def test_bombs_are_never_decoded_by_header_validation_or_lazily(tmp_path: Path, decoded_pixels: list[int]) -> None:
    files = {"bomb1.png": _bomb(10_000), "good.png": _good()}
    built = Built(tmp_path / "data", files, [("bomb1.png", "bomb"), ("good.png", "good")])
    ds = ImageCaptionDataset(_as_memory(built), resolution=R, validation="header", num_workers=1)
    assert [(name, reason) for _row, name, reason in ds.report.bad_images] == [("bomb1.png", "too large")]
    _assert_items_ok(ds)

    # a file replaced by a bomb after validation: the item falls back to the next one, counted in lazy_skipped
    _write(Built(tmp_path / "paths", {"a.png": _good(1), "b.png": _good(2)}))
    paths = [str(tmp_path / "paths" / name) for name in ("a.png", "b.png")]
    raw = datasets.Dataset.from_dict({"image": paths, "text": ["a", "b"]}).cast_column("image", datasets.Image())
    ds = ImageCaptionDataset(raw, resolution=R, num_workers=1)
    Path(paths[0]).write_bytes(_bomb(10_000))
    assert ds[0]["caption"] == "b" and ds.lazy_skipped == [(0, "a.png", "too large")]
    assert not any(p > Image.MAX_IMAGE_PIXELS for p in decoded_pixels)
