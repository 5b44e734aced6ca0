"""The command line helpers (the demo has tests/test_demo.py)."""

import json

import pytest
from safetensors.torch import save_file

from diffusers_ztsnr.checkpoints import with_markers
from diffusers_ztsnr.cli import main


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
