"""Tiny, randomly initialised diffusers pipelines built entirely offline.

The factory builds real pipeline classes (:class:`~diffusers.StableDiffusionPipeline`,
:class:`~diffusers.StableDiffusionXLPipeline`, :class:`~diffusers.StableDiffusion3Pipeline`,
:class:`~diffusers.FluxPipeline`) from very small configs so that tests and examples can run the full
encode -> denoise -> decode path on a CPU in well under a second, without ever touching the Hugging Face
Hub. Weights are random but deterministic for a given ``seed``; the tokenizers are built locally (a
byte-level BPE CLIP tokenizer and a Unigram T5 tokenizer, :mod:`diffusers_ztsnr.testing.tokenizers`), and
everything survives ``save_pretrained`` / ``from_pretrained``.

The schedulers are the *real* default scheduler configs of the corresponding released checkpoints
(:mod:`diffusers_ztsnr.testing.released_schedulers`), so scheduler-level behaviour (timestep spacing,
offsets, shifts) matches the full-size models. How each pipeline is assembled is in
:mod:`diffusers_ztsnr.testing.tiny_builders`.

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

import itertools
import os
import pathlib

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .tiny_builders import BUILDERS

__all__ = [
    "TINY_KINDS",
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


def _check_kind(kind: str) -> str:
    if kind not in BUILDERS:
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
    builder = BUILDERS[_check_kind(kind)]
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
