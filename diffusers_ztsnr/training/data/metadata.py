"""Checks of a ``metadata.jsonl`` before ``datasets``' imagefolder loader reads it: each problem it would mishandle
(a twice-named file, mixed caption types, a line that is not an object) is a ``ValueError`` naming ``file:line``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

_FILE_NAME_KEY = re.compile(r"^(.*_)?file_names?$")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list of non-strings"
    return f"a {type(value).__name__}"


def _caption_kind(caption: Any, where: str, caption_column: str) -> str | None:
    """``"a string"``, ``"a list of strings"``, ``"an empty list"`` or ``None`` (null / absent: skipped and counted
    later); raise a ``ValueError`` naming ``where`` and the fix for any other value."""
    if caption is None:
        return None
    if isinstance(caption, str):
        return "a string"
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return "a list of strings" if caption else "an empty list"
    raise ValueError(
        f"{where}: caption {caption_column!r} is {_json_kind(caption)} ({json.dumps(caption)[:60]}): "
        'a caption is a string (quote numbers: "3"), a list of alternative strings, or null to skip the row'
    )


def _check_caption_kinds(path: Path, line_no: int, kind: str, kinds: dict[str, int], caption_column: str) -> None:
    """Raise if ``kinds`` (kind -> first line) mixes strings with lists, or an empty list with strings.

    An empty list beside list captions is a row without a caption (skipped and counted later); beside string
    captions Arrow cannot load it, so it is named at its own line.
    """
    other = next((k for k in kinds if k not in (kind, "an empty list")), None)
    if kind != "an empty list" and other is not None:
        raise ValueError(
            f"{path}:{line_no}: caption {caption_column!r} is {kind} but line {kinds[other]} has {other}: use one "
            'type per file (write single captions as one-element lists, ["a photo of a cat"])'
        )
    if "an empty list" in kinds and "a string" in kinds:
        raise ValueError(
            f"{path}:{kinds['an empty list']}: caption {caption_column!r} is an empty list of captions ([]) in a "
            f'file of string captions (line {kinds["a string"]}): write a caption string ("" for an unconditional '
            "caption), or null to skip the row"
        )


def _check_metadata_jsonl(path: Path, caption_column: str, seen: dict[str, tuple[Path, int]]) -> None:
    """Raise a ``ValueError`` naming ``path:line`` and the fix for rows the imagefolder loader would mishandle.

    Checked per line: a JSON object, with a ``file_name`` (or ``*_file_name(s)``) key, naming a file no other row
    names (``seen`` maps each resolved ``file_name`` to its first ``(file, line)`` and spans metadata files), and
    a caption that is a string, a list of strings or null/absent, with one of string / list per file. An empty
    list (``[]``) is allowed only among list captions (then it is a row without a caption), and not in a file
    where no line has a caption. ``datasets`` trains a twice-named file twice, and fails with an Arrow "changed
    from string to number" error on mixed types. A leading UTF-8 byte-order mark is skipped (``datasets`` reads
    such a file correctly too).
    """
    example = '{"file_name": "0001.png", "' + caption_column + '": "a photo of a cat"}'
    kinds: dict[str, int] = {}  # "a string" / "a list of strings" / "an empty list" -> first line
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where} is not valid JSON ({e.msg}): write one object per line, e.g. {example}"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{where} is {_json_kind(row)}, not a JSON object: write e.g. {example}")
            if not any(_FILE_NAME_KEY.match(key) for key in row):
                raise ValueError(f'{where} has no "file_name": every line names its image, e.g. {example}')
            name = row.get("file_name")
            if isinstance(name, str):
                target = os.path.normpath(path.parent / name)
                if target in seen:
                    first, first_line = seen[target]
                    raise ValueError(
                        f"{where} names {name!r} again (first at {first}:{first_line}): give each image one row; for "
                        f'several captions of one image use a list, {{"file_name": {json.dumps(name)}, '
                        f'"{caption_column}": ["caption 1", "caption 2"]}}'
                    )
                seen[target] = (path, line_no)
            kind = _caption_kind(row.get(caption_column), where, caption_column)
            if kind is not None:
                kinds.setdefault(kind, line_no)
                _check_caption_kinds(path, line_no, kind, kinds, caption_column)
    if list(kinds) == ["an empty list"]:
        raise ValueError(
            f"{path}:{kinds['an empty list']}: caption {caption_column!r} is an empty list of captions ([]) and no "
            f'line of the file has a caption: give each row at least one, e.g. ["a photo of a cat"], or null to '
            "skip the row"
        )

