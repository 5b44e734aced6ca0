"""``--adapter dora``: the file diffusers loads applies the trained weight-decomposed update to every trained module
of the denoiser, computed here from the base weights and the run's checkpoint; no kohya file is written and the card
says why. A text encoder's DoRA is refused: diffusers' loader leaves its magnitudes at their initial value."""

import pytest
import torch

from diffusers_ztsnr.testing.tiny import make_tiny_pipeline
from diffusers_ztsnr.training.checkpointing import load_tensor_state
from diffusers_ztsnr.training.config import UsageError
from diffusers_ztsnr.training.flow import main as flow_main
from diffusers_ztsnr.training.unet import main as unet_main
from tests.integration.interop.support import count, denoiser_name, diffusers_applied, linear_weights, plain_path
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")
KINDS = ("sd15", "sd3")
RANK, ALPHA = 4, 8.0


def dora_deltas(kind: str, states: dict) -> dict:
    """``W' - W`` for each trained module, with ``W' = m (W + s B A) / ||W + s B A||`` (row norms; s = alpha / r),
    ``W`` from a fresh tiny pipeline (the run's base)."""
    pipe = make_tiny_pipeline(kind)
    out = {}
    for component, state in states.items():
        base = linear_weights(getattr(pipe, component))
        for key in state:
            if key.endswith(".lora_magnitude_vector"):
                module = key.removesuffix(".lora_magnitude_vector")
                w = base[plain_path(module)].double()
                a, b = state[f"{module}.lora_A.weight"].double(), state[f"{module}.lora_B.weight"].double()
                adapted = w + b @ a * (ALPHA / RANK)
                merged = state[key].double()[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
                out.setdefault(component, {})[plain_path(module)] = merged - w
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    assets = tiny_assets(root, *KINDS, num_images=2)
    out = {}
    for kind in KINDS:
        folder = root / f"out-{kind}"
        (unet_main if kind == "sd15" else flow_main)([
            "--pretrained_model_name_or_path", str(assets[kind]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", "1",
            "--learning_rate", "1e-2", "--rank", str(RANK), "--lora_alpha", str(ALPHA), "--adapter", "dora",
            "--checkpointing_steps", "1", "--report_to", "none", "--output_dir", str(folder)])
        (checkpoint,) = sorted(folder.glob("checkpoint-*"))
        out[kind] = (folder, {denoiser_name(kind): load_tensor_state(checkpoint / "lora_0.safetensors")[0]})
    out["assets"] = assets
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_applies_the_trained_dora_update_to_every_module(runs, kind):
    folder, states = runs[kind]
    magnitudes = [v for s in states.values() for k, v in s.items() if k.endswith("lora_magnitude_vector")]
    assert magnitudes and len(magnitudes) == sum(1 for s in states.values() for k in s if ".lora_A." in k)
    expected = dora_deltas(kind, states)
    applied, patched = diffusers_applied(make_tiny_pipeline(kind), str(folder), list(states))
    assert count(patched) == count(expected) == len(magnitudes)
    moved = 0
    for component, modules in expected.items():
        for module, delta in modules.items():
            got = applied.get(component, {}).get(module, torch.zeros_like(delta))
            error = float((got - delta).abs().max())
            assert error <= 1e-5 * max(1.0, float(delta.abs().max())), (component, module, error)
            moved += bool(delta.abs().max() > 1e-4)
    assert moved >= count(expected) // 2  # one step at lr 1e-2 moved most modules


@pytest.mark.parametrize("kind", KINDS)
def test_no_kohya_file_and_the_card_says_why(runs, kind):
    folder, _ = runs[kind]
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    assert not (folder / "lora_kohya.safetensors").exists()
    card = (folder / "README.md").read_text()
    assert "This is a DoRA: diffusers loads it" in card and "lora_kohya.safetensors" not in card


def test_a_text_encoder_dora_is_refused_before_anything_is_written(runs, tmp_path):
    assets = runs["assets"]
    with pytest.raises(UsageError, match=r"--adapter dora with --train_text_encoder: diffusers' loader drops"):
        unet_main(["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
                   "--resolution", str(RES), "--center_crop", "--adapter", "dora", "--train_text_encoder",
                   "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
