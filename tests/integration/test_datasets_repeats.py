"""Several datasets with repeats, from a ``datasets:`` list in a ``--config`` file.

* one epoch of training serves every image of each dataset exactly ``repeats`` times (counted at the dataset, the
  step count follows), with the datasets at one resolution and at two (batches grouped by training size), and
  from the encodings cache (each image encoded once);
* each repeat of an image draws its own random crop;
* a bad entry (unknown key, repeats 0, no data source, beside --train_data_dir) is a one-line error.
"""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from diffusers_ztsnr.training.data.multi import RepeatedDatasets
from diffusers_ztsnr.training.unet import main, parse_args
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("repeats")
    assets = tiny_assets(root, "sd15")
    other = root / "other"
    other.mkdir()
    rng = np.random.default_rng(0)
    with open(other / "metadata.jsonl", "w") as f:
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(other / f"o{i}.png")
            f.write(json.dumps({"file_name": f"o{i}.png", "label": f"noise {i}"}) + "\n")
    return {**assets, "other": other}


def _config(tmp_path, entries):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"datasets": entries}))
    return str(path)


def _flags(assets, tmp_path, entries, *extra):
    return ["--config", _config(tmp_path, entries), "--pretrained_model_name_or_path", str(assets["sd15"]),
            "--resolution", str(RES), "--train_batch_size", "2", "--num_train_epochs", "1", "--output_dir",
            str(tmp_path / "out"), "--learning_rate", "1e-3", "--report_to", "none", "--prediction_type",
            "v_prediction", "--zero_terminal_snr", *extra]


@pytest.mark.parametrize(("second_resolution", "cached"), [(RES, False), (RES // 2, False), (RES // 2, True)])
def test_one_epoch_serves_each_image_repeats_times(assets, tmp_path, monkeypatch, second_resolution, cached):
    entries = [{"train_data_dir": str(assets["data"]), "repeats": 3},
               {"train_data_dir": str(assets["other"]), "repeats": 2, "caption_column": "label",
                "resolution": second_resolution}]
    served, shapes = collections.Counter(), set()
    getitem = RepeatedDatasets.__getitem__

    def counting(self, index):
        part, _, item = self.locate(index)
        out = getitem(self, index)
        served[(part, item)] += 1
        shapes.add((part, tuple(out["latents" if cached else "pixel_values"].shape[1:])))
        return out

    monkeypatch.setattr(RepeatedDatasets, "__getitem__", counting)
    cache = ["--cache_latents", "--cache_latents_dir", str(tmp_path / "cache")] if cached else []
    result = main(_flags(assets, tmp_path, entries, "--center_crop", *cache))
    assert served == {**{(0, i): 3 for i in range(4)}, **{(1, i): 2 for i in range(2)}}
    assert result["global_step"] == (4 * 3 + 2 * 2) // 2
    scale = 2 if cached else 1  # the tiny VAE halves each side
    assert shapes == {(0, (RES // scale, RES // scale)), (1, (second_resolution // scale,) * 2)}
    if cached:
        assert result["cache"] == {"hits": 0, "misses": 4 + 2}  # each image encoded once, whatever its repeats


def test_each_repeat_draws_its_own_crop(assets, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(assets["other"], big)
    for image in big.glob("*.png"):  # twice as wide as tall: a square crop has room to move
        Image.open(image).resize((2 * RES, RES)).save(image)
    args = parse_args(_flags(assets, tmp_path, [{"train_data_dir": str(big), "repeats": 4,
                                                 "caption_column": "label"}]))
    from diffusers_ztsnr.training.stages import load_training_set

    ds = load_training_set(args)
    assert isinstance(ds, RepeatedDatasets) and len(ds) == 8
    crops = [ds[k]["crop_top_left"] for k in range(8) if ds.locate(k)[2] == 0]
    assert len(crops) == 4 and len(set(crops)) > 1


@pytest.mark.parametrize(("entries", "extra", "expected"), [
    ([{"train_data_dir": "x", "repeat": 2}], [], "datasets[0] has unknown keys ['repeat'] (did you mean repeats?)"),
    ([{"train_data_dir": "x", "repeats": 0}], [], "datasets[0].repeats must be an integer >= 1 (got 0)"),
    ([{"repeats": 2}], [], "datasets[0] needs exactly one of train_data_dir and dataset_name"),
    ([{"train_data_dir": "DATA"}], ["--train_data_dir", "DATA"], "--datasets (a --config list of datasets) replaces"),
    ([{"train_data_dir": "DATA", "resolution": 20}], [], "datasets[0].resolution must be a multiple of 8, got 20"),
])
def test_bad_entries_are_one_line_errors(assets, tmp_path, capsys, entries, extra, expected):
    entries = json.loads(json.dumps(entries).replace("DATA", str(assets["data"])))
    extra = [str(assets["data"]) if e == "DATA" else e for e in extra]
    with pytest.raises(SystemExit) as error:
        parse_args(_flags(assets, tmp_path, entries, *extra))
    code = error.value.code  # a UsageError carries its line; argparse prints usage, then its error line
    line = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in line and "\n" not in line
    if "unknown keys" in expected or "repeats must" in expected:
        assert line.endswith(f"(in --config {tmp_path / 'run.yaml'})")  # the file is named
