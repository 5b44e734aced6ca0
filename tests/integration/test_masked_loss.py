"""Masked training: loss masks weigh latent cells, follow their image through every transform, and are cached.

* a latent cell whose area-averaged mask is 0 gives no gradient (its latents perturbed, the gradient is unchanged;
  an unmasked cell perturbed changes it), for the VP and the flow objective;
* the per-sample loss is normalised by the mask's sum: a uniform mask is the plain mean, a half mask the mean over
  that half;
* a mask goes through its image's resize, random crop, flip and bucket: it equals the image's red channel after them;
* a mask of another size than its image, or a missing one, is a one-line error naming the file;
* end to end: white masks train exactly as no masks (cached and not); a changed mask is a cache miss.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.training.arguments import InputError
from diffusers_ztsnr.training.data import ImageCaptionDataset, load_image_caption_dataset, make_buckets
from diffusers_ztsnr.training.data.masks import MASK_SUFFIX, latent_mask
from diffusers_ztsnr.training.objectives import DiffusionObjective, FlowMatchingObjective, diffusion_loss
from diffusers_ztsnr.training.unet import main
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")

OBJECTIVES = {
    "vp": lambda: DiffusionObjective(VPSchedule.from_scheduler_config({}, True), "v_prediction"),
    "flow": lambda: FlowMatchingObjective("none"),
}


def _grad(objective, conv: torch.nn.Conv2d, latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    conv.zero_grad()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    loss, _ = objective(lambda x, t, c: conv(x.float()), latents, {}, noise, torch.Generator().manual_seed(2),
                        loss_mask=mask)
    loss.mean().backward()
    return conv.weight.grad.clone()


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_latent_cells_with_a_zero_mask_give_no_gradient(kind):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 1)  # per cell: a cell's output depends on that cell's input only
    latents = torch.randn(2, 4, 4, 4)
    pixels = torch.ones(2, 1, 32, 32)
    pixels[:, :, :12, :] = 0  # rows 0-11: latent row 0 fully masked, row 1 half (weight 0.5)
    mask = latent_mask(pixels, latents)
    assert mask[:, 0, 0].eq(0).all() and torch.allclose(mask[:, 0, 1], torch.full((2, 4), 0.5))
    objective = OBJECTIVES[kind]()
    base = _grad(objective, conv, latents, mask)
    masked_changed, kept_changed = latents.clone(), latents.clone()
    masked_changed[:, :, 0] += 50.0  # the latents (and with them the target) of the fully masked row
    kept_changed[:, :, 3] += 50.0
    assert torch.equal(_grad(objective, conv, masked_changed, mask), base)
    assert (_grad(objective, conv, kept_changed, mask) - base).abs().max() > 1.0


def test_loss_is_normalised_by_the_mask_sum():
    prediction, target = torch.randn(3, 4, 6, 8), torch.randn(3, 4, 6, 8)
    plain = diffusion_loss(prediction, target, reduction="none")
    uniform = diffusion_loss(prediction, target, reduction="none", mask=torch.full((3, 1, 6, 8), 0.25))
    torch.testing.assert_close(uniform, plain)  # a gray mask everywhere weighs nothing differently
    half = torch.zeros(3, 1, 6, 8)
    half[..., :4] = 1
    left = diffusion_loss(prediction[..., :4], target[..., :4], reduction="none")
    torch.testing.assert_close(diffusion_loss(prediction, target, reduction="none", mask=half), left)
    assert diffusion_loss(prediction, target, reduction="none", mask=torch.zeros(3, 1, 6, 8)).eq(0).all()


def _folder_with_masks(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """Noise images of PIL sizes ``(w, h)``, each with a mask that is its own red channel."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{i}.png")
            Image.fromarray(pixels[..., 0], mode="L").save(root / f"{i}{MASK_SUFFIX}")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) + "\n")
    return root


def test_a_mask_is_cropped_flipped_and_bucketed_with_its_image(tmp_path):
    folder = _folder_with_masks(tmp_path / "data", [(60, 36), (36, 60), (48, 48), (90, 40)])
    ds = ImageCaptionDataset(load_image_caption_dataset(train_data_dir=folder), resolution=32, center_crop=False,
                             random_flip=True, buckets=make_buckets(32, step=8), masks=True)
    assert len(ds) == 4  # the mask files are not training images
    shapes = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            red = (item["pixel_values"][0] + 1) / 2
            torch.testing.assert_close(item["loss_mask"][0], red, atol=1e-6, rtol=0)
            shapes.add(tuple(red.shape))
    assert len(shapes) >= 3  # several buckets were exercised


def test_a_mask_of_another_size_names_the_file(tmp_path):
    folder = _folder_with_masks(tmp_path / "data", [(40, 40), (40, 40)])
    Image.new("L", (40, 24), 255).save(folder / f"1{MASK_SUFFIX}")
    raw = load_image_caption_dataset(train_data_dir=folder)
    with pytest.raises(InputError) as error:
        ImageCaptionDataset(raw, resolution=32, masks=True)
    message = str(error.value)
    assert "\n" not in message and f"1{MASK_SUFFIX}" in message and "40x24" in message and "40x40" in message
    (folder / f"1{MASK_SUFFIX}").unlink()
    with pytest.raises(InputError, match="no loss mask for .*1.png"):
        ImageCaptionDataset(raw, resolution=32, masks=True)


def test_mask_column_reads_masks_named_in_the_metadata(tmp_path):
    folder = _folder_with_masks(tmp_path / "data", [(40, 40), (48, 32)])
    for i in range(2):
        (folder / f"{i}{MASK_SUFFIX}").rename(folder / f"m{i}.png")
    rows = [{"file_name": f"{i}.png", "region_file_name": f"m{i}.png", "text": f"image {i}"} for i in range(2)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ImageCaptionDataset(load_image_caption_dataset(train_data_dir=folder), resolution=32, mask_column="region")
    for i in range(2):
        torch.testing.assert_close(ds[i]["loss_mask"][0], (ds[i]["pixel_values"][0] + 1) / 2, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="--mask_column 'regions' is not a column"):
        ImageCaptionDataset(load_image_caption_dataset(train_data_dir=folder), resolution=32, mask_column="regions")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("masked"), "sd15")


def _write_masks(data: Path, value) -> None:
    for image in sorted(data.glob("*.png")):
        if not image.name.endswith(MASK_SUFFIX):
            mask = np.full((RES, RES), 255, dtype=np.uint8)
            mask[: RES // 2] = value
            Image.fromarray(mask, mode="L").save(data / f"{image.stem}{MASK_SUFFIX}")


def _run(assets, data, out, *extra):
    return main(["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(data),
                 "--resolution", str(RES), "--train_batch_size", "2", "--max_train_steps", "3", "--center_crop",
                 "--output_dir", str(out), "--learning_rate", "1e-2", "--report_to", "none",
                 "--prediction_type", "v_prediction", "--zero_terminal_snr", *extra])


@pytest.mark.parametrize("cached", [False, True])
def test_white_masks_train_as_no_masks_and_a_changed_mask_is_a_cache_miss(assets, tmp_path, cached):
    data = tmp_path / "data"
    shutil.copytree(assets["data"], data)
    cache = ["--cache_latents", "--cache_latents_dir", str(tmp_path / "cache")] if cached else []
    plain = _run(assets, data, tmp_path / "plain", *cache)["losses"]
    _write_masks(data, 255)
    white = _run(assets, data, tmp_path / "white", "--masked_loss", *cache)
    np.testing.assert_allclose(white["losses"], plain, rtol=1e-5)
    _write_masks(data, 0)  # the top half ignored
    half = _run(assets, data, tmp_path / "half", "--masked_loss", *cache)
    assert not np.allclose(half["losses"], plain, rtol=1e-3)
    if cached:
        assert white["cache"] == {"hits": 0, "misses": 4} and half["cache"] == {"hits": 0, "misses": 4}
