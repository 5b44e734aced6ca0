"""FLUX.1 Kontext (``FluxKontextPipeline``): FLUX.1's transformer trained with LoRA as a rectified flow, optionally
conditioned on a reference image.

With ``--cond_image_column`` each batch carries the reference images (``cond_pixel_values``, cropped as their
targets; under ``--cache_latents`` their latents, ``cond_latents``). Their VAE latents are packed into 2x2 tokens
and appended after the noisy tokens, with position ids whose first coordinate is 1 (the generated image's is 0), as
``FluxKontextPipeline.prepare_latents`` builds them for sampling; the transformer's output is cut back to the noisy
tokens, so the loss sees only them. The references are clean (never noised), as in diffusers'
``train_dreambooth_lora_flux_kontext.py``. Without the flag Kontext trains text-to-image, as FLUX.1.

Validation samples ``--validation_prompt`` from ``--validation_image`` (resized and center-cropped to
``--resolution`` like the training references; the pipeline's own resize to its preferred Kontext resolutions is
turned off, as it would not match the training size).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..objectives import Predict
from ..reference_images import validation_reference
from .flow_transformers import DEFAULT_LORA_LAYERS, FlowTask

#: diffusers' ``train_dreambooth_lora_flux_kontext.py`` default: FLUX.1's targets and the single blocks' MLP input
KONTEXT_LORA_LAYERS = (*DEFAULT_LORA_LAYERS["FluxPipeline"], "proj_mlp")


class FluxKontextTask(FlowTask):
    """FLUX.1 Kontext: :class:`FlowTask`'s FLUX.1 path, with reference-image tokens beside the noisy ones."""

    pipelines = ("FluxKontextPipeline",)
    #: the base pipeline takes a reference image (``--cond_image_column``, ``--validation_image``)
    takes_reference_image = True

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.validation_image = validation_reference(args) if args.validation_image else None

    def default_lora_layers(self) -> tuple[str, ...]:
        return KONTEXT_LORA_LAYERS

    def predictor(self, model, batch: dict[str, Any], weight_dtype: torch.dtype, path: str) -> Predict:
        plain = super().predictor(model, batch, weight_dtype, path)
        reference = batch.get("cond_latents")  # encoded once, by the encodings cache
        if reference is None and batch.get("cond_pixel_values") is not None:
            with torch.no_grad():
                reference = self.encode_images(batch["cond_pixel_values"].to(self.vae.device)).float()
        if reference is None:
            return plain
        return lambda noisy, s, cond: self.predict(model, noisy, s, cond, weight_dtype, reference=reference)

    def validation_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        # the pipeline rescales height x width to max_area (default 1024^2): keep the training size
        kwargs = {**super().validation_kwargs(args), "max_area": args.resolution ** 2}
        if self.validation_image is not None:
            kwargs.update(image=self.validation_image, _auto_resize=False)
        return kwargs
