"""The command line: the offline demo (README command 1) and the helpers."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.checkpoints import with_markers
from diffusers_ztsnr.cli import main


def test_demo_writes_a_grid_and_a_loadable_scheduler(tmp_path, capsys):
    assert main(["demo", "--output_dir", str(tmp_path), "--steps", "3", "--num_images", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "samples.png") in printed
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (64, 128, 3) and grid.std() > 0
    s = ZTSNRDPMSolverMultistepScheduler.from_pretrained(tmp_path / "scheduler")
    assert s.config.prediction_type == "v_prediction" and s.config.rescale_betas_zero_snr


def test_make_tiny_and_checkpoint_settings(tmp_path, capsys):
    assert main(["make-tiny", "sd15", str(tmp_path / "sd15")]) == 0
    assert (tmp_path / "sd15" / "model_index.json").is_file()
    with pytest.raises(SystemExit):
        main(["make-tiny", "sd9", str(tmp_path / "x")])
    assert "unknown kind 'sd9'" in capsys.readouterr().err
    save_file(with_markers({"w": __import__("torch").zeros(1)}, "v_prediction", True), tmp_path / "m.safetensors")
    capsys.readouterr()
    assert main(["checkpoint-settings", str(tmp_path / "m.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out) == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
