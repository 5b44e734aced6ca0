"""Chroma (``ChromaPipeline``, ``ChromaTransformer2DModel``): a FLUX.1-derived transformer trained with LoRA as a
rectified flow, on FLUX.1's conventions (2x2-packed latent tokens, the transformer takes the flow time ``s``).

What differs from FLUX.1 (diffusers' ``ChromaPipeline``): T5 is the only text encoder (no CLIP, no pooled
projection), there is no guidance embedding (``--guidance_scale`` is an error), and the T5 attention mask is used
twice: T5 encodes the prompt under its tokenizer mask, and the transformer attends to the prompt tokens up to and
including the first padding token only (``ChromaPipeline._get_t5_prompt_embeds``), the image tokens always
(``ChromaPipeline._prepare_attention_mask``). The mask travels with the prompt encodings (``prompt_attention_mask``),
so the encodings cache and caption dropout (the empty prompt's mask) keep it. The pipeline's mask is float 0 / 1,
which diffusers' attention adds to the scores (padding keys are down-weighted, not removed); it is fed as is, so
training sees what sampling sees.

diffusers has no Chroma training example; ``--lora_layers`` defaults to the attention projections of both streams,
SimpleTuner's default for its FLUX.1-derived models (``--flux_lora_target all``: ``to_q``, ``to_k``, ``to_v``,
``to_out.0``, ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..config import InputError
from ..task import ModelTask
from .flow_transformers import FlowTask, guidance_value, lora_targets

CHROMA_LORA_LAYERS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                      "attn.add_v_proj", "attn.to_add_out")


class ChromaTask(FlowTask):
    """Chroma: :class:`FlowTask`'s FLUX.1 path without pooled projection or guidance, with Chroma's text mask."""

    pipelines = ("ChromaPipeline",)
    cond_keys = ("prompt_embeds", "prompt_attention_mask")

    def __init__(self, args: argparse.Namespace):
        ModelTask.__init__(self, args)  # not FlowTask's: no CLIP, no pooled projection
        if args.train_text_encoder:
            raise InputError("--train_text_encoder: Chroma's only text encoder is T5, which is never trained here (nor "
                             "in diffusers' scripts); drop --train_text_encoder.")
        self.trainable_text_encoders = {}
        self.is_flux = True  # FLUX.1's packing and time convention
        self.max_sequence_length = args.max_sequence_length or 512  # ChromaPipeline's default
        self.guidance = guidance_value(args, False, self.class_name)  # None, or the error naming the flag
        self.lora_layers, self.lora_layers_label = lora_targets(args, self.denoiser, self.default_lora_layers())

    def default_lora_layers(self) -> tuple[str, ...]:
        return CHROMA_LORA_LAYERS

    def encode_prompts(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        embeds, _text_ids, mask, *_ = self.pipe.encode_prompt(
            captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def predict(self, model, noisy: torch.Tensor, s: torch.Tensor, cond: dict[str, torch.Tensor],
                weight_dtype: torch.dtype, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's velocity for latents ``noisy`` ``[B, C, h, w]`` at flow times ``s`` ``[B]``."""
        device = noisy.device
        embeds = cond["prompt_embeds"].to(device, weight_dtype)
        tokens, img_ids = self.image_tokens(noisy.to(weight_dtype), 0)
        mask = self.pipe._prepare_attention_mask(batch_size=len(noisy), sequence_length=tokens.shape[1],
                                                 dtype=weight_dtype,
                                                 attention_mask=cond["prompt_attention_mask"].to(device, weight_dtype))
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=weight_dtype)
        out = model(hidden_states=tokens, timestep=s.to(device, torch.float32), encoder_hidden_states=embeds,
                    txt_ids=txt_ids, img_ids=img_ids, attention_mask=mask, return_dict=False)[0]
        return self.unpack(out, noisy.shape)

    def validation_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}
