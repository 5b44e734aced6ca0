"""Tiny, randomly initialised diffusers pipelines built entirely offline.

The factory builds real pipeline classes (:class:`~diffusers.StableDiffusionPipeline`,
:class:`~diffusers.StableDiffusionXLPipeline`, :class:`~diffusers.StableDiffusion3Pipeline`,
:class:`~diffusers.FluxPipeline`) from very small configs so that tests and examples can run the full
encode -> denoise -> decode path on a CPU in well under a second, without ever touching the Hugging Face
Hub. Weights are random but deterministic for a given ``seed``; the tokenizers are built locally (a
byte-level BPE CLIP tokenizer and a Unigram T5 tokenizer), and everything survives
``save_pretrained`` / ``from_pretrained``.

The schedulers are the *real* default scheduler configs of the corresponding released checkpoints, so
scheduler-level behaviour (timestep spacing, offsets, shifts) matches the full-size models.

Shapes (all VAEs have two blocks, i.e. a spatial factor of 2)::

    kind   pipeline                    VAE latents     denoiser input (64 x 64 px)
    sd15   StableDiffusionPipeline     4 ch, /2        UNet        (B, 4, 32, 32)
    sdxl   StableDiffusionXLPipeline   4 ch, /2        UNet        (B, 4, 32, 32)
    sd3    StableDiffusion3Pipeline    16 ch, /2       transformer (B, 16, 32, 32), patch 2
    flux   FluxPipeline                16 ch, /2       transformer (B, 256, 64) packed 2x2 tokens

The default image size of every tiny pipeline is 64 x 64 except Flux, whose pipeline hard-codes a
default of ``128 * vae_scale_factor`` (256 px): always pass ``height`` / ``width`` explicitly (32 and 64,
square or not, work for every kind). The pipelines' own checks require multiples of 8 for SD 1.5 / SDXL
and of 4 (VAE factor x patch / packing factor) for SD3 and Flux.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import pathlib
import string
import tempfile
import zlib
from collections.abc import Callable
from typing import TypeVar

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

__all__ = [
    "TINY_KINDS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "load_tiny_pipeline",
    "make_tiny_pipeline",
    "save_tiny_pipeline",
    "tiny_pipeline_class",
]

TINY_KINDS: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux")
"""The pipeline kinds :func:`make_tiny_pipeline` can build."""

_PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
}

_M = TypeVar("_M", bound=torch.nn.Module)

# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# A handful of merges so that multi-character tokens exist; every merge result is added to the vocab.
_CLIP_MERGES: tuple[str, ...] = (
    "t h",
    "th e</w>",
    "o f</w>",
    "c a",
    "ca t</w>",
    "d o",
    "do g</w>",
    "p h",
    "ph o",
    "o to</w>",
    "t o</w>",
    "pho to</w>",
    "a n",
    "an d</w>",
    "i n</w>",
)

_T5_WORDS: tuple[str, ...] = ("the", "a", "of", "and", "in", "cat", "dog", "photo", "red", "blue")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode symbol table (256 entries)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The tiny CLIP vocabulary: 256 byte symbols, their ``</w>`` forms, merge results, then BOS/EOS."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    for merge in _CLIP_MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(tokens)}, list(_CLIP_MERGES)


def _write_clip_files(directory: pathlib.Path) -> None:
    vocab, merges = _clip_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_clip_tokenizer(path_or_none: str | os.PathLike | None = None) -> CLIPTokenizer:
    """Build a tiny byte-level BPE :class:`~transformers.CLIPTokenizer` from locally written files.

    The vocabulary holds the 256 byte-level symbols (GPT-2 ``bytes_to_unicode``), their ``</w>``
    end-of-word forms, the results of a few merges, then ``<|startoftext|>`` (BOS) and ``<|endoftext|>``
    (EOS, also PAD and UNK, as in the released SD tokenizers); ``model_max_length`` is 77. Any text can
    be encoded (byte fallback), so no token is ever unknown.

    Args:
        path_or_none: directory to write ``vocab.json`` and ``merges.txt`` into (created if needed) and
            load the tokenizer from. ``None`` uses a temporary directory that is removed afterwards.

    Returns:
        The tokenizer; ``len(tokenizer)`` is the minimum ``vocab_size`` of a matching text encoder.
    """
    if path_or_none is None:
        with tempfile.TemporaryDirectory() as tmp:
            return build_clip_tokenizer(tmp)
    directory = pathlib.Path(path_or_none)
    _write_clip_files(directory)
    return CLIPTokenizer.from_pretrained(
        str(directory),
        model_max_length=CLIP_MAX_LENGTH,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
    )


def _t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces in T5 order: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then the regular vocabulary."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -2.0 - 0.1 * i) for i, w in enumerate(_T5_WORDS)]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_lowercase]
    pieces += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return pieces


def build_t5_tokenizer(path_or_none: str | os.PathLike | None = None) -> T5TokenizerFast:
    """Build a tiny Unigram :class:`~transformers.T5TokenizerFast` (no SentencePiece model needed).

    The vocabulary follows T5's layout (``<pad>``=0, ``</s>``=1, ``<unk>``=2) with the space marker, a
    few whole words and the printable ASCII characters; characters outside it map to ``<unk>``. It is
    built with ``extra_ids=0`` (no ``<extra_id_*>`` sentinels) through the same constructor that
    ``from_pretrained`` uses to rebuild it from ``tokenizer.json``, so a save / reload round trip
    encodes identically. ``model_max_length`` is 512.

    Args:
        path_or_none: if given, the tokenizer is saved there (``save_pretrained``) and the returned
            tokenizer is the one loaded back from that directory.

    Returns:
        The tokenizer; ``len(tokenizer)`` is the minimum ``vocab_size`` of a matching T5 encoder.
    """
    tokenizer = T5TokenizerFast(vocab=_t5_pieces(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
    if path_or_none is None:
        return tokenizer
    directory = pathlib.Path(path_or_none)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return T5TokenizerFast.from_pretrained(str(directory))


# --------------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------------


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


def _vae(
    latent_channels: int, scaling_factor: float, shift_factor: float | None, quant_conv: bool
) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------


# The released checkpoints' scheduler/scheduler_config.json, verbatim (minus "_diffusers_version").
# Built with ``from_config`` so that keys the class ignores (e.g. PNDM's ``clip_sample``) are still kept in
# ``scheduler.config``, exactly as when loading the real checkpoint: ``DDIMScheduler.from_config(
# pipe.scheduler.config)`` then gets ``clip_sample=False`` as it would for the real model.
_SCHEDULER_CONFIGS: dict[str, dict] = {
    # runwayml/stable-diffusion-v1-5
    "sd15": {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    # stabilityai/stable-diffusion-3-medium-diffusers
    "sd3": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 3.0,
    },
    # black-forest-labs/FLUX.1-dev
    "flux": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
}

_SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {
    "sd15": PNDMScheduler,
    "sdxl": EulerDiscreteScheduler,
    "sd3": FlowMatchEulerDiscreteScheduler,
    "flux": FlowMatchEulerDiscreteScheduler,
}


def _scheduler(kind: str) -> SchedulerMixin:
    return _SCHEDULER_CLASSES[kind].from_config(copy.deepcopy(_SCHEDULER_CONFIGS[kind]))


def _tiny_unet(**config) -> UNet2DConditionModel:
    """The two-level UNet of the SD-style kinds (32x32 latents, 4 channels); ``config`` adds the text wiring."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        **config,
    )


def _build_sd15(seed: int) -> StableDiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    unet = _seeded(seed, "unet", lambda: _tiny_unet(cross_attention_dim=32, attention_head_dim=4))
    vae = _seeded(seed, "vae", lambda: _vae(4, 0.18215, None, quant_conv=True))
    text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer, 32)))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler("sd15"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int) -> StableDiffusionXLPipeline:
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    hidden_1, hidden_2, projection_2 = 32, 32, 32
    addition_time_embed_dim = 8
    text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer, hidden_1)))
    text_encoder_2 = _seeded(
        seed,
        "text_encoder_2",
        lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2, hidden_2, projection_2)),
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
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_sd3(seed: int) -> StableDiffusion3Pipeline:
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer()
    # Two CLIPs of different widths (like CLIP-L / CLIP-G); their concatenation (48) is zero-padded by
    # the pipeline to the T5 width (64), which must therefore be at least as large.
    hidden_1, hidden_2, t5_width = 16, 32, 64
    text_encoder = _seeded(
        seed, "text_encoder", lambda: CLIPTextModelWithProjection(_clip_config(tokenizer, hidden_1, hidden_1))
    )
    text_encoder_2 = _seeded(
        seed,
        "text_encoder_2",
        lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2, hidden_2, hidden_2)),
    )
    text_encoder_3 = _seeded(
        seed, "text_encoder_3", lambda: T5EncoderModel(_t5_config(tokenizer_3, t5_width))
    )
    heads, head_dim = 4, 8
    transformer = _seeded(
        seed,
        "transformer",
        lambda: SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=t5_width,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=hidden_1 + hidden_2,
            pos_embed_max_size=32,
        ),
    )
    # stabilityai/stable-diffusion-3-medium-diffusers VAE normalisation
    vae = _seeded(seed, "vae", lambda: _vae(16, 1.5305, 0.0609, quant_conv=False))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler("sd3"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux(seed: int) -> FluxPipeline:
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    clip_hidden, t5_width = 32, 64
    text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer, clip_hidden)))
    text_encoder_2 = _seeded(
        seed, "text_encoder_2", lambda: T5EncoderModel(_t5_config(tokenizer_2, t5_width))
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
    return FluxPipeline(
        scheduler=_scheduler("flux"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _cast(pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
    """Cast every model of ``pipe`` to ``dtype`` in place.

    Uses ``torch.nn.Module.to`` directly: diffusers' ``ModelMixin.to(dtype=...)`` logs a spurious
    "should be kept in float32: []" warning for every model (0.42), and none of these tiny models has
    modules that must stay in float32.
    """
    if dtype == torch.float32:
        return
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype=dtype)


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
}


def _check_kind(kind: str) -> str:
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; allowed kinds: {', '.join(TINY_KINDS)}")
    return kind


def tiny_pipeline_class(kind: str) -> type[DiffusionPipeline]:
    """The pipeline class that :func:`make_tiny_pipeline` builds for ``kind`` (for ``from_pretrained``)."""
    return _PIPELINE_CLASSES[_check_kind(kind)]


def make_tiny_pipeline(
    kind: str, seed: int = 0, torch_dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Build a tiny randomly initialised pipeline of the given kind, fully offline.

    Every model is created right after seeding torch's global generator from ``(seed, component
    name)``, so the same ``seed`` always gives bit-identical weights (and the components of one
    pipeline differ from each other). The caller's global RNG state is restored afterwards. All models
    are in eval mode; the scheduler is the released checkpoint's default scheduler.

    Args:
        kind: one of :data:`TINY_KINDS`: ``"sd15"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``.
        seed: weight-initialisation seed.
        torch_dtype: dtype the models are cast to after being built in float32.

    Returns:
        A :class:`~diffusers.StableDiffusionPipeline`, :class:`~diffusers.StableDiffusionXLPipeline`,
        :class:`~diffusers.StableDiffusion3Pipeline` or :class:`~diffusers.FluxPipeline` on the CPU.
        Pass ``height``/``width`` (e.g. 64) when calling it; Flux needs them (its default is 256 px).

    Raises:
        ValueError: if ``kind`` is not one of :data:`TINY_KINDS`.
    """
    builder = _BUILDERS[_check_kind(kind)]
    with torch.random.fork_rng(devices=[]):
        pipe = builder(int(seed))
    _cast(pipe, torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(kind: str, path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build a tiny pipeline and ``save_pretrained`` it (safetensors) to ``path``.

    The directory can be loaded offline with ``tiny_pipeline_class(kind).from_pretrained(path)`` (or
    ``DiffusionPipeline.from_pretrained(path)``), tokenizers included.

    Args:
        kind: one of :data:`TINY_KINDS`.
        path: target directory (created if needed).
        seed: weight-initialisation seed.

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    pipe = make_tiny_pipeline(kind, seed=seed)
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def _reallocate_weights(pipe: DiffusionPipeline) -> None:
    """Copy every parameter and buffer into a freshly allocated (64-byte aligned) tensor, in place.

    ``from_pretrained`` leaves safetensors weights as views into one loaded buffer at arbitrary
    4-byte offsets. The weights are bit-identical, but MKL's GEMV/GEMM kernels pick different code
    paths for misaligned operands, so a forward pass can differ from the freshly built model by an
    ulp. Re-allocating restores bitwise-reproducible outputs. Tied parameters stay tied (``parameters()``
    yields each shared tensor once and ``.data`` is swapped in place).
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in itertools.chain(component.parameters(), component.buffers()):
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


def load_tiny_pipeline(
    kind: str, path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Load a pipeline written by :func:`save_tiny_pipeline`, offline, reproducing it bit for bit.

    Equivalent to ``tiny_pipeline_class(kind).from_pretrained(path)`` except that the loaded weights
    are re-allocated into aligned memory (see :func:`_reallocate_weights`), so the loaded pipeline's
    outputs are bitwise identical to those of ``make_tiny_pipeline(kind, seed)`` on the same machine; a
    plain ``from_pretrained`` agrees only to float32 round-off (about 1e-7) on MKL CPU builds. The
    progress bar is disabled, as in :func:`make_tiny_pipeline`.

    Args:
        kind: one of :data:`TINY_KINDS` (selects the pipeline class).
        path: a directory written by :func:`save_tiny_pipeline` (or ``save_pretrained``).
        torch_dtype: dtype the models are cast to after loading (as :func:`make_tiny_pipeline` does).

    Raises:
        ValueError: if ``kind`` is not one of :data:`TINY_KINDS`.
    """
    pipe = tiny_pipeline_class(kind).from_pretrained(str(path))
    # cast after loading: the from_pretrained keyword is ``torch_dtype`` or ``dtype`` by diffusers version
    _cast(pipe, torch_dtype)
    _reallocate_weights(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe
