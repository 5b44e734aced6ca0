"""FLUX.2 Klein (``Flux2KleinPipeline``, ``Flux2Transformer2DModel``): FLUX.2's transformer on three stacked hidden
layers of a Qwen3 decoder, trained with LoRA as a rectified flow.

As ``Flux2KleinPipeline`` (diffusers 0.42) calls it: each prompt is the user turn of Qwen's chat template
(``enable_thinking=False``), padded to ``max_sequence_length``; the hidden layers ``text_encoder_out_layers``
((9, 18, 27) for Klein's 36-layer Qwen3) are stacked along the features; every padded token is kept (no mask) with
text ids ``(0, 0, 0, l)``. The VAE latent is patchified 2x2 and normalised by the VAE's batch-norm statistics,
``(z - running_mean) / sqrt(running_var + batch_norm_eps)``; the transformer takes its pixels as tokens with ids
``(0, row, column, 0)``, the time ``s`` (``timestep / 1000``) and ``guidance=None``, and outputs the velocity.

Latents are held here unpatchified, ``[B, C, h, w]`` (the normalised patches put back in place, a permutation): the
noise and the loss are the same, and the resolution-dependent shift counts the 2x2 patches as for FLUX.1. The
pipeline's own sampling shift, ``compute_empirical_mu``, also depends on the step count; with ``--timestep_shift
auto`` training uses the scheduler config's linear ``mu`` (diffusers' Klein script trains unshifted).

``Flux2Pipeline`` (FLUX.2 dev) conditions on Mistral 3 through its processor and is not trained here.
"""

from __future__ import annotations

from typing import Any

import torch

from .text_dit import TextDiTTask

#: the pipeline's default ``text_encoder_out_layers``, for Klein's 36-layer Qwen3
KLEIN_TEXT_LAYERS = (9, 18, 27)


def klein_lora_layers(num_single_layers: int) -> tuple[str, ...]:
    """diffusers' train_dreambooth_lora_flux2_klein.py default targets: the double blocks' attention projections,
    and the single blocks' fused input (q, k, v, MLP) and output projections."""
    return ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
            *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single_layers)))


def text_layers(num_hidden_layers: int, stacked: int) -> tuple[int, ...]:
    """The hidden layers Klein stacks: the pipeline's (9, 18, 27) when the encoder has them, else (small test
    models) its last ``stacked`` layers."""
    if num_hidden_layers >= max(KLEIN_TEXT_LAYERS) and stacked == len(KLEIN_TEXT_LAYERS):
        return KLEIN_TEXT_LAYERS
    return tuple(range(num_hidden_layers - stacked + 1, num_hidden_layers + 1))


class Flux2KleinTask(TextDiTTask):
    """FLUX.2 Klein: LoRA on the transformer; Qwen3 stays frozen."""

    pipelines = ("Flux2KleinPipeline",)
    family_name = "flux2-klein"
    family_title = "FLUX.2 Klein"
    cond_keys = ("prompt_embeds",)
    block_pattern = r"(?:single_)?transformer_blocks\.\d+\.(.+)"
    # a single block's attention is its fused input (q, k, v and the MLP input) and its fused output projection
    attention_pattern = (r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
                         r"|to_qkv_mlp_proj|to_out)")
    feed_forward_pattern = r"(ff|ff_context)\.linear_(in|out)"

    def __init__(self, args):
        super().__init__(args)
        width = self.text_encoders[0].config.hidden_size
        stacked = self.denoiser.config.joint_attention_dim // width
        self.text_layers = text_layers(self.text_encoders[0].config.num_hidden_layers, stacked)

    def default_lora_layers(self) -> tuple[str, ...]:
        return klein_lora_layers(self.denoiser.config.num_single_layers)

    def encode_prompts(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(captions), device=device, max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_layers)
        return {"prompt_embeds": embeds}

    def _batch_norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE's mean latent, patchified, batch-norm normalised, unpatchified: ``[B, C, h, w]``."""
        pipe = self.pipeline_class
        patches = pipe._patchify_latents(self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.mean)
        mean, std = self._batch_norm(patches)
        return pipe._unpatchify_latents((patches - mean) / std)

    def predict(self, model, noisy: torch.Tensor, s: torch.Tensor, cond: dict[str, Any],
                weight_dtype: torch.dtype) -> torch.Tensor:
        """The velocity ``eps - x0`` for (unpatchified) latents ``noisy`` ``[B, C, h, w]`` at flow times ``s``."""
        pipe, device = self.pipeline_class, noisy.device
        patches = pipe._patchify_latents(noisy.to(weight_dtype))
        embeds = cond["prompt_embeds"].to(device, weight_dtype)
        latent_ids = pipe._prepare_latent_ids(patches).to(device)
        tokens = pipe._pack_latents(patches)
        out = model(hidden_states=tokens, timestep=s.to(device, torch.float32), guidance=None,
                    encoder_hidden_states=embeds, txt_ids=pipe._prepare_text_ids(embeds).to(device),
                    img_ids=latent_ids, return_dict=False)[0]
        out = pipe._unpack_latents_with_ids(out[:, :tokens.shape[1]], latent_ids, *patches.shape[2:])
        return pipe._unpatchify_latents(out)

    def validation_kwargs(self, args) -> dict[str, Any]:
        return {**super().validation_kwargs(args), "text_encoder_out_layers": self.text_layers}
