"""The offline demo (README command 1): what it writes, that its outputs load where users load them, its
thread policy, and -- as a slow campaign -- the brightness claim at the default settings."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ztsnr.cli import demo_threads, main
from diffusers_ztsnr.demo.data import TONES, make_shapes, mean_brightness

pytestmark = pytest.mark.usefixtures("quiet_loading")

QUICK = ["--vae_steps", "2", "--base_steps", "2", "--train_steps", "2", "--steps", "2", "--num_images", "1",
         "--threads", "1"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--output_dir", str(out), *QUICK]) == 0
    return out


def test_demo_writes_figure_lora_kohya_card_scheduler_and_numbers(quick_demo, capsys):
    results = json.loads((quick_demo / "results.json").read_text())
    for key in ("figure", "base", "lora", "kohya", "card", "scheduler", "data"):
        path = Path(results["paths"][key])
        assert path.exists() and path.is_relative_to(quick_demo), key
    figure = np.asarray(Image.open(results["paths"]["figure"]))
    assert figure.ndim == 3 and figure.shape[1] > 1000 and figure.std() > 10
    spread, ratio = results["spread"], results["ratio"]
    assert spread["data"] > 0.15  # backgrounds from near black to near white
    assert ratio["before"] == pytest.approx(spread["before"] / spread["data"])
    assert set(results["separation"]) == {"before", "after"}
    assert set(results["seconds"]) == {"base model", "conversion", "figure"}


def test_demo_base_is_an_epsilon_sd_pipeline_and_the_lora_patches_every_trained_module(quick_demo):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from diffusers_ztsnr import ZTSNRUniPCMultistepScheduler

    pipe = StableDiffusionPipeline.from_pretrained(quick_demo / "base-epsilon")
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.scheduler.config.get("prediction_type", "epsilon") == "epsilon"
    trained = load_file(quick_demo / "lora" / "pytorch_lora_weights.safetensors")
    modules = {k.rsplit(".lora_", 1)[0] for k in trained if ".lora_" in k}
    assert any(".conv" in m for m in modules) and any("to_q" in m for m in modules)
    pipe.load_lora_weights(quick_demo / "lora")
    patched = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A]
    assert len(patched) == len(modules)
    scheduler = ZTSNRUniPCMultistepScheduler.from_pretrained(quick_demo / "lora" / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr


def test_demo_prints_every_output_and_the_measured_spreads(tmp_path, capsys):
    assert main(["demo", "--output_dir", str(tmp_path), *QUICK]) == 0
    printed = capsys.readouterr().out
    for name in ("before_after.png", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md",
                 "scheduler_config.json", "base-epsilon"):
        assert name in printed, name
    assert "brightness spread" in printed and "of the data's" in printed and "next: " in printed


def test_demo_data_names_each_tone_and_spreads_brightness():
    shapes = make_shapes(72, 32, seed=3)
    brightness = mean_brightness(shapes.images)
    means = {t: float(brightness[[f"{t} background" in c for c in shapes.captions]].mean()) for t in TONES}
    assert means["dark"] < means["grey"] - 0.15 < means["bright"] - 0.3
    assert torch.equal(make_shapes(72, 32, seed=3).images, shapes.images)


def test_demo_threads_follow_the_idle_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setattr("diffusers_ztsnr.cli.idle_cpus", lambda: 0.9)
    assert demo_threads(None) == 1  # one core busy: one thread, not two fighting over it
    monkeypatch.setattr("diffusers_ztsnr.cli.idle_cpus", lambda: 1.7)
    assert demo_threads(None) == 2
    monkeypatch.setattr("diffusers_ztsnr.cli.idle_cpus", lambda: 0.05)
    assert demo_threads(None) == 1
    monkeypatch.setattr("diffusers_ztsnr.cli.idle_cpus", lambda: 15.0)
    assert demo_threads(None) == 2  # never more than the CPUs this process may use
    assert demo_threads(3) == 3
    monkeypatch.setattr("diffusers_ztsnr.cli.idle_cpus", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr("os.getloadavg", lambda: (1.6, 1.0, 1.0))
    assert demo_threads(None) == 1


def test_idle_cpus_reads_the_machine_now():
    from diffusers_ztsnr.cli import idle_cpus

    idle = idle_cpus(0.05)
    if idle is None:
        pytest.skip("no /proc/stat on this system (the load-average fallback is tested above)")
    assert 0.0 <= idle <= (os.cpu_count() or 1) + 1e-9


@pytest.mark.slow
def test_demo_at_defaults_shows_the_curse_and_its_fix(tmp_path):
    """README command 1 as a user runs it (about 3 minutes): before the conversion the brightness spread stays under
    60% of the data's and the prompt does not move the lighting (measured 53%, 1%); after it the spread is within 15%
    of the data's and the prompt moves the lighting (measured 98%, 100%)."""
    assert main(["demo", "--output_dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    ratio, apart = results["ratio"], results["separation"]
    assert ratio["before"] < 0.6 and 0.85 <= ratio["after"] <= 1.15, ratio
    assert apart["before"] < 0.15 and apart["after"] > 0.5, apart


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 3])
def test_demo_other_seeds_widen_the_spread(tmp_path, seed):
    """Other seeds train other tiny models; the conversion widens the brightness spread (measured before / after:
    seed 1 48% / 93%, seed 3 55% / 84%), though not every one reaches the default's. Seed 2 (77% / 79%) is left
    out: a 2-point margin is within what the thread count alone changes."""
    assert main(["demo", "--output_dir", str(tmp_path), "--seed", str(seed)]) == 0
    ratio = json.loads((tmp_path / "results.json").read_text())["ratio"]
    assert ratio["after"] > ratio["before"], ratio


def test_demo_kohya_file_applies_the_trained_conv_and_attention_deltas(quick_demo):
    """sd-scripts' LoCon convention, which ComfyUI applies: ``lora_unet_<diffusers path with _>``, delta =
    ``up.flatten(1) @ down.flatten(1)`` reshaped to the weight, times ``alpha / rank``."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(quick_demo / "base-epsilon" / "unet")
    modules = {name.replace(".", "_"): m for name, m in unet.named_modules() if hasattr(m, "weight")}
    kohya = load_file(quick_demo / "lora" / "lora_kohya.safetensors")
    trained = load_file(quick_demo / "lora" / "pytorch_lora_weights.safetensors")
    names = {k[len("lora_unet_"):-len(".alpha")] for k in kohya if k.endswith(".alpha")}
    assert names <= set(modules) and len(names) == len({k.rsplit(".lora_", 1)[0] for k in trained if ".lora_" in k})
    assert any(modules[n].weight.ndim == 4 for n in names)
    for name in names:
        down, up = kohya[f"lora_unet_{name}.lora_down.weight"], kohya[f"lora_unet_{name}.lora_up.weight"]
        scale = float(kohya[f"lora_unet_{name}.alpha"]) / down.shape[0]
        applied = (up.flatten(1) @ down.flatten(1)).reshape(modules[name].weight.shape) * scale
        path = next(k for k in trained if k.replace(".", "_").startswith(f"unet_{name}_lora_A"))
        a, b = trained[path], trained[path.replace("lora_A", "lora_B")]
        expected = (b.flatten(1) @ a.flatten(1)).reshape(modules[name].weight.shape)  # demo trains alpha = rank
        torch.testing.assert_close(applied, expected)
