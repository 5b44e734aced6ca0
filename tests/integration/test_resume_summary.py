"""``training_summary.json`` describes the whole run however often it was resumed: every step's loss (carried in
each checkpoint's ``loss_history.json``, JSON, covered by the manifest) and the step range of every launch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusers_ztsnr.training import unet
from diffusers_ztsnr.training.checkpointing import verify_checkpoint, write_manifest
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("summary"), "sd15")


def run(assets, out: Path, steps: int, *extra: str) -> dict:
    return unet.main(["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
                      "--output_dir", str(out), "--resolution", str(RES), "--center_crop", "--train_batch_size", "2",
                      "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--report_to", "none",
                      "--learning_rate", "1e-3", "--prediction_type", "v_prediction", "--zero_terminal_snr", *extra])


def summary(out: Path) -> dict:
    return json.loads((out / "training_summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return run(assets, out, 6), summary(out)


def test_a_resumed_runs_summary_holds_every_steps_loss_bitwise(assets, tmp_path, uninterrupted):
    full, full_summary = uninterrupted
    out = tmp_path / "out"
    run(assets, out, 4)
    history = json.loads((out / "checkpoint-4" / "loss_history.json").read_text())
    assert history == {"losses": summary(out)["losses"], "segments": [{"start_step": 0, "end_step": 4}]}
    assert verify_checkpoint(out / "checkpoint-4") is None  # the manifest covers the history file
    resumed = run(assets, out, 6, "--resume_from_checkpoint", "latest")
    assert len(resumed["losses"]) == 2  # what this launch trained
    got = summary(out)
    assert got["global_step"] == 6 and len(got["losses"]) == 6
    np.testing.assert_array_equal(np.array(got["losses"]), np.array(full["losses"]))  # bitwise (float64)
    assert got["losses"] == full_summary["losses"]
    assert got["segments"] == [{"start_step": 0, "end_step": 4}, {"start_step": 4, "end_step": 6}]
    assert full_summary["segments"] == [{"start_step": 0, "end_step": 6}]
    # resuming an earlier checkpoint keeps that checkpoint's history, not the later launch's
    run(assets, out, 6, "--resume_from_checkpoint", "checkpoint-2")
    assert summary(out)["losses"] == full_summary["losses"]
    assert summary(out)["segments"] == [{"start_step": 0, "end_step": 2}, {"start_step": 2, "end_step": 6}]


def test_a_checkpoint_without_a_history_yields_unknown_losses_for_its_steps(assets, tmp_path, uninterrupted):
    full, _ = uninterrupted
    out = tmp_path / "out"
    run(assets, out, 4)
    (out / "checkpoint-4" / "loss_history.json").unlink()  # as written before checkpoints held one
    write_manifest(out / "checkpoint-4", 4)
    run(assets, out, 6, "--resume_from_checkpoint", "latest")
    got = summary(out)
    assert got["losses"][:4] == [None] * 4 and got["losses"][4:] == full["losses"][4:]
    assert got["segments"] == [{"start_step": 0, "end_step": 4, "losses_recorded": False},
                               {"start_step": 4, "end_step": 6}]
