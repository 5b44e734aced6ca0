"""The files the real training entry points write load as trained in every consumer (alpha != rank, text encoders
trained too), and say how to sample them in sd-scripts' metadata only.

One optimizer step per family (``--learning_rate 1e-2``: every LoRA weight moves); the trained weights are read from
the run's last checkpoint (``checkpoint-1/lora_i.safetensors``), which the export code does not touch.
"""


import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_ztsnr.markers import load_lora_weights, scheduler_settings_from_checkpoint
from diffusers_ztsnr.testing.tiny import make_tiny_pipeline
from diffusers_ztsnr.training.flow import main as flow_main
from diffusers_ztsnr.training.unet import main as unet_main
from tests.integration.interop.conventions import (
    apply_kohya,
    comfyui_key_map,
    expected_native,
    native_error,
    sd_scripts_names,
)
from tests.integration.interop.support import KINDS, TOLERANCE, count, diffusers_applied, max_error, script_lora
from tests.train_utils import RES, tiny_assets

RANK, ALPHA = 8, 4.0
#: extra flags per family: SD1.5 is converted to v-prediction on a zero-terminal-SNR schedule
EXTRA = {"sd15": ("--prediction_type", "v_prediction", "--zero_terminal_snr"), "sdxl": (), "sd3": (), "flux": ()}
SETTINGS = {"sd15": ("v_prediction", True), "sdxl": ("epsilon", False), "sd3": ("flow_prediction", False),
            "flux": ("flow_prediction", False)}


pytestmark = pytest.mark.usefixtures("quiet_loading")  # diffusers' and transformers' loading chatter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assets = tiny_assets(root, *KINDS, num_images=2)
    out = {}
    for kind in KINDS:
        argv = ["--pretrained_model_name_or_path", str(assets[kind]), "--train_data_dir", str(assets["data"]),
                "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", "1",
                "--learning_rate", "1e-2", "--rank", str(RANK), "--lora_alpha", str(ALPHA), "--train_text_encoder",
                "--checkpointing_steps", "1", "--report_to", "none", "--seed", "3",
                "--output_dir", str(root / f"out-{kind}"), *EXTRA[kind]]
        (unet_main if kind in ("sd15", "sdxl") else flow_main)(argv)
        out[kind] = script_lora(kind, root / f"out-{kind}", ALPHA)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_trained_run_files_load_as_trained_everywhere(runs, kind):
    lora = runs[kind]
    trained = lora.deltas()
    assert set(trained) == {"unet" if kind in ("sd15", "sdxl") else "transformer", "text_encoder"} | (
        {"text_encoder_2"} if kind in ("sdxl", "sd3") else set())
    # one step leaves a few LoRAs without gradient (CLIP layers after the one SDXL / SD3 read): zero delta, still
    # patched; so modules are counted as those given a LoRA layer, and deltas compared on every module
    applied, patched = diffusers_applied(make_tiny_pipeline(kind), str(lora.folder), list(trained))
    assert max_error(applied, trained) <= TOLERANCE and count(patched) == count(trained)
    # the kohya file in diffusers: stock loader for SD 1.x / SDXL, ours where diffusers has no converter (SD3)
    # or splits Flux's linear1 only at FLUX.1's width
    load = None if kind in ("sd15", "sdxl") else load_lora_weights
    applied, patched = diffusers_applied(make_tiny_pipeline(kind), str(lora.folder / "lora_kohya.safetensors"),
                                         list(trained), load=load)
    assert max_error(applied, trained) <= TOLERANCE and count(patched) == count(trained)
    kohya = load_file(lora.folder / "lora_kohya.safetensors")
    pipe = make_tiny_pipeline(kind)
    for names in (comfyui_key_map(lora.family, pipe), sd_scripts_names(lora.family, pipe)):
        patches, unused = apply_kohya(kohya, names)
        expected = expected_native(trained, names, pipe)
        assert unused == set() and native_error(patches, expected) <= TOLERANCE and len(patches) == len(expected)


@pytest.mark.parametrize("kind", KINDS)
def test_trained_run_files_state_how_to_sample_them(runs, kind):
    prediction_type, zsnr = SETTINGS[kind]
    folder = runs[kind].folder
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        path = folder / name
        assert scheduler_settings_from_checkpoint(path) == {"prediction_type": prediction_type,
                                                            "rescale_betas_zero_snr": zsnr}
        with safe_open(str(path), "pt") as f:
            metadata, keys = f.metadata(), set(f.keys())
        assert not keys & {"v_pred", "ztsnr"} and "ss_v_parameterization" not in metadata and "ss_v2" not in metadata
        if kind in ("sd3", "flux"):  # sd-scripts states no prediction type for flow models
            assert "modelspec.prediction_type" not in metadata and "ss_zero_terminal_snr" not in metadata
            assert metadata["modelspec.architecture"].startswith(("stable-diffusion-3", "flux-1"))
        else:
            assert metadata["modelspec.prediction_type"] == {"v_prediction": "v", "epsilon": "epsilon"}[prediction_type]
            assert metadata["ss_zero_terminal_snr"] == str(zsnr)
