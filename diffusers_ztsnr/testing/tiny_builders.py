"""How each tiny pipeline is assembled: small random models around the offline tokenizers.

Every model is created right after seeding torch's global generator from ``(seed, component name)``
(:func:`_seeded`), so equally shaped components differ and the same seed gives the same weights. The
scheduler is the released checkpoint's (:mod:`diffusers_ztsnr.testing.released_schedulers`). Shapes and
sizes are listed in :mod:`diffusers_ztsnr.testing.tiny`, which is the public entry point.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SchedulerMixin,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .released_schedulers import released_scheduler_config
from .tokenizers import CLIP_MAX_LENGTH, build_clip_tokenizer, build_t5_tokenizer

__all__ = ["BUILDERS"]

_M = TypeVar("_M", bound=torch.nn.Module)


def _component_seed(seed: int, name: str) -> int:
    """A per-component seed, so that equally shaped components (e.g. two encoders) differ."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _seeded(seed: int, name: str, factory: Callable[[], _M]) -> _M:
    torch.manual_seed(_component_seed(seed, name))
    return factory().eval()


def _clip_config(
    tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int | None = None
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim if projection_dim is not None else hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer: T5TokenizerFast, d_model: int) -> T5Config:
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=0,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


#: the VAE and the UNet both have two levels (32 and 64 channels, one block each): 64 px images, 32 px latents
_TWO_LEVELS: dict[str, Any] = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 32}


def _vae(
    latent_channels: int, scaling_factor: float, shift_factor: float | None, quant_conv: bool
) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        **_TWO_LEVELS,
        latent_channels=latent_channels,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


_SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {
    "sd15": PNDMScheduler,
    "sdxl": EulerDiscreteScheduler,
    "sd3": FlowMatchEulerDiscreteScheduler,
    "flux": FlowMatchEulerDiscreteScheduler,
}


def _scheduler(kind: str) -> SchedulerMixin:
    """The released checkpoint's scheduler, built with ``from_config``: keys the class ignores (e.g. PNDM's
    ``clip_sample``) are still kept in ``scheduler.config``, exactly as when loading the real checkpoint, so
    ``DDIMScheduler.from_config(pipe.scheduler.config)`` then gets ``clip_sample=False`` as it would for the
    real model."""
    return _SCHEDULER_CLASSES[kind].from_config(released_scheduler_config(kind))


def _tiny_unet(**config) -> UNet2DConditionModel:
    """The two-level UNet of the SD-style kinds (32x32 latents, 4 channels); ``config`` adds the text wiring."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **_TWO_LEVELS,
        **config,
    )


def _text_components(seed: int, *encoders: tuple[Any, Callable[[Any], torch.nn.Module]]) -> dict[str, Any]:
    """The text side of a pipeline under diffusers' component names: encoder ``i`` (from 1) and its tokenizer are
    ``text_encoder`` / ``tokenizer`` for the first, ``text_encoder_{i}`` / ``tokenizer_{i}`` after; each encoder is
    ``make_encoder(tokenizer)`` seeded by its component name."""
    components: dict[str, Any] = {}
    for index, (tokenizer, make_encoder) in enumerate(encoders, start=1):
        suffix = "" if index == 1 else f"_{index}"
        components[f"tokenizer{suffix}"] = tokenizer
        components[f"text_encoder{suffix}"] = _seeded(seed, f"text_encoder{suffix}", partial(make_encoder, tokenizer))
    return components


def _build_sd15(seed: int) -> StableDiffusionPipeline:
    text = _text_components(seed, (build_clip_tokenizer(), lambda t: CLIPTextModel(_clip_config(t, 32))))
    unet = _seeded(seed, "unet", lambda: _tiny_unet(cross_attention_dim=32, attention_head_dim=4))
    vae = _seeded(seed, "vae", lambda: _vae(4, 0.18215, None, quant_conv=True))
    return StableDiffusionPipeline(
        **text, unet=unet, vae=vae, scheduler=_scheduler("sd15"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_sdxl(seed: int) -> StableDiffusionXLPipeline:
    hidden_1, hidden_2, projection_2 = 32, 32, 32
    addition_time_embed_dim = 8
    text = _text_components(
        seed,
        (build_clip_tokenizer(), lambda t: CLIPTextModel(_clip_config(t, hidden_1))),
        (build_clip_tokenizer(), lambda t: CLIPTextModelWithProjection(_clip_config(t, hidden_2, projection_2))),
    )
    unet = _seeded(
        seed,
        "unet",
        lambda: _tiny_unet(
            transformer_layers_per_block=1,
            cross_attention_dim=hidden_1 + hidden_2,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            # six micro-conditioning ids (original size, crop top-left, target size) + pooled text
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_2,
        ),
    )
    vae = _seeded(seed, "vae", lambda: _vae(4, 0.13025, None, quant_conv=True))
    return StableDiffusionXLPipeline(
        **text, unet=unet, vae=vae, scheduler=_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _build_sd3(seed: int) -> StableDiffusion3Pipeline:
    # Two CLIPs of different widths (like CLIP-L / CLIP-G); their concatenation (48) is zero-padded by
    # the pipeline to the T5 width (64), which must therefore be at least as large.
    hidden_1, hidden_2, t5_width = 16, 32, 64
    text = _text_components(
        seed,
        (build_clip_tokenizer(), lambda t: CLIPTextModelWithProjection(_clip_config(t, hidden_1, hidden_1))),
        (build_clip_tokenizer(), lambda t: CLIPTextModelWithProjection(_clip_config(t, hidden_2, hidden_2))),
        (build_t5_tokenizer(), lambda t: T5EncoderModel(_t5_config(t, t5_width))),
    )
    heads, head_dim = 4, 8
    transformer = _seeded(
        seed,
        "transformer",
        lambda: SD3Transformer2DModel(
            # 32x32 latents of 16 channels in 2x2 patches; two joint blocks of 4 heads of 8
            sample_size=32, pos_embed_max_size=32, patch_size=2, in_channels=16, out_channels=16,
            num_layers=2, num_attention_heads=heads, attention_head_dim=head_dim,
            caption_projection_dim=heads * head_dim,
            # the text side: T5 states (zero-padded CLIP states beside them) and both CLIPs' pooled projections
            joint_attention_dim=t5_width, pooled_projection_dim=hidden_1 + hidden_2,
        ),
    )
    # stabilityai/stable-diffusion-3-medium-diffusers VAE normalisation
    vae = _seeded(seed, "vae", lambda: _vae(16, 1.5305, 0.0609, quant_conv=False))
    return StableDiffusion3Pipeline(**text, transformer=transformer, vae=vae, scheduler=_scheduler("sd3"))


def _build_flux(seed: int) -> FluxPipeline:
    clip_hidden, t5_width = 32, 64
    text = _text_components(
        seed,
        (build_clip_tokenizer(), lambda t: CLIPTextModel(_clip_config(t, clip_hidden))),
        (build_t5_tokenizer(), lambda t: T5EncoderModel(_t5_config(t, t5_width))),
    )
    latent_channels = 16
    transformer = _seeded(
        seed,
        "transformer",
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # 2x2 latent patches are packed into channels
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_width,
            pooled_projection_dim=clip_hidden,  # CLIP pooler_output, no projection
            guidance_embeds=True,  # FLUX.1-dev style (guidance-distilled)
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        ),
    )
    # black-forest-labs/FLUX.1-dev VAE normalisation
    vae = _seeded(seed, "vae", lambda: _vae(latent_channels, 0.3611, 0.1159, quant_conv=False))
    return FluxPipeline(**text, transformer=transformer, vae=vae, scheduler=_scheduler("flux"))


BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
}
"""``kind -> build(seed)``: the pipeline in float32 on the CPU, models in eval mode (the caller forks the RNG)."""
