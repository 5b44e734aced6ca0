"""Z-Image (``ZImagePipeline``, ``ZImageTransformer2DModel``): a single-stream DiT on a Qwen3 decoder's hidden states,
trained with LoRA as a rectified flow.

As ``ZImagePipeline`` (diffusers 0.42) calls it: the prompt is the user turn of Qwen's chat template
(``add_generation_prompt``, ``enable_thinking=True``), encoded padded to ``max_sequence_length``; the conditioning is
the second-to-last hidden layer at the prompt's own tokens (one ``[n_i, D]`` tensor per prompt, no mask). Latents
are the VAE's ``(z - shift_factor) * scaling_factor``; the transformer takes a list of ``[C, 1, h, w]`` latents, the
time ``1 - s`` and the list of prompt states, and returns ``x0 - eps``: the velocity ``eps - x0`` is its negative.
"""

from __future__ import annotations

from typing import Any

import torch

from .text_dit import TextDiTTask, pad_prompts

#: diffusers' train_dreambooth_lora_z_image.py default targets: the attention projections of every block (main
#: layers and both refiners)
DEFAULT_LORA_LAYERS = ("to_k", "to_q", "to_v", "to_out.0")


class ZImageTask(TextDiTTask):
    """Z-Image: LoRA on the transformer; the Qwen3 encoder stays frozen."""

    pipelines = ("ZImagePipeline",)
    family_name = "z-image"
    family_title = "Z-Image"
    block_pattern = r"(?:layers|noise_refiner|context_refiner)\.\d+\.(.+)"
    attention_pattern = r"attention\.(to_q|to_k|to_v|to_out\.0)"
    feed_forward_pattern = r"feed_forward\.w[123]"

    def default_lora_layers(self) -> tuple[str, ...]:
        return DEFAULT_LORA_LAYERS

    def encode_prompts(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        # a copy: the pipeline writes the templated prompts into the list it is given
        rows, _ = self.pipe.encode_prompt(list(captions), device=device, do_classifier_free_guidance=False,
                                          max_sequence_length=self.max_sequence_length)
        return pad_prompts(rows, self.max_sequence_length)

    def predict(self, model, noisy: torch.Tensor, s: torch.Tensor, cond: dict[str, Any],
                weight_dtype: torch.dtype) -> torch.Tensor:
        """The velocity ``eps - x0`` for latents ``noisy`` ``[B, C, h, w]`` at flow times ``s`` ``[B]``."""
        device = noisy.device
        mask = cond["prompt_mask"].to(device) > 0.5
        embeds = cond["prompt_embeds"].to(device, weight_dtype)
        prompts = [row[keep] for row, keep in zip(embeds, mask, strict=True)]
        latents = list(noisy.to(weight_dtype).unsqueeze(2).unbind(0))
        out = model(latents, (1 - s).to(device, torch.float32), prompts, return_dict=False)[0]
        return -torch.stack([x.float() for x in out]).squeeze(2)
