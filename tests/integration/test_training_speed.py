"""--torch_compile trains what the eager model trains: same losses (to kernel-fusion rounding), same LoRA keys."""

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_ztsnr.training.unet import main
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("speed"), "sd15")


def run(assets, out, *extra):
    return main([
        "--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
        "--resolution", str(RES), "--train_batch_size", "2", "--max_train_steps", "3", "--center_crop",
        "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "4", "--report_to", "none", *extra,
    ])


def test_a_regionally_compiled_run_matches_the_eager_run(assets, tmp_path):
    torch._dynamo.reset()
    eager = run(assets, tmp_path / "eager")
    start = time.perf_counter()
    compiled = run(assets, tmp_path / "compiled", "--torch_compile")
    print(f"compiled run: {time.perf_counter() - start:.1f} s")
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=1e-4)
    a = load_file(tmp_path / "eager" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "compiled" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
    assert not torch.equal(a[key], torch.zeros_like(a[key]))
