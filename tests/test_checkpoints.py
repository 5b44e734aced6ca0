"""Single-file checkpoint markers -> scheduler settings."""

import pytest
import torch
from safetensors.torch import save_file

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.checkpoints import scheduler_settings_from_checkpoint, with_markers

WEIGHTS = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}


@pytest.mark.parametrize(
    "prediction_type,zsnr", [("epsilon", False), ("v_prediction", False), ("v_prediction", True), ("epsilon", True)]
)
def test_markers_round_trip_through_state_dicts_and_files(tmp_path, prediction_type, zsnr):
    marked = with_markers(WEIGHTS, prediction_type, zsnr)
    expected = {"prediction_type": prediction_type, "rescale_betas_zero_snr": zsnr}
    assert scheduler_settings_from_checkpoint(marked) == expected
    save_file(marked, tmp_path / "model.safetensors")
    assert scheduler_settings_from_checkpoint(tmp_path / "model.safetensors") == expected
    torch.save({"state_dict": marked}, tmp_path / "model.ckpt")
    assert scheduler_settings_from_checkpoint(tmp_path / "model.ckpt") == expected


def test_settings_configure_a_scheduler_that_samples_from_snr_zero():
    settings = scheduler_settings_from_checkpoint(with_markers(WEIGHTS, "v_prediction", True))
    s = ZTSNRDPMSolverMultistepScheduler.from_config(ZTSNRDPMSolverMultistepScheduler().config, **settings)
    s.set_timesteps(10)
    assert s.config.prediction_type == "v_prediction" and s._levels[0][0] == 0.0


def test_markers_replace_stale_ones_and_bad_input_is_clear(tmp_path):
    stale = with_markers(WEIGHTS, "v_prediction", True)
    assert scheduler_settings_from_checkpoint(with_markers(stale, "epsilon", False)) == {
        "prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    with pytest.raises(ValueError, match="prediction_type='sample' has no marker"):
        with_markers(WEIGHTS, "sample", False)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        scheduler_settings_from_checkpoint(tmp_path / "missing.safetensors")
