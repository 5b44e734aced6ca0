"""The whole run's per-step losses, carried across resumes, and the ``training_summary.json`` written from them.

Each checkpoint holds ``loss_history.json``: the loss of every optimizer step up to its own step and the step range
of each launch that led to it (``segments``). A resume restores it, so the summary of a run resumed any number of
times lists every step's loss, as an uninterrupted run's does. JSON, not pickle: nothing in a checkpoint is
unpickled, and Python's float repr reads back bit for bit. A checkpoint without the file (written before it
existed) yields ``null`` for the steps it covers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpointing import atomic_write_text

HISTORY_FILE = "loss_history.json"
SUMMARY_FILE = "training_summary.json"


class LossHistory:
    """``losses[i]``: the loss of optimizer step ``i + 1`` (``None`` where unknown); ``segments``: one
    ``{"start_step", "end_step"}`` per launch, the current one ending at the last recorded step."""

    def __init__(self) -> None:
        self.losses: list[float | None] = []
        self.earlier_segments: list[dict[str, Any]] = []
        self.launch_start = 0

    @property
    def step(self) -> int:
        return len(self.losses)

    @property
    def launch_losses(self) -> list[float | None]:
        """The losses of this launch's steps only."""
        return self.losses[self.launch_start:]

    @property
    def segments(self) -> list[dict[str, Any]]:
        return [*self.earlier_segments, {"start_step": self.launch_start, "end_step": self.step}]

    def append(self, loss: float) -> None:
        self.losses.append(loss)

    def save(self, folder: Path) -> None:
        """Into a checkpoint folder being written (its manifest then covers the file)."""
        record = {"losses": self.losses, "segments": self.segments}
        (Path(folder) / HISTORY_FILE).write_text(json.dumps(record), encoding="utf-8")

    def load(self, folder: Path, step: int) -> None:
        """From the checkpoint of optimizer step ``step`` that this launch resumes."""
        path = Path(folder) / HISTORY_FILE
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        losses, segments = record.get("losses"), record.get("segments")
        if isinstance(losses, list) and len(losses) == step and isinstance(segments, list):
            self.losses, self.earlier_segments = list(losses), list(segments)
        else:  # no (usable) history: the steps are known, their losses are not
            self.losses = [None] * step
            self.earlier_segments = [{"start_step": 0, "end_step": step, "losses_recorded": False}] if step else []
        self.launch_start = step


def write_summary(output_dir: Path, history: LossHistory, result: dict[str, Any], report: Any) -> dict[str, Any]:
    """``training_summary.json``: the whole run's losses and launches, this launch's other numbers, and the images
    and captions the data report skipped (``report``: the dataset's ``bad_images`` / ``missing_captions``)."""
    summary = {k: v for k, v in result.items() if k not in ("output_dir", "losses")}
    summary["losses"] = history.losses
    summary["segments"] = history.segments
    summary["skipped_images"] = [[str(v) for v in bad] for bad in report.bad_images]
    summary["skipped_captions"] = [[str(v) for v in row] for row in report.missing_captions]
    atomic_write_text(Path(output_dir) / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary
