"""A run's inputs -- base model, data folder, checkpoint to resume, model family -- are checked before anything is
written to ``--output_dir``: a refused run leaves no folder, lock, ``training_args.json`` or ``run_identity.json``,
and the corrected command then runs in the same ``--output_dir`` without ``--overwrite_output_dir``. A path that
looks local is never looked up on the Hub; a Hub id that cannot be read is one line naming the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusers_ztsnr.training import flow, step, unet
from diffusers_ztsnr.training.inputs import looks_local
from tests.train_utils import RES, tiny_assets

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("inputs"), "sd15")


def argv(model, data, out, *extra: str, steps: int = 1) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--report_to", "none", "--prediction_type", "v_prediction", "--zero_terminal_snr", *extra]


def refused(main, args) -> str:
    """The one-line message of a run refused before it started."""
    with pytest.raises((SystemExit, ValueError)) as caught:
        main(args)
    error = caught.value
    message = str(error.code) if isinstance(error, SystemExit) else str(error)
    assert "\n" not in message, message
    return message


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub lookup fails the test (diffusers reads every model_index.json through load_config)."""
    import diffusers

    def load_config(*args, **kwargs):
        raise AssertionError("a local-looking path was looked up on the Hub")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", classmethod(load_config))
    return monkeypatch


@pytest.mark.parametrize("name,local", [("owner/name", False), ("sd-model", False), ("./models/sd15", True),
                                        ("../sd15", True), ("~/models/sd15", True), ("/abs/sd15", True),
                                        ("models/sd15/v2", True), ("models\\sd15", True), (".", True)])
def test_what_looks_local(name, local):
    assert looks_local(name) is local


def test_a_missing_local_model_fails_at_once_and_the_corrected_run_reuses_the_output_dir(assets, tmp_path, no_hub):
    out = tmp_path / "out"
    start = time.perf_counter()
    message = refused(unet.main, argv(tmp_path / "models" / "sd15", assets["data"], out))
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed
    assert message == (f"error: --pretrained_model_name_or_path {tmp_path / 'models' / 'sd15'}: no such folder (a "
                       "local path, so the Hub was not asked; a Hub repo id is owner/name, e.g. "
                       "stable-diffusion-v1-5/stable-diffusion-v1-5).")
    assert not out.exists()  # no folder, lock, training_args.json or run_identity.json
    no_hub.undo()
    assert unet.main(argv(assets["sd15"], assets["data"], out))["global_step"] == 1


def test_a_folder_that_is_no_pipeline_and_a_missing_data_dir_are_named_together(assets, tmp_path, no_hub):
    out = tmp_path / "out"
    message = refused(unet.main, argv(assets["data"], tmp_path / "no-data", out))
    assert message == (f"error: --train_data_dir {tmp_path / 'no-data'}: no such folder; "
                       f"--pretrained_model_name_or_path {assets['data']} is a folder without model_index.json, not a "
                       "diffusers pipeline folder (save one with DiffusionPipeline.save_pretrained, or load a "
                       "single-file checkpoint with from_single_file and save that).")
    assert not out.exists()


def test_an_unreadable_hub_id_is_one_line_naming_the_fix(assets, tmp_path):
    out = tmp_path / "out"
    message = refused(unet.main, argv("someone/not-a-cached-model", assets["data"], out))  # the suite runs offline
    assert message.startswith("error: --pretrained_model_name_or_path someone/not-a-cached-model: could not read it "
                              "from the Hugging Face Hub (")
    assert message.endswith("HF_HUB_OFFLINE is set and someone/not-a-cached-model is not in the local Hub cache: "
                            "download it once online (hf download someone/not-a-cached-model), or pass a local "
                            "pipeline folder.")
    assert not out.exists()


def test_the_other_familys_model_and_a_resume_without_a_run_write_nothing(assets, tmp_path):
    out = tmp_path / "out"
    flow_args = argv(assets["sd15"], assets["data"], out)[:6] + ["--resolution", "32", "--report_to", "none"]
    assert "use train_lora_unet.py" in refused(flow.main, flow_args)
    assert "no intact checkpoint-<step> folder" in refused(
        unet.main, argv(assets["sd15"], assets["data"], out, "--resume_from_checkpoint", "latest"))
    assert not out.exists()


def test_records_of_a_run_that_stopped_before_its_first_checkpoint_do_not_refuse_the_next(assets, tmp_path,
                                                                                           monkeypatch):
    out = tmp_path / "out"
    def failing_loss(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:  # the first optimizer step fails, after the run was recorded
        patch.setattr(step, "batch_loss", failing_loss)
        with pytest.raises(RuntimeError, match="out of memory"):
            unet.main(argv(assets["sd15"], assets["data"], out))
    assert (out / "run_identity.json").is_file() and not list(out.glob("checkpoint-*"))
    assert unet.main(argv(assets["sd15"], assets["data"], out, "--rank", "2"))["global_step"] == 1
    # a run that got somewhere (here: finished) is still protected
    message = refused(unet.main, argv(assets["sd15"], assets["data"], out, "--rank", "8"))
    assert "holds a different run (--rank 2 -> 8)" in message


def test_the_script_prints_one_line_and_exits_2(assets, tmp_path):
    """As a command (imports included, so no timing is asserted here): the line, status 2, nothing written."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train_scripts/train_lora_unet.py", *argv("./no/such/model", assets["data"], out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "train_lora_unet.py: error: --pretrained_model_name_or_path ./no/such/model: no such folder (a local path, "
        "so the Hub was not asked; a Hub repo id is owner/name, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)."]
    assert not out.exists()
