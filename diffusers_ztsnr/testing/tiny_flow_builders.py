"""Tiny flow pipelines beyond SD3 and FLUX.1: SD3.5, FLUX.1 Kontext and Chroma, random weights, offline.

Each is the real diffusers pipeline class around small models of the real architectures: SD3.5's transformer
adds RMS-normed queries and keys and dual-attention (MMDiT-X) blocks to SD3's; Kontext is FLUX.1's transformer in
``FluxKontextPipeline`` (which packs a reference image's latents beside the noisy ones when one is given); Chroma
is a FLUX.1-style transformer without CLIP and without guidance embedding, conditioned on T5 alone, its
modulations computed by a small approximator network.
"""

from __future__ import annotations

from diffusers import (
    ChromaPipeline,
    ChromaTransformer2DModel,
    FluxKontextPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import T5EncoderModel

from .tiny_builders import _build_flux, _build_sd3, _scheduler, _seeded, _t5_config, _text_components, _vae
from .tokenizers import build_t5_tokenizer


def build_sd35(seed: int) -> StableDiffusion3Pipeline:
    """SD3's tiny pipeline with an SD3.5-style transformer: ``qk_norm="rms_norm"`` and dual attention in block 0
    (SD3.5 medium uses both; large uses the norm only)."""
    pipe = _build_sd3(seed)
    config = dict(pipe.transformer.config)
    keep = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
            "pos_embed_max_size")
    transformer = _seeded(seed, "transformer", lambda: SD3Transformer2DModel(
        **{k: config[k] for k in keep}, qk_norm="rms_norm", dual_attention_layers=(0,)))
    return StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer})


def build_flux_kontext(seed: int) -> FluxKontextPipeline:
    """FLUX.1 Kontext: FLUX.1's tiny components in the editing pipeline."""
    components = {k: v for k, v in _build_flux(seed).components.items() if v is not None}
    return FluxKontextPipeline(**components)


def build_chroma(seed: int) -> ChromaPipeline:
    """Chroma: T5 only; Flux's scheduler config (the pipeline passes sigmas and ``mu`` as FluxPipeline does)."""
    t5_width, latent_channels = 64, 16
    text = _text_components(seed, (build_t5_tokenizer(), lambda t: T5EncoderModel(_t5_config(t, t5_width))))
    transformer = _seeded(seed, "transformer", lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, axes_dims_rope=(4, 6, 6),
        approximator_hidden_dim=32, approximator_layers=1))
    vae = _seeded(seed, "vae", lambda: _vae(latent_channels, 0.3611, 0.1159, quant_conv=False))
    return ChromaPipeline(**text, transformer=transformer, vae=vae, scheduler=_scheduler("flux"))
