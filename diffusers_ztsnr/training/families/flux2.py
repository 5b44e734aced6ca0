"""FLUX.2 Klein (``Flux2KleinPipeline``) and FLUX.2 dev (``Flux2Pipeline``), one ``Flux2Transformer2DModel`` on
three stacked hidden layers of a decoder LM (Qwen3 for Klein, Mistral Small 3.1 for dev), trained with LoRA as a
rectified flow.

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

FLUX.2 dev differs where ``Flux2Pipeline`` does: the prompt is the user turn after the pipeline's system message in
Mistral's chat template (``format_input``), its hidden layers (10, 20, 30) are stacked, and the transformer is
guidance-distilled: it takes ``guidance`` = ``--guidance_scale`` (default 4.0, the pipeline's ``guidance_scale``
default) for every sample, ``torch.full([1], g).expand(B)`` in float32 as the pipeline builds it.
"""

from __future__ import annotations

from typing import Any

import torch

from .text_dit import TextDiTTask

#: the pipelines' default ``text_encoder_out_layers``: Klein's (for its 36-layer Qwen3) and dev's (Mistral, 40 layers)
KLEIN_TEXT_LAYERS = (9, 18, 27)
DEV_TEXT_LAYERS = (10, 20, 30)
#: ``Flux2Pipeline.__call__``'s ``guidance_scale`` default
DEV_GUIDANCE = 4.0


def klein_lora_layers(num_single_layers: int) -> tuple[str, ...]:
    """diffusers' train_dreambooth_lora_flux2_klein.py default targets: the double blocks' attention projections,
    and the single blocks' fused input (q, k, v, MLP) and output projections."""
    return ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
            *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single_layers)))


def text_layers(num_hidden_layers: int, stacked: int,
                defaults: tuple[int, ...] = KLEIN_TEXT_LAYERS) -> tuple[int, ...]:
    """The hidden layers to stack: the pipeline's ``defaults`` when the encoder has them, else (small test
    models) its last ``stacked`` layers."""
    if num_hidden_layers >= max(defaults) and stacked == len(defaults):
        return defaults
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
    default_text_layers = KLEIN_TEXT_LAYERS

    def __init__(self, args):
        super().__init__(args)
        config = self.text_encoders[0].config.get_text_config()
        stacked = self.denoiser.config.joint_attention_dim // config.hidden_size
        self.text_layers = text_layers(config.num_hidden_layers, stacked, self.default_text_layers)

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
        guidance = None
        if self.guidance is not None:  # as Flux2Pipeline.__call__ builds it
            guidance = torch.full([1], float(self.guidance), device=device, dtype=torch.float32).expand(len(tokens))
        out = model(hidden_states=tokens, timestep=s.to(device, torch.float32), guidance=guidance,
                    encoder_hidden_states=embeds, txt_ids=pipe._prepare_text_ids(embeds).to(device),
                    img_ids=latent_ids, return_dict=False)[0]
        return pipe._unpatchify_latents(self._unpack(out[:, :tokens.shape[1]], latent_ids, patches))

    def _unpack(self, tokens: torch.Tensor, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, h*w, C]`` back to ``[B, C, h, w]`` by their position ids, as the pipeline unpacks."""
        return self.pipeline_class._unpack_latents_with_ids(tokens, ids, *patches.shape[2:])

    def validation_kwargs(self, args) -> dict[str, Any]:
        return {**super().validation_kwargs(args), "text_encoder_out_layers": self.text_layers}


class Flux2Task(Flux2KleinTask):
    """FLUX.2 dev: LoRA on the guidance-distilled transformer; Mistral 3 stays frozen."""

    pipelines = ("Flux2Pipeline",)
    family_name = "flux2"
    family_title = "FLUX.2 dev"
    default_text_layers = DEV_TEXT_LAYERS
    default_guidance = DEV_GUIDANCE

    def default_lora_layers(self) -> tuple[str, ...]:
        """diffusers' train_dreambooth_lora_flux2.py default targets: the double blocks' image-stream attention
        projections (the single blocks' fused projections have other names)."""
        return ("to_k", "to_q", "to_v", "to_out.0")

    def _unpack(self, tokens: torch.Tensor, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.pipeline_class._unpack_latents_with_ids(tokens, ids)  # dev's reads the size from the ids

    def validation_kwargs(self, args) -> dict[str, Any]:
        return {**super().validation_kwargs(args), "guidance_scale": self.guidance}
