"""Training data inputs a careful user expects to work, or to be told about plainly.

* a ``metadata.jsonl`` that starts with a UTF-8 byte-order mark loads, captions intact;
* an empty caption list ``[]`` among string captions, or as a file's only captions, is named as such at its
  ``file:line`` with the fix;
* tiny images (upscaled more than 4x to their training size) and images with an aspect ratio over 4:1 are kept and
  trained on, with one warning per kind giving the count and a few names;
* symlinks under ``--train_data_dir`` that point outside it are refused (link, target and ``--follow_symlinks`` in
  one line) unless the caller opts in; links inside the folder, and a linked folder itself, are fine;
* library log lines that quote whole prompts (diffusers' "part of your input was truncated") are shortened.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from diffusers_ztsnr.training.config import add_common_arguments
from diffusers_ztsnr.training.data import ImageCaptionDataset, load_image_caption_dataset, make_buckets

LOGGER = "diffusers_ztsnr.training.data"
RES = 32


def _png(size: tuple[int, int], shade: int = 128) -> bytes:
    """A grey PNG of PIL size ``(w, h)``."""
    buf = io.BytesIO()
    Image.new("RGB", size, (shade, shade, shade)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, images: dict[str, bytes], rows: list[tuple[str, Any]] | None = None) -> Path:
    """Write ``images`` under ``root`` and a ``metadata.jsonl`` of ``rows`` (default: one caption per image)."""
    for name, data in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    rows = rows if rows is not None else [(name, f"caption of {name}") for name in images]
    lines = "".join(json.dumps({"file_name": name, "text": caption}) + "\n" for name, caption in rows)
    (root / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return root


def _basenames(raw: datasets.Dataset) -> list[str]:
    cells = raw.cast_column("image", datasets.Image(decode=False))["image"]
    return [os.path.basename(cell["path"]) for cell in cells]


def _messages(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# ---------------------------------------------------------------------------------------------------------------
# metadata.jsonl
# ---------------------------------------------------------------------------------------------------------------


def test_metadata_jsonl_with_a_byte_order_mark_loads_with_its_captions(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", {"a.png": _png((8, 8)), "b.png": _png((8, 8), 200)})
    path = root / "metadata.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    raw = load_image_caption_dataset(train_data_dir=root, cache_dir=tmp_path / "cache")
    assert raw.column_names == ["image", "text"]  # no BOM glued to a column name
    assert dict(zip(_basenames(raw), raw["text"], strict=True)) == {"a.png": "caption of a.png",
                                                                     "b.png": "caption of b.png"}
    ds = ImageCaptionDataset(raw, resolution=8, num_workers=1)
    assert len(ds) == 2 and sorted(ds.report.captions) == ["caption of a.png", "caption of b.png"]


@pytest.mark.parametrize(
    ("captions", "expected"),
    [
        pytest.param([[], "dog"], r"metadata\.jsonl:1: caption 'text' is an empty list of captions \(\[\]\) in a "
                     r"file of string captions \(line 2\): write a caption string .*or null to skip the row",
                     id="empty_list_then_string"),
        pytest.param(["cat", "dog", []], r"metadata\.jsonl:3: caption 'text' is an empty list of captions "
                     r"\(\[\]\) in a file of string captions \(line 1\)", id="string_then_empty_list"),
        pytest.param([None, []], r"metadata\.jsonl:2: caption 'text' is an empty list of captions \(\[\]\) and no "
                     r"line of the file has a caption: .*\[\"a photo of a cat\"\], or null",
                     id="only_empty_lists"),
        pytest.param([[], ["a"], "s"], r"metadata\.jsonl:3: caption 'text' is a string but line 2 has a list of "
                     r"strings: use one type per file", id="empty_list_is_not_the_list_kind"),
    ],
)
def test_empty_caption_list_is_named_at_its_line(tmp_path: Path, captions: list, expected: str) -> None:
    images = {f"{i}.png": _png((8, 8)) for i in range(len(captions))}
    root = _folder(tmp_path / "data", images, list(zip(images, captions, strict=True)))
    with pytest.raises(ValueError, match=expected) as error:
        load_image_caption_dataset(train_data_dir=root, cache_dir=tmp_path / "cache")
    assert ("empty list" in str(error.value)) != ("list of strings" in str(error.value))
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# tiny and elongated images
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_and_elongated_images_are_kept_with_one_warning_each(tmp_path: Path, caplog) -> None:
    sizes = {  # PIL (w, h); at RES = 32 "tiny" is a shorter side under 8 px
        "ok.png": (32, 32), "ok_wide.png": (40, 24), "edge_8.png": (8, 8), "ratio_4.png": (40, 10),
        "tiny_1.png": (1, 1), "tiny_7.png": (7, 7), "wide.png": (10000, 10), "tall.png": (10, 50),
    }
    root = _folder(tmp_path / "data", {name: _png(size) for name, size in sizes.items()})
    raw = load_image_caption_dataset(train_data_dir=root, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageCaptionDataset(raw, resolution=RES, center_crop=True, num_workers=1)
    names = [_basenames(raw)[row] for row in ds.source_indices]
    assert len(ds) == len(sizes)  # nothing refused
    assert sorted(names[i] for i in ds.small_images) == ["tiny_1.png", "tiny_7.png"]
    assert sorted(names[i] for i in ds.elongated_images) == ["tall.png", "wide.png"]
    (small,) = _messages(caplog, "upscaled more than 4x")
    assert small.startswith("2 of 8 images are upscaled more than 4x to their training size (for 32x32 crops: a "
                            "shorter side under 8px)")
    assert "tiny_1.png (1x1)" in small and "tiny_7.png (7x7)" in small and "trained on anyway" in small
    (elongated,) = _messages(caplog, "aspect ratio over 4:1")
    assert elongated.startswith("2 of 8 images have an aspect ratio over 4:1")
    assert "wide.png (10000x10)" in elongated and "tall.png (10x50)" in elongated
    assert not re.search(r"(ok|ok_wide|edge_8|ratio_4)\.png", small + elongated)
    wide = ds[names.index("wide.png")]  # still served
    assert tuple(wide["pixel_values"].shape) == (3, RES, RES) and wide["original_size"] == (10, 10000)


def test_size_warning_names_five_then_counts_the_rest_and_uses_bucket_sizes(caplog) -> None:
    images = [{"bytes": _png((3, 3)), "path": f"tiny_{i}.png"} for i in range(7)]
    images.append({"bytes": _png((32, 8)), "path": "bucketed.png"})  # 4:1, fits a 4:1 bucket: upscaled 1x only
    raw = datasets.Dataset.from_dict({"image": images, "text": ["x"] * len(images)})
    raw = raw.cast_column("image", datasets.Image())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = ImageCaptionDataset(raw, resolution=RES, buckets=make_buckets(RES, step=8, max_ratio=4.0),
                                 num_workers=1)
    assert ds.small_images == list(range(7)) and ds.elongated_images == []
    (small,) = _messages(caplog, "upscaled more than 4x")
    assert small.startswith("7 of 8 images are upscaled more than 4x to their training size, which blurs them")
    assert ", ".join(f"tiny_{i}.png (3x3)" for i in range(5)) + " and 2 more" in small
    assert "tiny_5.png" not in small and not _messages(caplog, "aspect ratio")


# ---------------------------------------------------------------------------------------------------------------
# symlinks
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def linked_folder(tmp_path: Path) -> tuple[Path, Path]:
    """``data/`` with a.png, an inside link alias.png -> a.png, and links to ``outside/``: b.png (file) and sub/
    (folder holding c.png); the metadata names all four. Returns ``(data, outside)``."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "b.png").write_bytes(_png((8, 8), 10))
    (outside / "sub" / "c.png").write_bytes(_png((8, 8), 20))
    data = _folder(tmp_path / "data", {"a.png": _png((8, 8), 30)},
                   [("a.png", "a"), ("alias.png", "alias"), ("b.png", "b"), ("sub/c.png", "c")])
    os.symlink("a.png", data / "alias.png")
    os.symlink(outside / "b.png", data / "b.png")
    os.symlink(outside / "sub", data / "sub", target_is_directory=True)
    return data, outside


def test_symlinks_pointing_outside_the_folder_are_refused(linked_folder: tuple[Path, Path], tmp_path: Path) -> None:
    data, outside = linked_folder
    with pytest.raises(ValueError) as error:
        load_image_caption_dataset(train_data_dir=data, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert message == (
        f"{data / 'b.png'} is a symlink to {(outside / 'b.png').resolve()}, outside --train_data_dir "
        f"{str(data)!r} (and 1 more such links): move or copy the file into --train_data_dir, or pass "
        "--follow_symlinks (follow_symlinks=True) to train on what the links point to"
    )
    (data / "b.png").unlink()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(data / 'sub'))} is a symlink to .*outside.*: move or "
                                         r"copy the folder into --train_data_dir, or pass --follow_symlinks"):
        load_image_caption_dataset(train_data_dir=data, cache_dir=tmp_path / "cache")


def test_follow_symlinks_loads_linked_files_and_folders(linked_folder: tuple[Path, Path], tmp_path: Path) -> None:
    data, _outside = linked_folder
    raw = load_image_caption_dataset(train_data_dir=data, cache_dir=tmp_path / "cache", follow_symlinks=True)
    assert sorted(raw["text"]) == ["a", "alias", "b", "c"]
    assert len(ImageCaptionDataset(raw, resolution=8, num_workers=1)) == 4


def test_links_inside_the_folder_and_a_linked_folder_need_no_flag(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", {"a.png": _png((8, 8))}, [("a.png", "a"), ("alias.png", "alias")])
    os.symlink("a.png", data / "alias.png")
    (data / "nested").mkdir()
    os.symlink("../a.png", data / "nested" / "up.png")  # resolves inside the folder: unlisted, but allowed
    os.symlink(data, tmp_path / "data_link", target_is_directory=True)
    raw = load_image_caption_dataset(train_data_dir=tmp_path / "data_link", cache_dir=tmp_path / "cache",
                                     follow_symlinks=False)
    assert sorted(raw["text"]) == ["a", "alias"]


def test_follow_symlinks_flag_parses() -> None:
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    assert parser.parse_args([]).follow_symlinks is False
    assert parser.parse_args(["--follow_symlinks"]).follow_symlinks is True
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
    assert flags[flags.index("--dataloader_num_workers") + 1] == "--follow_symlinks"


# ---------------------------------------------------------------------------------------------------------------
# long library log lines
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def long_message_filter():
    """Install the filter; afterwards remove it from every logger and library handler it went to."""
    from diffusers_ztsnr.training.log_filters import LIBRARY_LOGGERS, install_long_message_filter

    installed = install_long_message_filter(max_chars=300)
    yield installed
    for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.removeFilter(installed)
    for name in LIBRARY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.removeFilter(installed)


def test_long_message_filter_shortens_existing_and_later_library_loggers(long_message_filter) -> None:
    from diffusers_ztsnr.training.log_filters import install_long_message_filter

    text = "START " + "x" * 2000 + " END"
    before = logging.getLogger("transformers.some_module_before")  # exists when installed again below
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    collect = Collect()
    diffusers_root = logging.getLogger("diffusers")
    diffusers_root.addHandler(collect)
    before.addHandler(collect)
    try:
        assert install_long_message_filter(max_chars=300) is long_message_filter  # idempotent: one filter
        assert before.filters.count(long_message_filter) == 1
        assert collect.filters.count(long_message_filter) == 1
        before.warning("%s", text)  # args are formatted before shortening
        logging.getLogger("diffusers.created_after_install").warning(text)  # reaches the library handler
        logging.getLogger("diffusers.short").warning("short message")
    finally:
        diffusers_root.removeHandler(collect)
        before.removeHandler(collect)
    long_one, after_install, short = seen
    for message in (long_one, after_install):
        assert len(message) <= 350 and message.startswith("START xxx") and message.endswith("xxx END")
        assert f"… ({len(text) - 300} characters omitted) …" in message
    assert short == "short message"


def test_truncated_prompt_warning_of_a_real_pipeline_is_bounded(long_message_filter, caplog) -> None:
    from diffusers_ztsnr.testing.tiny import make_tiny_pipeline
    from diffusers_ztsnr.training.log_filters import install_long_message_filter

    pipe = make_tiny_pipeline("sd15")
    install_long_message_filter(max_chars=300)  # after the pipeline's module (and its logger) is imported
    caption = " ".join(f"word{i}" for i in range(400))  # ~3,200 characters, far over 77 tokens
    ids = pipe.tokenizer(caption).input_ids
    removed_start = pipe.tokenizer.decode(ids[pipe.tokenizer.model_max_length - 1:-1])[:30]
    diffusers_root = logging.getLogger("diffusers")  # does not propagate to the root logger, where caplog listens
    diffusers_root.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            pipe.encode_prompt([caption, "a dog"], "cpu", 1, do_classifier_free_guidance=False)  # pads "a dog"
    finally:
        diffusers_root.removeHandler(caplog.handler)
    (message,) = _messages(caplog, "The following part of your input was truncated")
    assert message.startswith("The following part of your input was truncated because CLIP can only handle "
                              f"sequences up to 77 tokens: ['{removed_start}")
    assert len(message) <= 350 and "characters omitted) …" in message
    assert message.endswith("<|endoftext|>']")  # the end of the padded second prompt is kept
