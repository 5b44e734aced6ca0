"""Checkpoint folders that are never half-written, verified before they are resumed from.

``accelerator.save_state`` writes into ``checkpoint-N.tmp``; a ``COMPLETE`` file is written last and the
folder is then renamed to ``checkpoint-N`` (``os.replace`` is atomic on one file system), so a kill at any
point leaves either the previous checkpoints or a ``.tmp`` folder that is ignored and removed later.

``COMPLETE`` holds a manifest (JSON: the step and every file's size and sha256), so a checkpoint that was
damaged *after* it was written -- a truncated or changed file, a missing file, a power cut that kept the rename
but not the data -- is recognised: ``resolve_resume_checkpoint(.., "latest")`` warns, naming the folder and the
problem, and resumes from the newest checkpoint that verifies. A ``COMPLETE`` holding only the step number
(an early format) cannot be verified and is refused like a damaged one.

``--resume_from_checkpoint latest`` with no intact checkpoint is an error, never a silent fresh start (a typo in
``--output_dir`` must not restart a long run from step 0): a run killed before its first checkpoint was
complete is started again without ``--resume_from_checkpoint``; the error says so.

A write that fails (disk full, quota, I/O error) raises :class:`CheckpointWriteError` naming the previous intact
checkpoint; the ``.tmp`` folder is removed and no older checkpoint is pruned.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from .config import InputError

COMPLETE_MARKER = "COMPLETE"
MANIFEST_FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
# torch.save reports a failed write as a RuntimeError from its C++ zip writer, not as an OSError
_TORCH_WRITE_FAILURE = ("PytorchStreamWriter", "inline_container", "file write failed")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous ones are untouched."""


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint-<step> folder.")
    return int(match.group(1))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != COMPLETE_MARKER)


def write_manifest(folder: Path, step: int) -> dict:
    """Record every file's size and sha256 in ``folder/COMPLETE`` (written last; files fsync'ed first)."""
    files = {}
    for path in _files(folder):
        with open(path, "rb") as f:
            try:
                os.fsync(f.fileno())  # the data reaches the disk before the rename that publishes it
            except OSError:
                pass
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps(manifest, indent=1, sort_keys=True), fsync=True)
    return manifest


def verify_checkpoint(path: Path, deep: bool = True) -> str | None:
    """What is wrong with checkpoint folder ``path`` (``None``: intact). ``deep=False`` checks sizes only."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} file (the write did not finish)"
    try:
        text = marker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        return f"unreadable {COMPLETE_MARKER} file ({error})"
    expected_step = checkpoint_step(path) if _NAME.match(path.name) else None
    if text.isdigit():  # the earliest format: the step number only, nothing that could be verified
        return (f"{COMPLETE_MARKER} holds no manifest (an early format), so its files cannot be verified; resume "
                "from a checkpoint this version wrote, or start the run again")
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError):
        return f"damaged {COMPLETE_MARKER} manifest"
    if expected_step is not None and step != expected_step:
        return f"{COMPLETE_MARKER} says step {step}, the folder name step {expected_step}"
    for name, record in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != record["size"]:
            return f"{name} is {size} bytes, the manifest says {record['size']} (truncated or changed)"
        if deep and sha256_file(file) != record["sha256"]:
            return f"{name} changed since it was written (sha256 differs from the manifest)"
    return None


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-N`` folder (intact or not), oldest first."""
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name)), key=checkpoint_step)


def intact_checkpoints(output_dir: Path, deep: bool = True, warn: bool = True) -> list[Path]:
    """``checkpoint-N`` folders that verify against their manifest, oldest first; the others are warned about."""
    intact = []
    for path in checkpoint_folders(output_dir):
        problem = verify_checkpoint(path, deep=deep)
        if problem is None:
            intact.append(path)
        elif warn:
            warnings.warn(f"ignoring damaged or incomplete checkpoint {path}: {problem}.", UserWarning, stacklevel=2)
    return intact


def resolve_resume_checkpoint(output_dir: Path, resume_from_checkpoint: str) -> Path:
    """``latest`` -> the newest intact checkpoint in ``output_dir``; a path -> that folder (verified)."""
    if resume_from_checkpoint == "latest":
        checkpoints = []
        for path in reversed(checkpoint_folders(output_dir)):  # newest first; stop at the first that verifies
            problem = verify_checkpoint(path)
            if problem is None:
                checkpoints = [path]
                break
            warnings.warn(f"ignoring damaged or incomplete checkpoint {path}: {problem}.", UserWarning, stacklevel=2)
        if not checkpoints:
            found = [p.name for p in checkpoint_folders(output_dir)]
            found += sorted(p.name for p in output_dir.glob("checkpoint-*.tmp")) if output_dir.is_dir() else []
            seen = (f"; found only damaged or unfinished ones: {', '.join(found)} (a run killed before its first "
                    "checkpoint was complete starts again without --resume_from_checkpoint)") if found else ""
            raise InputError(
                f"--resume_from_checkpoint latest: no intact checkpoint-<step> folder in {output_dir}{seen}. "
                "Start without --resume_from_checkpoint, or point --output_dir at the run to resume."
            )
        newest = checkpoint_folders(output_dir)[-1]
        if newest != checkpoints[-1]:
            warnings.warn(f"resuming from {checkpoints[-1].name}, the newest intact checkpoint, not from the newer "
                          f"but damaged {newest}.", UserWarning, stacklevel=2)
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = output_dir / path
    if not path.is_dir():
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: {path} is not an intact checkpoint "
                         "(no such folder).")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: {path} is not an intact checkpoint "
                         f"({problem}). Use --resume_from_checkpoint latest to take the newest intact one.")
    return path


def atomic_write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Write ``path`` so that a kill leaves the old content or the new one, never a truncated file."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_write_failure(error: BaseException) -> bool:
    return isinstance(error, OSError) or (isinstance(error, RuntimeError)
                                          and any(s in str(error) for s in _TORCH_WRITE_FAILURE))


def _write_error(output_dir: Path, step: int, error: BaseException) -> CheckpointWriteError:
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    code = getattr(error, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error) or (free is not None
                                                                                     and free < 1 << 20)
    try:
        previous = intact_checkpoints(output_dir, deep=False, warn=False)
    except OSError:
        previous = []
    kept = (f"the previous checkpoint {previous[-1].name} is intact (--resume_from_checkpoint latest resumes from "
            "it)" if previous else "there is no earlier intact checkpoint")
    what = "no space left on device" if full else "could not write the checkpoint"
    free_text = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    message = (f"{what} while writing checkpoint-{step} in {output_dir} ({type(error).__name__}: {error}; "
               f"{free_text}); the unfinished checkpoint-{step}.tmp was removed and {kept}. Free space, lower "
               "--checkpoints_total_limit or set --output_dir elsewhere, then resume.")
    return CheckpointWriteError(code or (errno.ENOSPC if full else errno.EIO), message)


def _remove(folder: Path) -> None:
    """Delete a folder so that a kill half-way never leaves a ``checkpoint-N`` that looks complete."""
    doomed = folder.with_name(folder.name + ".old")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def save_checkpoint(output_dir: Path, step: int, save_state: Callable[[str], None],
                    total_limit: int | None = None) -> Path:
    """Write ``checkpoint-step`` atomically with ``save_state(folder)``, then prune to ``total_limit``.

    Pruning keeps the new checkpoint and the ``total_limit - 1`` newest other intact ones, and deletes older
    intact and damaged ones; a damaged checkpoint never counts towards the limit, so it can never cost the only
    intact one. A failed write raises :class:`CheckpointWriteError` and prunes nothing.
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_state(str(tmp))
        write_manifest(tmp, step)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
    except BaseException as error:
        failure = _write_error(output_dir, step, error) if _is_write_failure(error) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise failure from error
    if total_limit is not None:
        keep = max(total_limit, 1) - 1  # besides the new one
        others = [p for p in intact_checkpoints(output_dir, deep=False, warn=False) if p != final]
        doomed = others[: max(0, len(others) - keep)]
        doomed += [p for p in checkpoint_folders(output_dir) if checkpoint_step(p) < step
                   and p not in others and p != final]  # damaged ones older than the new checkpoint
        for old in doomed:
            _remove(old)
    for pattern in ("checkpoint-*.tmp", "checkpoint-*.old"):
        for stale in output_dir.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    return final


# --- what a checkpoint holds besides accelerate's own files (which accelerate loads weights-only) -----------------
# Tensors go to safetensors, scalars to JSON: nothing in a checkpoint folder is unpickled, so a planted file can
# be refused but never run.


def save_tensor_state(path: Path, tensors: dict, scalars: dict | None = None) -> None:
    """``tensors`` to a safetensors file at ``path``; JSON-able ``scalars`` in its metadata."""
    from safetensors.torch import save_file

    metadata = {"scalars": json.dumps(scalars or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensor_state(path: Path) -> tuple[dict, dict]:
    """``(tensors, scalars)`` written by :func:`save_tensor_state`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        scalars = json.loads((f.metadata() or {}).get("scalars", "{}"))
    return load_file(str(path)), scalars


def save_ema_state(path: Path, state: dict) -> None:
    """diffusers ``EMAModel.state_dict()``: the shadow parameters as tensors, the rest as scalars."""
    shadow = {f"shadow_params.{i}": p for i, p in enumerate(state["shadow_params"])}
    save_tensor_state(path, shadow, {k: v for k, v in state.items() if k != "shadow_params"})


def load_ema_state(path: Path) -> dict:
    tensors, scalars = load_tensor_state(path)
    shadow = [tensors[f"shadow_params.{i}"] for i in range(len(tensors))]
    return {**scalars, "shadow_params": shadow}
