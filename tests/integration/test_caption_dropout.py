"""--caption_dropout: dropped samples train on the empty prompt's encodings, on every conditioning path."""

import json
import shutil

import numpy as np
import pytest
import torch

from diffusers_ztsnr.training.step import drop_captions
from diffusers_ztsnr.training.unet import main
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropout")
    assets = tiny_assets(root, "sd15")
    # the same images under other captions: with every caption dropped the two folders must train alike
    recaptioned = root / "recaptioned"
    shutil.copytree(assets["data"], recaptioned)
    rows = [json.loads(line) for line in (recaptioned / "metadata.jsonl").read_text().splitlines()]
    with open(recaptioned / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, "text": f"an unrelated caption number {i}"}) + "\n")
    return {**assets, "recaptioned": recaptioned}


def run(assets, data, out, *extra):
    return main([
        "--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets[data]),
        "--resolution", str(RES), "--train_batch_size", "4", "--max_train_steps", "3", "--center_crop",
        "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "4", "--report_to", "none",
        "--prediction_type", "v_prediction", "--zero_terminal_snr", *extra,
    ])


PATHS = {"encoded each step": [], "cached encodings": ["--cache_latents"],
         "text-encoder LoRA": ["--train_text_encoder"]}


@pytest.mark.parametrize("path", PATHS)
def test_dropping_every_caption_makes_the_captions_irrelevant(assets, tmp_path, path):
    extra = [*PATHS[path], "--cache_latents_dir", str(tmp_path / "cache")]
    dropped = run(assets, "data", tmp_path / "a", "--caption_dropout", "1", *extra)["losses"]
    recaptioned = run(assets, "recaptioned", tmp_path / "b", "--caption_dropout", "1", *extra)["losses"]
    kept = run(assets, "data", tmp_path / "c", "--caption_dropout", "0", *extra)["losses"]
    np.testing.assert_array_equal(dropped, recaptioned)  # the captions never reached the model
    assert not np.allclose(dropped, kept, rtol=1e-4)  # and without dropout they do


def test_drop_captions_replaces_whole_samples_at_the_given_rate():
    cond = {"embeds": torch.randn(4000, 7, 5), "pooled": torch.randn(4000, 5)}
    empty = {"embeds": torch.full((1, 7, 5), 9.0), "pooled": torch.full((1, 5), 9.0)}
    out = drop_captions(cond, empty, 0.3, torch.Generator().manual_seed(0))
    dropped = (out["pooled"] == 9.0).all(dim=1)
    assert torch.equal(dropped, (out["embeds"] == 9.0).all(dim=(1, 2)))  # every key of a sample goes together
    kept = ~dropped
    for key in cond:
        assert torch.equal(out[key][kept], cond[key][kept])
    assert abs(dropped.float().mean().item() - 0.3) < 0.03  # 4000 draws: the standard error is 0.007
    again = drop_captions(cond, empty, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again["pooled"], out["pooled"])  # the step's generator decides: resume-exact


def test_no_dropout_draws_nothing_from_the_step_generator():
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    cond = {"embeds": torch.randn(2, 3)}
    assert drop_captions(cond, {}, 0.0, generator) is cond
    assert torch.equal(generator.get_state(), state)  # runs without dropout draw the noise they always drew

