"""The command line: the offline demo (README command 1) and the helpers."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.checkpoints import with_markers
from diffusers_ztsnr.cli import main


def test_demo_trains_and_writes_lora_grid_card_and_scheduler(tmp_path, capsys):
    args = ["demo", "--output_dir", str(tmp_path), "--steps", "3", "--num_images", "2", "--train_steps", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "lora"
    for name in ("samples.png", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md"):
        assert str(out / name) in printed and (out / name).is_file()
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (64, 128, 3) and grid.std() > 0
    s = ZTSNRDPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
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
