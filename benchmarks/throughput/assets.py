"""The pipelines (tiny, and small ones with a larger denoiser in the tiny folder) and the demo data."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def small_unet_config(cross_attention_dim: int, sample_size: int) -> dict:
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=32,
    )


def small_sd3_config(joint_attention_dim: int, pooled_projection_dim: int, latent_channels: int,
                     sample_size: int) -> dict:
    heads, head_dim = 4, 64
    return dict(
        sample_size=sample_size, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=6, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=max(32, sample_size // 2),
    )


def vae_factor(pipeline: Path) -> int:
    """The VAE's spatial downsampling factor: 2 per level after the first."""
    return 2 ** (len(json.loads((pipeline / "vae" / "config.json").read_text())["block_out_channels"]) - 1)


def _add_pipeline(out: dict, name: str, folder: Path, denoiser: torch.nn.Module) -> None:
    out["pipelines"][name] = str(folder)
    out["params"][name] = sum(p.numel() for p in denoiser.parameters())


def _with_denoiser(tiny: Path, folder: Path, subfolder: str, make: Callable[[], Any]) -> Any:
    """A copy of the tiny pipeline at ``folder`` whose ``subfolder`` model is ``make()`` (seed 0); that model."""
    shutil.copytree(tiny, folder)
    torch.manual_seed(0)
    model = make()
    shutil.rmtree(folder / subfolder)
    model.save_pretrained(folder / subfolder, safe_serialization=True)
    return model


def _unet_assets(out: dict, root: Path, small: bool, small_resolution: int) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from diffusers_ztsnr.testing.tiny import save_tiny_pipeline

    tiny = save_tiny_pipeline("sd15", root / "tiny-sd15")
    _add_pipeline(out, "tiny", tiny, UNet2DConditionModel.from_pretrained(tiny / "unet"))
    if small:
        width = CLIPTextConfig.from_pretrained(tiny / "text_encoder").hidden_size
        config = small_unet_config(width, small_resolution // vae_factor(tiny))
        folder = root / "small-sd15"
        _add_pipeline(out, "small", folder,
                      _with_denoiser(tiny, folder, "unet", lambda: UNet2DConditionModel(**config)))


def _flow_assets(out: dict, root: Path, small: bool, small_resolution: int, flux: bool) -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, T5Config

    from diffusers_ztsnr.testing.tiny import save_tiny_pipeline

    tiny = save_tiny_pipeline("sd3", root / "tiny-sd3")
    _add_pipeline(out, "tiny-sd3", tiny, SD3Transformer2DModel.from_pretrained(tiny / "transformer"))
    if small:
        # the text wiring of the tiny pipeline: T5 width -> joint attention, both CLIP projections -> pooled
        t5_width = T5Config.from_pretrained(tiny / "text_encoder_3").d_model
        pooled = sum(CLIPTextConfig.from_pretrained(tiny / sub).projection_dim
                     for sub in ("text_encoder", "text_encoder_2"))
        latent_channels = json.loads((tiny / "vae" / "config.json").read_text())["latent_channels"]
        config = small_sd3_config(t5_width, pooled, latent_channels, small_resolution // vae_factor(tiny))
        folder = root / "small-sd3"
        _add_pipeline(out, "small-sd3", folder,
                      _with_denoiser(tiny, folder, "transformer", lambda: SD3Transformer2DModel(**config)))
    if flux:
        tiny = save_tiny_pipeline("flux", root / "tiny-flux")
        _add_pipeline(out, "tiny-flux", tiny, FluxTransformer2DModel.from_pretrained(tiny / "transformer"))


def build_assets(root: str, families: tuple[str, ...], small: bool, small_resolution: int, num_images: int,
                 flux: bool = False) -> dict:
    """The demo data at 64 px (and ``small_resolution``) and each family's pipelines: ``{"pipelines": name ->
    folder, "data": resolution -> folder, "params": name -> the denoiser's parameter count}``."""
    from diffusers_ztsnr.testing.demo_data import make_demo_dataset

    root = Path(root)
    out = {"pipelines": {}, "data": {}, "params": {}}
    resolutions = {64} | ({small_resolution} if small else set())
    for res in sorted(resolutions):
        out["data"][res] = str(make_demo_dataset(root / f"data-{res}", num_images=num_images, size=res))
    if "unet" in families:
        _unet_assets(out, root, small, small_resolution)
    if "flow" in families:
        _flow_assets(out, root, small, small_resolution, flux)
    return out
