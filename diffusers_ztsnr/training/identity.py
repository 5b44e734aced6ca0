"""What makes a training run *this* run, recorded in its output folder and checked before anything reuses it.

``run_identity.json`` (written by the main process once the data is validated) holds three parts:

- ``flags``: every flag that changes training, with local paths resolved (so ``out`` and ``/abs/out`` are one
  run); secrets (``--hub_token``) and bookkeeping flags (step counts, logging, validation) are left out;
- ``base_model``: a digest of the base pipeline's files -- the content of its small text files (configs,
  tokenizers) and the name, size and modification time of every weight file -- plus, for a Hub repo id, the
  commit of the cached snapshot. A model re-saved or copied to the same path (new mtimes) counts as changed;
- ``data``: the dataset's own fingerprint (every kept item's file, size and mtime, and its captions).

A resume (``--resume_from_checkpoint``) or a new run in a folder that holds a different run is refused with one
line naming what changed; ``--resume_despite_changes`` continues anyway and records the changes it accepted;
``--overwrite_output_dir`` deletes the old run's checkpoints and records first, so no later resume can pick them up.
Records alone hold nothing to protect: a folder whose run stopped before its first checkpoint (a failed load, a crash
in the first steps) and left no summary or LoRA is reused by the next run as if empty.

One run per folder: :func:`lock_folder` holds an advisory ``fcntl`` lock on ``<output_dir>/.lock`` for the whole run;
a second run on the same folder stops at once with an error naming the holder's pid.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .checkpointing import atomic_write_text, checkpoint_folders, resolve_resume_checkpoint, sha256_file
from .config import InputError

logger = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
FORMAT = 1
SECRET_FLAGS = frozenset({"hub_token"})
# flags that may differ between a run and its resumption without making it "a different run"
RESUME_INSENSITIVE = frozenset({
    "resume_from_checkpoint", "resume_despite_changes", "max_train_steps", "num_train_epochs",
    "checkpointing_steps", "validation_steps", "push_to_hub", "hub_public", "hub_model_id", "overwrite_output_dir",
    "config", "report_to", "logging_dir", "dataloader_num_workers", "checkpoints_total_limit",
    "num_validation_images", "validation_prompt", "validation_inference_steps", "max_consecutive_bad_losses",
    "cache_dir", "cache_latents_dir", "license", "export_checkpoint", "export_dtype", "torch_compile",
    "conversion_probe", "stream_retries",
}) | SECRET_FLAGS
#: flags added after runs were first recorded whose default is not falsy: the value that means "as before"
OFF_VALUES = {"adapter": "lora", "base_quantization": "none", "num_class_images": 100, "prior_loss_weight": 1.0,
              "sample_batch_size": 4, "class_inference_steps": 25}
PATH_FLAGS = ("pretrained_model_name_or_path", "train_data_dir", "dataset_name", "output_dir", "class_data_dir")
# folders a run may create before its identity is first compared (prior preservation writes class images): always
# local, so resolved whether they exist yet or not
_CREATED_FOLDERS = ("output_dir", "class_data_dir")
_TEXT_SUFFIXES = (".json", ".txt", ".model", ".yaml")  # configs, tokenizer vocabularies and merges
# outputs of a previous run that --overwrite_output_dir removes before the new run writes anything
_RUN_RECORDS = ("training_args.json", IDENTITY_FILE, "training_summary.json")
# what a run that got somewhere leaves besides checkpoints: its summary and the exported LoRA
_RUN_OUTPUTS = ("training_summary.json", "pytorch_lora_weights.safetensors")


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as they may be written anywhere (files, trackers, cards): secrets removed."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_FLAGS}


def _resolved(value: Any, key: str) -> Any:
    """``value`` as an absolute path when it names a local path (always for the folders a run creates), else as
    given."""
    if isinstance(value, str) and (key in _CREATED_FOLDERS or Path(value).exists()):
        return str(Path(os.path.expanduser(value)).resolve())
    return value


def training_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that change training, local paths resolved (an absolute and a relative spelling are equal), the
    folders of a ``datasets:`` list's entries too (a resume from another working directory is the same run)."""
    flags = {k: v for k, v in vars(args).items() if k not in RESUME_INSENSITIVE}
    for key in PATH_FLAGS:
        if key in flags:
            flags[key] = _resolved(flags[key], key)
    if flags.get("datasets"):
        flags["datasets"] = [{key: _resolved(value, key) if key in PATH_FLAGS else value
                              for key, value in entry.items()} for entry in flags["datasets"]]
    return flags


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's text files' content and its other files' names, sizes and mtimes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # .cache, .git, lock files: not part of the model
        if path.suffix in _TEXT_SUFFIXES:
            record = [rel, sha256_file(path)]
        else:
            stat = path.stat()
            record = [rel, stat.st_size, stat.st_mtime_ns]
        digest.update(json.dumps(record).encode())
    return digest.hexdigest()[:24]


def model_fingerprint(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """``{"source", "digest"[, "commit"]}`` of a local pipeline folder, or of a Hub repo's cached snapshot."""
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        return {"source": str(local.resolve()), "digest": folder_digest(local)}
    from huggingface_hub import snapshot_download

    try:  # after the pipeline loaded, its files are in the cache: no download, no network
        folder = Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception as error:  # noqa: BLE001 - any cache miss: fall back to the name and revision
        return {"source": name_or_path, "revision": revision, "digest": None, "note": type(error).__name__}
    return {"source": name_or_path, "commit": folder.name, "digest": folder_digest(folder)}


def describe_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities (only the parts both record are compared)."""
    changes = []
    old_flags, new_flags = previous.get("flags", {}), current.get("flags", {})
    if old_flags and new_flags:
        for key in sorted(set(old_flags) | set(new_flags)):
            value = old_flags.get(key, new_flags.get(key))
            if (key in old_flags) != (key in new_flags) and (not value or value == OFF_VALUES.get(key)):
                continue  # a flag one version lacks, left off (None, 0, False, "none") by the other: the same run
            if old_flags.get(key) != new_flags.get(key):
                changes.append(f"--{key} {old_flags.get(key)!r} -> {new_flags.get(key)!r}")
    if previous.get("base_model") and current.get("base_model") and previous["base_model"] != current["base_model"]:
        changes.append(f"the base model's files ({current['base_model'].get('source')})")
    if previous.get("data") and current.get("data") and previous["data"] != current["data"]:
        changes.append("the training data (files, sizes, mtimes or captions)")
    return changes


def read_identity(output_dir: Path) -> dict[str, Any] | None:
    """The recorded identity; a folder written before identities existed yields its flags from training_args.json."""
    record = output_dir / IDENTITY_FILE
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))
    args_file = output_dir / "training_args.json"
    if args_file.is_file():
        old = argparse.Namespace(**json.loads(args_file.read_text(encoding="utf-8")))
        return {"flags": training_flags(old)}
    return None


def holds_run_state(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds anything a run produced: a checkpoint folder (intact or not), a finished run's
    summary or its exported LoRA. Records alone (a run that stopped before its first checkpoint) protect nothing."""
    if checkpoint_folders(output_dir) or (output_dir.is_dir() and any(output_dir.glob("checkpoint-*.tmp"))):
        return True
    return any((output_dir / name).is_file() for name in _RUN_OUTPUTS)


def check_identity(output_dir: Path, current: dict[str, Any], despite_changes: bool) -> list[str]:
    """Refuse (:class:`InputError`, one line) a folder that holds a different run; returns the changes accepted with
    ``despite_changes`` (empty when the runs agree). The records of a run that left no checkpoint and did not
    finish (it stopped on a bad input, a failed load, or early in training) do not count: the folder is free."""
    previous = read_identity(output_dir) if holds_run_state(output_dir) else None
    changes = describe_changes(previous, current) if previous else []
    if changes and not despite_changes:
        raise InputError(
            f"--output_dir {output_dir} holds a different run ({'; '.join(changes)}). Use a new --output_dir, pass "
            "--overwrite_output_dir to delete that run's checkpoints, or --resume_despite_changes to continue it "
            "with the changes (recorded in run_identity.json)."
        )
    return changes


def clear_previous_run(output_dir: Path) -> list[str]:
    """Delete the checkpoints and run records of whatever run ``output_dir`` holds; returns what was removed."""
    removed = []
    if not output_dir.is_dir():
        return removed
    doomed = checkpoint_folders(output_dir) + sorted(output_dir.glob("checkpoint-*.tmp"))
    doomed += sorted(output_dir.glob("checkpoint-*.old"))
    for folder in doomed:
        shutil.rmtree(folder)
        removed.append(folder.name)
    for name in _RUN_RECORDS:
        if (output_dir / name).is_file():
            (output_dir / name).unlink()
            removed.append(name)
    return removed


def write_identity(output_dir: Path, current: dict[str, Any], accepted_changes: list[str], step: int) -> None:
    previous = (read_identity(output_dir) if holds_run_state(output_dir) else None) or {}
    history = list(previous.get("resumed_despite_changes", []))
    if accepted_changes:
        history.append({"step": step, "changes": accepted_changes})
    record = {"format": FORMAT, **current, "resumed_despite_changes": history}
    atomic_write_text(output_dir / IDENTITY_FILE, json.dumps(record, indent=2, sort_keys=True))


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def lock_folder(folder: Path, what: str = "--output_dir", blocking: bool = False) -> Iterator[None]:
    """Hold an advisory lock on ``folder/.lock`` (POSIX ``flock``; released when the process dies, even killed).

    ``blocking=False``: a held lock raises :class:`FolderInUseError` naming the holder's pid. Where ``fcntl`` does
    not exist (Windows) or the file system cannot lock (some network mounts), the run goes on unlocked, with a
    warning in the second case.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FolderInUseError(f"{what} {folder} is in use by another training run (pid {holder}); wait for it "
                                   f"to finish or choose another {what}.") from None
        except OSError as error:  # ENOLCK and friends: locking unsupported here
            logger.warning("could not lock %s (%s): a second run on this folder would not be detected", folder, error)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --- the output folder at the start of a run (main process) ---------------------------------------------------


def resuming_despite_changes(args: argparse.Namespace) -> bool:
    return bool(args.resume_despite_changes and args.resume_from_checkpoint)


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Main process, before anything loads: delete the run ``--overwrite_output_dir`` replaces, refuse a folder
    holding a run with other flags, and find the checkpoint to resume (each fails early with a clear message)."""
    output_dir = Path(args.output_dir)
    if args.overwrite_output_dir:
        removed = clear_previous_run(output_dir)
        if removed:
            logger.warning("--overwrite_output_dir: deleted %s from %s", ", ".join(removed), output_dir)
    else:
        check_identity(output_dir, {"flags": training_flags(args)}, resuming_despite_changes(args))
    if args.resume_from_checkpoint:
        resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)


def record_run(args: argparse.Namespace, identity: dict[str, Any], resume_step: int) -> None:
    """Main process, once model and data are known: check the whole identity, then record it and the flags
    (``resume_step``: the checkpoint resumed from, 0 for a new run)."""
    output_dir = Path(args.output_dir)
    accepted = check_identity(output_dir, identity, resuming_despite_changes(args))
    if accepted:
        logger.warning("--resume_despite_changes: resuming with %s", "; ".join(accepted))
    write_identity(output_dir, identity, accepted, resume_step)
    atomic_write_text(output_dir / "training_args.json", json.dumps(recorded_args(args), indent=2, sort_keys=True))
