"""Qwen-Image (``QwenImagePipeline``, ``QwenImageTransformer2DModel``): an MMDiT on Qwen2.5-VL's last hidden layer,
trained with LoRA as a rectified flow.

As ``QwenImagePipeline`` (diffusers 0.42) calls it: the prompt goes into the pipeline's system/user chat template,
the template's first ``prompt_template_encode_start_idx`` tokens are dropped from the last hidden layer, and the
batch is padded to its longest prompt with ``encoder_hidden_states_mask`` (``None`` when no row is padded). Latents
are the causal 3D VAE's single frame normalised per channel, ``(z - latents_mean) / latents_std``, held here as
``[B, C, h, w]``; the transformer takes them as 2x2-packed tokens with ``img_shapes`` ``[(1, h/2, w/2)]`` per image and
the time ``s`` itself (``timestep / 1000``), and outputs the velocity ``eps - x0``.
"""

from __future__ import annotations

from typing import Any

import torch

from .text_dit import TextDiTTask, pad_prompts

#: diffusers' train_dreambooth_lora_qwen_image.py default targets: the image stream's attention projections
#: (the text stream's add_*_proj / to_add_out are separate modules it leaves out)
DEFAULT_LORA_LAYERS = ("to_k", "to_q", "to_v", "to_out.0")


class QwenImageTask(TextDiTTask):
    """Qwen-Image: LoRA on the transformer; Qwen2.5-VL stays frozen."""

    pipelines = ("QwenImagePipeline",)
    family_name = "qwen-image"
    family_title = "Qwen-Image"
    feed_forward_pattern = r"(img|txt)_mlp\.net\.(0\.proj|2)"
    max_sequence_length_limit = 1024

    def default_lora_layers(self) -> tuple[str, ...]:
        return DEFAULT_LORA_LAYERS

    def encode_prompts(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(list(captions), device=device,
                                               max_sequence_length=self.max_sequence_length)
        lengths = [embeds.shape[1]] * len(embeds) if mask is None else mask.sum(dim=1).tolist()
        return pad_prompts([row[:n] for row, n in zip(embeds, lengths, strict=True)], self.max_sequence_length)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE's mean latent of each image as one frame, normalised by ``latents_mean`` / ``latents_std``."""
        vae = self.vae
        latents = vae.encode(pixel_values.to(vae.dtype).unsqueeze(2)).latent_dist.mean[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return (latents - mean) / std

    def predict(self, model, noisy: torch.Tensor, s: torch.Tensor, cond: dict[str, Any],
                weight_dtype: torch.dtype) -> torch.Tensor:
        """The velocity ``eps - x0`` for latents ``noisy`` ``[B, C, h, w]`` at flow times ``s`` ``[B]``."""
        device, (b, c, h, w) = noisy.device, noisy.shape
        mask = cond["prompt_mask"].to(device) > 0.5
        longest = int(mask.sum(dim=1).max())  # the pipeline pads a batch to its longest prompt
        embeds, mask = cond["prompt_embeds"][:, :longest].to(device, weight_dtype), mask[:, :longest]
        packed = self.pipeline_class._pack_latents(noisy.to(weight_dtype), b, c, h, w)
        out = model(hidden_states=packed, timestep=s.to(device, torch.float32), encoder_hidden_states=embeds,
                    encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                    img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        scale = self.pipe.vae_scale_factor
        return self.pipeline_class._unpack_latents(out, h * scale, w * scale, scale)[:, :, 0]
