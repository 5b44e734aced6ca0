"""Faults during training: NaN/Inf losses (skipped, counted, stopped after K in a row) and a full disk while a
checkpoint is written. Tiny SD1.5 runs in this process, with the loss or ``torch.save`` wrapped to fail on
chosen steps; resumed runs must still end bitwise equal to uninterrupted ones (CPU)."""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_ztsnr.training import step, unet
from diffusers_ztsnr.training.checkpointing import (
    CheckpointWriteError,
    checkpoint_folders,
    resolve_resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from diffusers_ztsnr.training.loop import NonFiniteLossError, step_generator
from tests.train_utils import DDP_LAUNCH, REPO, launch_two_cpu_processes, tiny_assets, worker_hook

RES = 32
STEPS = 8
SEED = 5
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("faults"), "sd15")


def run(assets, out, *extra, steps=STEPS):
    argv = ["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "4", "--report_to", "none",
            "--checkpointing_steps", "1", "--prediction_type", "v_prediction", "--zero_terminal_snr",
            "--seed", str(SEED), *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading chatter
        return unet.main(argv)


def lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / LORA)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def nan_on(monkeypatch):
    """``nan_on({2, 5})``: the loss of optimizer steps 2 and 5 (1-based; or ``(step, micro)`` pairs) is NaN.

    Keyed on the step's generator seed, which is a function of (seed, step, micro-step, rank) only, so the same
    steps fail again after a resume."""
    original = step.batch_loss

    def install(steps):
        pairs = [s if isinstance(s, tuple) else (s, 0) for s in steps]
        bad = {step_generator(SEED, number - 1, micro, 0).initial_seed() for number, micro in pairs}

        def loss(task, objective, model, latents, cond, batch, generator, *rest):
            value = original(task, objective, model, latents, cond, batch, generator, *rest)
            return value * float("nan") if generator.initial_seed() in bad else value

        monkeypatch.setattr(step, "batch_loss", loss)

    yield install
    monkeypatch.setattr(step, "batch_loss", original)


@pytest.fixture(scope="module")
def clean(assets, tmp_path_factory):
    """The uninterrupted run without faults."""
    out = tmp_path_factory.mktemp("clean")
    run(assets, out)
    return lora(out)


def test_nan_losses_are_skipped_counted_and_resume_exactly(assets, tmp_path, nan_on, clean):
    nan_on({2, 5})
    result = run(assets, tmp_path / "a")
    assert result["global_step"] == STEPS and result["skipped_steps"] == 2
    nan_steps = [i + 1 for i, v in enumerate(result["losses"]) if v != v]
    assert nan_steps == [2, 5]
    summary = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    assert summary["skipped_steps"] == 2
    weights = lora(tmp_path / "a")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], clean[k]) for k in weights)  # the skipped updates are missing
    # counters live in the checkpoints: a resume after a skipped step continues the same count and weights
    run(assets, tmp_path / "b", steps=3)
    counters = json.loads((tmp_path / "b" / "checkpoint-3" / "counters.json").read_text())
    assert counters == {"skipped_steps": 1, "consecutive_bad": 0}
    resumed = run(assets, tmp_path / "b", "--resume_from_checkpoint", "latest")
    assert resumed["skipped_steps"] == 2 and len(resumed["losses"]) == STEPS - 3
    assert_bitwise_equal(lora(tmp_path / "b"), weights)


def test_k_bad_losses_in_a_row_stop_with_advice_and_a_resumable_checkpoint(assets, tmp_path, nan_on, monkeypatch):
    nan_on({3, 4, 5})
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError) as caught:
        run(assets, out, "--max_consecutive_bad_losses", "3")
    message = str(caught.value)
    assert "3 optimizer steps in a row had a NaN/Inf loss (stopped at step 5" in message
    for advice in ("fp16 overflow", "--mixed_precision bf16", "learning rate", "--learning_rate",
                   "epsilon target at SNR 0", "--max_consecutive_bad_losses"):
        assert advice in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact: no warning about a damaged checkpoint
        latest = resolve_resume_checkpoint(out, "latest")
    assert latest.name == "checkpoint-4" and verify_checkpoint(latest) is None
    assert not list(out.glob("*.tmp"))
    assert json.loads((latest / "counters.json").read_text()) == {"skipped_steps": 2, "consecutive_bad": 2}
    nan_on(set())  # the cause fixed: the run resumes and finishes
    resumed = run(assets, out, "--max_consecutive_bad_losses", "3", "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == STEPS and resumed["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in lora(out).values())


def test_one_bad_micro_step_skips_the_whole_accumulated_update(assets, tmp_path, nan_on):
    """With gradient accumulation a NaN micro-batch spoils the summed gradient (0 * NaN is NaN) even when the
    step's last micro-batch is finite: the update must be skipped, not applied with NaN gradients."""
    nan_on({(2, 0)})
    result = run(assets, tmp_path / "out", "--gradient_accumulation_steps", "2", steps=4)
    assert result["skipped_steps"] == 1 and result["global_step"] == 4
    assert all(v == v for v in result["losses"][2:])
    assert all(torch.isfinite(v).all() for v in lora(tmp_path / "out").values())


# --- disk full while a checkpoint is written ---------------------------------------------------------------


def test_disk_full_during_a_checkpoint_stops_clearly_and_the_run_resumes(assets, tmp_path, monkeypatch, clean):
    out = tmp_path / "out"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-3.tmp" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        run(assets, out, "--checkpoints_total_limit", "1")
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert f"no space left on device while writing checkpoint-3 in {out}" in message
    assert "the previous checkpoint checkpoint-2 is intact" in message
    assert "--checkpoints_total_limit" in message and "--output_dir" in message
    assert [p.name for p in checkpoint_folders(out)] == ["checkpoint-2"] and not list(out.glob("*.tmp"))
    assert verify_checkpoint(out / "checkpoint-2") is None
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    resumed = run(assets, out, "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest")
    assert len(resumed["losses"]) == STEPS - 2
    assert_bitwise_equal(lora(out), clean)


def write_state(folder: str) -> None:
    torch.save({"w": torch.zeros(8)}, Path(folder) / "lora_0.pt")


def test_save_checkpoint_write_failures(tmp_path):
    first = save_checkpoint(tmp_path, 1, write_state, total_limit=1)

    def full(folder):
        write_state(folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match=r"no space left on device while writing checkpoint-2 .*"
                                                   r"the previous checkpoint checkpoint-1 is intact") as caught:
        save_checkpoint(tmp_path, 2, full, total_limit=1)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"] and verify_checkpoint(first) is None
    # nothing intact yet: said so
    with pytest.raises(CheckpointWriteError, match="there is no earlier intact checkpoint"):
        save_checkpoint(tmp_path / "fresh", 1, full)
    assert not (tmp_path / "fresh" / "checkpoint-1.tmp").exists()
    # torch.save reports a failed write as a RuntimeError from its zip writer: recognised too
    if os.path.exists("/dev/full"):
        def torch_write_fails(folder):
            torch.save({"w": torch.zeros(1000)}, "/dev/full")

        with pytest.raises(CheckpointWriteError, match=r"while writing checkpoint-3 .*RuntimeError"):
            save_checkpoint(tmp_path, 3, torch_write_fails)
    # an error that is not about writing passes through unchanged, and leaves no .tmp behind
    def bug(folder):
        raise RuntimeError("a bug in a save hook")

    with pytest.raises(RuntimeError, match="^a bug in a save hook$"):
        save_checkpoint(tmp_path, 4, bug)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "fresh"]


FULL_DISK_AT_STEP_2 = '''
import errno

from diffusers_ztsnr.training import checkpointing

_save = checkpointing.save_checkpoint


def save_checkpoint(output_dir, step, save_state, total_limit=None):
    def full_disk(folder):
        raise OSError(errno.ENOSPC, "No space left on device", folder)

    return _save(output_dir, step, full_disk if step == 2 else save_state, total_limit)


checkpointing.save_checkpoint = save_checkpoint  # before loop.py imports the name
'''


def test_a_failed_checkpoint_write_stops_every_rank_instead_of_hanging(assets, tmp_path):
    """2 processes (DDP over gloo): rank 0's disk is full at step 2. Rank 0 raises the CheckpointWriteError and rank 1
    learns of it and stops with its own message (it is not merely killed by the launcher, which would not happen
    across nodes); checkpoint-1 stays intact."""
    out = tmp_path / "ddp"
    args = ["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
            "--resolution", "32", "--center_crop", "--train_batch_size", "2", "--max_train_steps", "4",
            "--prediction_type", "v_prediction", "--zero_terminal_snr", "--report_to", "none",
            "--checkpointing_steps", "1", "--output_dir", str(out)]
    done = launch_two_cpu_processes(DDP_LAUNCH, REPO / "train_scripts" / "train_lora_unet.py", args, timeout=240,
                                    **worker_hook(tmp_path, FULL_DISK_AT_STEP_2))  # a hang fails with the stacks
    assert done.returncode != 0
    assert "no space left on device while writing checkpoint-2" in done.stderr.lower(), done.stderr[-3000:]
    assert "rank 0 could not write checkpoint-2" in done.stderr, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert verify_checkpoint(out / "checkpoint-1") is None
