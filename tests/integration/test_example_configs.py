"""examples/configs/*.yaml: every key goes through its script's real ``--config`` parsing and checks unchanged, and
each file trains a few steps with the base model swapped for the tiny pipeline of its family (CPU sizes and
precision given on the command line, which wins over the file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffusers_ztsnr.training import flow, unet
from tests.train_utils import RES, tiny_assets

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
# file -> (script module, tiny pipeline kind, the real base model it names)
EXAMPLES = {
    "sd15_v_ztsnr.yaml": (unet, "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd15_rectified_flow.yaml": (unet, "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sdxl_lora.yaml": (unet, "sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
    "sd3_flow.yaml": (flow, "sd3", "stabilityai/stable-diffusion-3.5-medium"),
    "flux_dev.yaml": (flow, "flux", "black-forest-labs/FLUX.1-dev"),
}

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("examples"), "sd15", "sdxl", "sd3", "flux")


def test_every_example_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_key_parses_and_validates_unchanged(name):
    module, _, hub_id = EXAMPLES[name]
    path = CONFIGS / name
    values = yaml.safe_load(path.read_text())
    args = module.parse_args(["--config", str(path)])  # all checks that need no model
    assert values["pretrained_model_name_or_path"] == hub_id
    for key, value in values.items():
        parsed = getattr(args, key)
        assert parsed == value or str(parsed) == str(value), (key, parsed, value)


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_trains_with_its_familys_tiny_model(name, assets, tmp_path):
    module, kind, _ = EXAMPLES[name]
    result = module.main([
        "--config", str(CONFIGS / name), "--pretrained_model_name_or_path", str(assets[kind]),
        "--train_data_dir", str(assets["data"]), "--output_dir", str(tmp_path / "out"), "--resolution", str(RES),
        "--max_train_steps", "2", "--mixed_precision", "no", "--report_to", "none",
        "--cache_latents_dir", str(tmp_path / "cache"), "--num_validation_images", "1",
        "--validation_inference_steps", "2",
    ])
    assert result["global_step"] == 2 and result["skipped_steps"] == 0
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "out" / "samples.png").is_file()  # the file's validation prompt was sampled
