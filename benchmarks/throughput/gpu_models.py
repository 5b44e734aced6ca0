"""Pipelines of the real architectures with random weights, for the GPU rows: SD1.5 and SD3-medium.

``size="real"``: SD1.5's UNet (860 M parameters), CLIP ViT-L/14's text tower and the SD VAE; SD3-medium's
2.0 B transformer (24 joint blocks of width 1536), CLIP-L and CLIP-G with projections, a 2-layer T5 of width 4096
(T5-XXL's width; the full 24 layers do not change the cached step) and the 16-channel SD3 VAE. ``size="tiny"``:
the same classes at a few channels, to smoke-test the GPU script on a CPU. Tokenizers are the offline ones of
:mod:`diffusers_ztsnr.testing.tokenizers`; the models are built on ``device`` and saved in bf16.
"""

from __future__ import annotations

from pathlib import Path

import torch

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the rest are UNet2DConditionModel's defaults = SD1.5
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
TINY_UNET = dict(sample_size=16, cross_attention_dim=32, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
TINY_SD3 = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                pos_embed_max_size=32)


def _clip(tokenizer, hidden: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            projection_dim=projection or hidden, hidden_act="gelu" if projection else "quick_gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(latent_channels: int, tiny: bool):
    from diffusers import AutoencoderKL

    channels = (16, 32) if tiny else (128, 256, 512, 512)
    sd3 = latent_channels == 16
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                         layers_per_block=1 if tiny else 2, latent_channels=latent_channels,
                         norm_num_groups=8 if tiny else 32, scaling_factor=1.5305 if sd3 else 0.18215,
                         shift_factor=0.0609 if sd3 else None, use_quant_conv=not sd3, use_post_quant_conv=not sd3)


def build_sd15(folder: Path, size: str, device: str) -> tuple[Path, int]:
    """Save an SD1.5-architecture pipeline to ``folder``; returns it and the UNet's parameter count."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from diffusers_ztsnr.testing.tokenizers import build_clip_tokenizer

    tiny = size == "tiny"
    tokenizer = build_clip_tokenizer()
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        text_encoder = _clip(tokenizer, 32, 2, 2) if tiny else _clip(tokenizer, 768, 12, 12)
        vae = _vae(4, tiny)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.bfloat16).save_pretrained(folder)
    return folder, sum(p.numel() for p in unet.parameters())


def build_sd3(folder: Path, size: str, device: str) -> tuple[Path, int]:
    """Save an SD3-medium-architecture pipeline to ``folder``; returns it and the transformer's parameter count."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from diffusers_ztsnr.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    tiny = size == "tiny"
    tokenizers = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
    width = 64 if tiny else 4096
    t5 = T5Config(vocab_size=len(tokenizers[2]) if tiny else 32128, d_model=width, d_ff=2 * width if tiny else 10240,
                  d_kv=16 if tiny else 64, num_layers=2, num_heads=4 if tiny else 64, feed_forward_proj="gated-gelu",
                  pad_token_id=tokenizers[2].pad_token_id, eos_token_id=tokenizers[2].eos_token_id,
                  decoder_start_token_id=tokenizers[2].pad_token_id)
    with torch.device(device):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**(TINY_SD3 if tiny else SD3_MEDIUM))
        clip_l = _clip(tokenizers[0], 32, 2, 2, 32) if tiny else _clip(tokenizers[0], 768, 12, 12, 768)
        clip_g = _clip(tokenizers[1], 32, 2, 2, 32) if tiny else _clip(tokenizers[1], 1280, 32, 20, 1280)
        text_encoder_3 = T5EncoderModel(t5)
        vae = _vae(16, tiny)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip_l, tokenizer=tokenizers[0], text_encoder_2=clip_g,
                                    tokenizer_2=tokenizers[1], text_encoder_3=text_encoder_3,
                                    tokenizer_3=tokenizers[2])
    pipe.to(torch.bfloat16).save_pretrained(folder)
    return folder, sum(p.numel() for p in transformer.parameters())
