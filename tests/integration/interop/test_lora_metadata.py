"""How a file says it must be sampled: what we write (sd-scripts' keys and values) and every convention we read."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.markers import (
    check_lora_for_pipeline,
    marker_metadata,
    scheduler_fix_line,
    scheduler_settings_from_checkpoint,
    with_markers,
)

LORA = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}


def settings_of(tmp_path, metadata: dict[str, str], tensors=None) -> dict:
    path = tmp_path / "file.safetensors"
    save_file(dict(tensors or LORA), str(path), metadata=metadata)
    return scheduler_settings_from_checkpoint(path)


def settings(prediction_type: str, zsnr: bool) -> dict:
    return {"prediction_type": prediction_type, "rescale_betas_zero_snr": zsnr}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", None])
@pytest.mark.parametrize("prediction_type,zsnr", [("epsilon", False), ("v_prediction", True), ("v_prediction", False)])
def test_vp_metadata_uses_sd_scripts_keys_and_values_and_reads_back(tmp_path, family, prediction_type, zsnr):
    metadata = marker_metadata(prediction_type, zsnr, family)
    assert metadata["modelspec.prediction_type"] == {"epsilon": "epsilon", "v_prediction": "v"}[prediction_type]
    assert metadata["ss_zero_terminal_snr"] == str(zsnr)
    assert ("ss_v2" in metadata) == (family == "sd2") and metadata.get("ss_v2", "True") == "True"
    assert "ss_v_parameterization" not in metadata
    assert settings_of(tmp_path, metadata) == settings(prediction_type, zsnr)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_metadata_states_the_architecture_only(tmp_path, family):
    metadata = marker_metadata("flow_prediction", False, family)
    assert set(metadata) == {"modelspec.architecture"} and metadata["modelspec.architecture"].endswith("/lora")
    assert settings_of(tmp_path, metadata) == settings("flow_prediction", False)
    with pytest.raises(ValueError, match="flow matching"):
        marker_metadata("v_prediction", False, family)
    with pytest.raises(ValueError, match="needs family"):
        marker_metadata("flow_prediction", False, "sdxl")


@pytest.mark.parametrize("metadata,expected", [
    ({"modelspec.prediction_type": "v", "ss_zero_terminal_snr": "True"}, settings("v_prediction", True)),
    ({"modelspec.prediction_type": "epsilon", "ss_zero_terminal_snr": "False"}, settings("epsilon", False)),
    ({"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}, settings("v_prediction", True)),  # older tools
    ({"ss_v_parameterization": "false"}, settings("epsilon", False)),
    ({"modelspec.prediction_type": "v_prediction", "ss_zero_terminal_snr": "True"}, settings("v_prediction", True)),
    ({"modelspec.prediction_type": "flow_prediction"}, settings("flow_prediction", False)),  # our earlier files
    ({"modelspec.architecture": "flux-1-dev/lora"}, settings("flow_prediction", False)),  # sd-scripts' Flux LoRA
    ({"ss_v2": "True"}, settings("epsilon", False)),  # "SD 2.x", which says nothing about v-prediction
    ({}, settings("epsilon", False)),
])
def test_reader_accepts_every_convention_written_by_us_or_others(tmp_path, metadata, expected):
    assert settings_of(tmp_path, metadata) == expected


def test_marker_tensors_of_full_checkpoints_still_read_and_metadata_wins(tmp_path):
    weights = {"model.diffusion_model.out.2.weight": torch.zeros(2, 2)}
    assert settings_of(tmp_path, {}, with_markers(weights, "v_prediction", True)) == settings("v_prediction", True)
    both = settings_of(tmp_path, {"modelspec.prediction_type": "epsilon"}, with_markers(weights, "v_prediction", False))
    assert both == settings("epsilon", False)


@pytest.mark.parametrize("prediction_type,zsnr", [("v_prediction", True), ("v_prediction", False),
                                                  ("epsilon", True), ("sample", False)])
def test_the_warning_suggests_a_line_that_runs_and_fixes_the_scheduler(tmp_path, prediction_type, zsnr):
    class Pipe:
        scheduler = ZTSNRDPMSolverMultistepScheduler(prediction_type="epsilon" if prediction_type != "epsilon"
                                                     else "v_prediction")

    lora = tmp_path / "lora.safetensors"
    save_file(LORA, str(lora), metadata=marker_metadata(prediction_type, zsnr, "sd1"))
    with pytest.warns(UserWarning) as caught:
        (problem,) = check_lora_for_pipeline(Pipe, lora)
    line = problem.split(": set ", 1)[1]
    assert line == scheduler_fix_line(prediction_type, zsnr) and str(caught[0].message) == problem
    pipe = Pipe()
    exec(compile(line, "<warning>", "exec"), {"pipe": pipe, "ZTSNRDPMSolverMultistepScheduler":
                                              ZTSNRDPMSolverMultistepScheduler})
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.scheduler.config.rescale_betas_zero_snr == zsnr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_lora_for_pipeline(pipe, lora) == []
