"""Shared by the training tests: tiny offline models + demo data, and the whole demo set as one batch."""

import warnings
from pathlib import Path

from diffusers_ztsnr.testing.demo_data import make_demo_dataset
from diffusers_ztsnr.testing.tiny import save_tiny_pipeline
from diffusers_ztsnr.training.data import ImageCaptionDataset, collate_fn, load_image_caption_dataset

RES = 32


def tiny_assets(root: Path, *kinds: str, num_images: int = 4) -> dict[str, Path]:
    """``{kind: saved tiny pipeline, "data": demo imagefolder at RES px}``, loading chatter silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assets = {kind: save_tiny_pipeline(kind, root / kind) for kind in kinds}
        assets["data"] = make_demo_dataset(root / "data", num_images=num_images, size=RES)
    return assets


def whole_dataset_batch(data_dir: Path, resolution: int = RES) -> dict:
    """Every image of an imagefolder, center-cropped, as one collated batch (a fixed evaluation batch)."""
    ds = ImageCaptionDataset(load_image_caption_dataset(train_data_dir=data_dir), image_column="image",
                             caption_column="text", resolution=resolution, center_crop=True)
    return collate_fn([ds[i] for i in range(len(ds))])
