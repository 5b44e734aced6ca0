"""Single-file checkpoint markers -> scheduler settings."""

import pytest
import torch
from safetensors.torch import save_file

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.markers import scheduler_settings_from_checkpoint, with_markers

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


# --- LoRA <-> pipeline mismatch, markers on every export path -------------------------------------------


@pytest.fixture(scope="module")
def trained_loras(tmp_path_factory):
    """A v-prediction + ZTSNR UNet LoRA and a flow-matching SD3 LoRA, 1 step each, from the training scripts."""
    import warnings

    from diffusers_ztsnr.testing.demo_data import make_demo_dataset
    from diffusers_ztsnr.testing.tiny import save_tiny_pipeline
    from diffusers_ztsnr.training.flow import main as flow_main
    from diffusers_ztsnr.training.unet import main as unet_main

    root = tmp_path_factory.mktemp("loras")
    data = make_demo_dataset(root / "data", num_images=2, size=32)
    common = ["--train_data_dir", str(data), "--resolution", "32", "--center_crop", "--max_train_steps", "1",
              "--train_batch_size", "2", "--report_to", "none"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd15, sd3 = save_tiny_pipeline("sd15", root / "sd15"), save_tiny_pipeline("sd3", root / "sd3")
        unet_main(["--pretrained_model_name_or_path", str(sd15), "--output_dir", str(root / "v"), *common,
                   "--prediction_type", "v_prediction", "--zero_terminal_snr"])
        flow_main(["--pretrained_model_name_or_path", str(sd3), "--output_dir", str(root / "flow"), *common])
    return {"sd15": sd15, "sd3": sd3, "v": root / "v", "flow": root / "flow"}


def test_every_export_path_carries_the_markers(trained_loras):
    expected = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    v = trained_loras["v"]
    assert scheduler_settings_from_checkpoint(v) == expected  # the folder -> pytorch_lora_weights metadata
    assert scheduler_settings_from_checkpoint(v / "pytorch_lora_weights.safetensors") == expected
    assert scheduler_settings_from_checkpoint(v / "lora_kohya.safetensors") == expected
    from safetensors import safe_open
    from safetensors.torch import load_file

    # a LoRA says it as sd-scripts' metadata only: marker tensors would not load in diffusers nor ComfyUI
    assert not {"v_pred", "ztsnr"} & set(load_file(v / "lora_kohya.safetensors"))
    with safe_open(str(v / "lora_kohya.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v" and f.metadata()["ss_zero_terminal_snr"] == "True"
    flow = {"prediction_type": "flow_prediction", "rescale_betas_zero_snr": False}
    assert scheduler_settings_from_checkpoint(trained_loras["flow"]) == flow
    assert scheduler_settings_from_checkpoint(trained_loras["flow"] / "lora_kohya.safetensors") == flow


def test_loading_a_v_ztsnr_lora_into_an_epsilon_pipeline_warns_with_the_fix(trained_loras):
    from diffusers import StableDiffusionPipeline

    from diffusers_ztsnr.markers import check_lora_for_pipeline, load_lora_weights

    pipe = StableDiffusionPipeline.from_pretrained(trained_loras["sd15"], safety_checker=None,
                                                   requires_safety_checker=False)
    with pytest.warns(UserWarning, match=r"prediction_type='v_prediction', rescale_betas_zero_snr=True"):
        problems = load_lora_weights(pipe, trained_loras["v"])
    assert len(problems) == 1 and "samples prediction_type='epsilon'" in problems[0]
    # configured as the fix says: silent
    pipe.scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="logsnr")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_lora_for_pipeline(pipe, trained_loras["v"]) == []


def test_a_flow_lora_checks_against_the_scheduler_path(trained_loras):
    from diffusers import StableDiffusion3Pipeline

    from diffusers_ztsnr.markers import check_lora_for_pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(trained_loras["sd3"])
    assert check_lora_for_pipeline(pipe, trained_loras["flow"]) == []
    pipe.scheduler = ZTSNRDPMSolverMultistepScheduler()
    with pytest.warns(UserWarning, match="trained with flow matching.*ZTSNRFlowMatchScheduler"):
        check_lora_for_pipeline(pipe, trained_loras["flow"])


def test_a_flag_added_since_a_run_was_recorded_is_no_change_while_left_off():
    from diffusers_ztsnr.training.identity import describe_changes

    recorded = {"flags": {"rank": 4, "learning_rate": 1e-4}}  # written before --caption_dropout existed
    assert describe_changes(recorded, {"flags": {"rank": 4, "learning_rate": 1e-4, "caption_dropout": 0.0}}) == []
    assert describe_changes(recorded, {"flags": {"rank": 4, "learning_rate": 1e-4, "caption_dropout": 0.1}}) == [
        "--caption_dropout None -> 0.1"]
    assert describe_changes(recorded, {"flags": {"rank": 8, "learning_rate": 1e-4}}) == ["--rank 4 -> 8"]


def test_string_flags_added_since_a_run_was_recorded_are_no_change_at_their_default():
    from diffusers_ztsnr.training.identity import describe_changes

    recorded = {"flags": {"rank": 4}}  # written before --adapter and --base_quantization existed
    defaults = {"rank": 4, "adapter": "lora", "base_quantization": "none"}
    assert describe_changes(recorded, {"flags": defaults}) == []
    assert describe_changes(recorded, {"flags": {**defaults, "adapter": "dora", "base_quantization": "int8"}}) == [
        "--adapter None -> 'dora'", "--base_quantization None -> 'int8'"]


def test_prior_preservation_class_folder_is_the_same_run_from_any_working_directory(tmp_path, monkeypatch):
    """``--class_data_dir`` is recorded resolved, whether the folder exists yet or not (a first run generates the
    class images into it after its identity is taken; a resume finds them there)."""
    import argparse

    from diffusers_ztsnr.training.identity import describe_changes, training_flags

    (tmp_path / "work" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    first = training_flags(argparse.Namespace(class_data_dir="class_images", output_dir="out"))
    assert first["class_data_dir"] == str(tmp_path / "work" / "class_images")  # not there yet
    (tmp_path / "work" / "class_images").mkdir()
    monkeypatch.chdir(tmp_path / "work" / "sub")
    resumed = training_flags(argparse.Namespace(class_data_dir="../class_images", output_dir="../out"))
    assert describe_changes({"flags": first}, {"flags": resumed}) == []
    other = training_flags(argparse.Namespace(class_data_dir="class_images", output_dir="../out"))
    assert describe_changes({"flags": first}, {"flags": other}) != []
