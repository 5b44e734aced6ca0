"""DreamBooth prior preservation: class images generated to the requested count with this package's sampler, each
batch trained on instance and class items, both losses logged and weighted.

* ``--num_class_images 3`` with one class image present generates exactly two (with our DPM-Solver++ scheduler,
  at ``--resolution``), and a second run generates none;
* every step logs ``loss_instance`` and ``loss_prior``, and ``loss = loss_instance + w * loss_prior`` (w = 0.5 and
  w = 0); the class items reach the model (the prior loss differs from the instance loss), cached or not;
* wide instance buckets beside square class images train in two forward passes, with the same weighting;
* no class images and no ``--class_prompt``: a one-line error naming the folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffusers_ztsnr.schedulers import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.training import prior as prior_module
from diffusers_ztsnr.training import step as step_module
from diffusers_ztsnr.training.arguments import UsageError
from diffusers_ztsnr.training.prior import base_sampling_scheduler
from diffusers_ztsnr.training.unet import main, parse_args
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("prior"), "sd15")


def _flags(assets, out, classes, *extra):
    return ["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--train_batch_size", "2", "--max_train_steps", "3", "--center_crop",
            "--output_dir", str(out), "--learning_rate", "1e-2", "--report_to", "none",
            "--prediction_type", "v_prediction", "--zero_terminal_snr", "--with_prior_preservation",
            "--class_data_dir", str(classes), *extra]


def _logged_run(monkeypatch, flags):
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append(dict(values)))
    return main(flags), logged


def test_missing_class_images_are_generated_with_our_sampler(assets, tmp_path, monkeypatch):
    classes = tmp_path / "classes"
    classes.mkdir()
    Image.new("RGB", (RES, RES), (200, 30, 30)).save(classes / "mine.png")
    made, calls = [], []

    def spy(task):  # the scheduler class generation samples with, and its steps
        scheduler = base_sampling_scheduler(task)
        step = scheduler.step
        scheduler.step = lambda *a, **k: calls.append(1) or step(*a, **k)
        made.append(scheduler)
        return scheduler

    monkeypatch.setattr(prior_module, "base_sampling_scheduler", spy)
    flags = _flags(assets, tmp_path / "a", classes, "--class_prompt", "a photo of a shape", "--num_class_images", "3",
                   "--class_inference_steps", "2", "--sample_batch_size", "1", "--max_train_steps", "1")
    main(flags)
    files = sorted(classes.glob("*.png"))
    assert len(files) == 3 and [f.name for f in files][2] == "mine.png"  # 00001-<sha>.png, 00002-<sha>.png
    assert all(Image.open(f).size == (RES, RES) for f in files)
    assert len(made) == 1 and type(made[0]) is ZTSNRDPMSolverMultistepScheduler
    assert made[0].config.prediction_type == "epsilon"  # the base model's, not the v-prediction being trained
    assert len(calls) == 2 * 2  # two images, two sampler steps each
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    main([*flags[:-2], "--max_train_steps", "1", "--output_dir", str(tmp_path / "b")])
    assert {f.name: f.stat().st_mtime_ns for f in classes.glob("*.png")} == stamps  # enough there: none generated


@pytest.mark.parametrize("cached", [False, True])
def test_both_losses_are_logged_and_weighted(assets, tmp_path, monkeypatch, cached):
    classes = tmp_path / "classes"
    cache = ["--cache_latents", "--cache_latents_dir", str(tmp_path / "cache")] if cached else []
    common = ["--class_prompt", "a photo of a shape", "--num_class_images", "2", "--class_inference_steps", "2",
              *cache]
    result, logged = _logged_run(monkeypatch, _flags(assets, tmp_path / "a", classes, *common,
                                                     "--prior_loss_weight", "0.5"))
    assert len(list(classes.glob("*.png"))) == 2 and len(logged) == 3
    for values, loss in zip(logged, result["losses"], strict=True):
        assert values["loss"] == pytest.approx(loss)
        assert values["loss"] == pytest.approx(values["loss_instance"] + 0.5 * values["loss_prior"], rel=1e-6)
    assert all(abs(v["loss_prior"] - v["loss_instance"]) > 1e-3 * v["loss_instance"] for v in logged)
    _, unweighted = _logged_run(monkeypatch, _flags(assets, tmp_path / "b", classes, *common,
                                                    "--prior_loss_weight", "0"))
    assert unweighted[0]["loss"] == pytest.approx(unweighted[0]["loss_instance"], rel=1e-6)
    assert unweighted[0]["loss_prior"] > 0


def test_no_class_images_and_no_class_prompt_is_one_line_naming_the_folder(assets, tmp_path):
    classes = tmp_path / "empty"
    classes.mkdir()
    with pytest.raises(UsageError) as error:
        parse_args(_flags(assets, tmp_path / "a", classes))
    message = str(error.value.code)
    assert "\n" not in message and "--class_prompt" in message and str(classes) in message
    assert "holds 0 of --num_class_images 100" in message
    with pytest.raises(UsageError, match="add --with_prior_preservation"):
        parse_args([f for f in _flags(assets, tmp_path / "a", classes, "--class_prompt", "x")
                    if f != "--with_prior_preservation"])


def test_wide_buckets_beside_square_class_images_train_in_two_passes(assets, tmp_path, monkeypatch):
    data = tmp_path / "wide"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (RES, 2 * RES, 3), dtype=np.uint8)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a wide shape"}) + "\n")
    flags = _flags(assets, tmp_path / "a", tmp_path / "classes", "--class_prompt", "a photo of a shape",
                   "--num_class_images", "2", "--class_inference_steps", "2", "--bucketing", "--prior_loss_weight",
                   "2")
    flags[flags.index("--train_data_dir") + 1] = str(data)
    shapes = []
    sample_losses = step_module.sample_losses
    monkeypatch.setattr(step_module, "sample_losses",
                        lambda *a, **k: shapes.append(tuple(a[3].shape[-2:])) or sample_losses(*a, **k))
    result, logged = _logged_run(monkeypatch, flags)
    # per step: the 24x40 bucket's latents, then the 32x32 class images' (the tiny VAE halves each side)
    assert shapes == [(12, 20), (16, 16)] * 3
    for values in logged:
        assert values["loss"] == pytest.approx(values["loss_instance"] + 2 * values["loss_prior"], rel=1e-6)


def test_merged_batch_trains_class_items_whole_beside_masked_instance_items():
    import torch

    from diffusers_ztsnr.training.prior import merge_batches

    instance = {"loss_mask": torch.zeros(2, 1, 8, 8), "caption": ["a", "b"], "index": torch.tensor([0, 1]),
                "prior": {}}
    prior = {"caption": ["c", "c"], "index": torch.tensor([5, 6])}
    merged = merge_batches(instance, prior)
    assert merged["caption"] == ["a", "b", "c", "c"] and merged["index"].tolist() == [0, 1, 5, 6]
    assert merged["loss_mask"].shape == (4, 1, 8, 8)
    assert merged["loss_mask"][:2].sum() == 0 and merged["loss_mask"][2:].eq(1).all()
    assert "prior" not in merged
