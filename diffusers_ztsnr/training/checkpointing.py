"""Checkpoint folders that are never half-written, and the ``latest`` one that is intact.

``accelerator.save_state`` writes into ``checkpoint-N.tmp``; a ``COMPLETE`` file is written last and the
folder is then renamed to ``checkpoint-N`` (``os.replace`` is atomic on one file system), so a kill at any
point leaves either the previous checkpoints or a ``.tmp`` folder that is ignored and removed later.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-<step> folder.")
    return int(match.group(1))


def intact_checkpoints(output_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    complete = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    for p in sorted(set(found) - set(complete)):
        warnings.warn(f"ignoring incomplete checkpoint {p} (no {COMPLETE_MARKER} file).", UserWarning, stacklevel=2)
    return sorted(complete, key=checkpoint_step)


def resolve_resume_checkpoint(output_dir: Path, resume_from_checkpoint: str) -> Path:
    """``latest`` -> the newest intact checkpoint in ``output_dir``; a path -> that folder (checked)."""
    if resume_from_checkpoint == "latest":
        checkpoints = intact_checkpoints(output_dir)
        if not checkpoints:
            raise ValueError(
                f"--resume_from_checkpoint latest: no intact checkpoint-<step> folder in {output_dir}. "
                "Start without --resume_from_checkpoint, or point --output_dir at the run to resume."
            )
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = output_dir / path
    if not path.is_dir() or not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: {path} is not an intact checkpoint.")
    return path


def save_checkpoint(output_dir: Path, step: int, save_state: Callable[[str], None],
                    total_limit: int | None = None) -> Path:
    """Write ``checkpoint-step`` atomically with ``save_state(folder)``, then prune to ``total_limit``."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state(str(tmp))
    (tmp / COMPLETE_MARKER).write_text(str(step), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None:
        intact = intact_checkpoints(output_dir)
        for old in intact[: max(0, len(intact) - max(total_limit, 1))]:  # never delete the only intact one
            shutil.rmtree(old)
    for stale in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final
