"""SD3 (``SD3Transformer2DModel``) and Flux (``FluxTransformer2DModel``): the transformer trained with LoRA as a
rectified flow. SD3.5 is this SD3 task: the same pipeline class and forward, its RMS-normed queries and keys and
its dual-attention (MMDiT-X) blocks being configuration of the same transformer class. FLUX.1 Kontext
(:mod:`.flux_kontext`) and Chroma (:mod:`.chroma`) are subclasses.

Conventions (diffusers'): ``x_s = (1 - s) * x0 + s * eps`` with ``s = 1`` pure noise, the output is the velocity
``eps - x0``; SD3's transformer takes the model time ``1000 * s``, Flux's takes ``s`` (it multiplies by 1000 inside)
on packed 2x2 latent patches.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import torch

from ..card import RunFacts, render_flow_card
from ..config import DEFAULT_FLUX_GUIDANCE, InputError
from ..lora import add_lora, is_dora, save_diffusers_lora, save_kohya_lora
from ..objectives import FlowMatchingObjective, Predict, resolve_flow_shift
from ..task import ModelTask
from .lora_presets import PRESETS, resolve_lora_layers

PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
# attention (and for Flux the feed-forward) projections: the defaults of diffusers' SD3 / Flux LoRA scripts
DEFAULT_LORA_LAYERS = {
    "StableDiffusion3Pipeline": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                 "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"),
    "FluxPipeline": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"),
}


def flow_objective(args: argparse.Namespace, scheduler_config: dict[str, Any]) -> FlowMatchingObjective:
    """Flow matching with ``--weighting_scheme``'s time density or weight, shifted as ``--timestep_shift`` says
    (``auto``: as the model's scheduler, ``scheduler_config``, shifts at sampling time)."""
    return FlowMatchingObjective(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale,
                                 shift=resolve_flow_shift(args.timestep_shift, scheduler_config),
                                 precondition_outputs=bool(args.precondition_outputs))


def guidance_value(args: argparse.Namespace, has_embedding: bool, class_name: str) -> float | None:
    """The guidance value fed to a guidance-distilled transformer (``--guidance_scale``, default
    :data:`DEFAULT_FLUX_GUIDANCE`); ``None`` for one without a guidance embedding, where the flag is an error."""
    if has_embedding:
        return DEFAULT_FLUX_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    if args.guidance_scale is not None:
        raise InputError(f"--guidance_scale {args.guidance_scale}: {args.pretrained_model_name_or_path} is a "
                         f"{class_name}, whose transformer has no guidance embedding (only guidance-distilled models "
                         "such as FLUX.1-dev have one); drop --guidance_scale.")
    return None


def lora_targets(args: argparse.Namespace, denoiser: torch.nn.Module,
                 default: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """``--lora_layers`` resolved (:func:`~.lora_presets.resolve_lora_layers`): the target modules and the card's
    label; a list or preset that names nothing is an ``InputError``."""
    try:
        return resolve_lora_layers(args.lora_layers, denoiser, default)
    except ValueError as error:
        raise InputError(f"{error}.") from error


class FlowTask(ModelTask):
    """SD3 / Flux: the transformer trained with LoRA on the flow-matching objective."""

    denoiser_name = "transformer"
    script = "train_lora_flow.py"
    pipelines = PIPELINES
    other_script_hint = "SD 1.x / 2.x / SDXL UNets: use train_lora_unet.py (--objective flow trains them as flows)."

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        pipe, class_name = self.pipe, self.class_name
        self.is_flux = type(self.denoiser).__name__ == "FluxTransformer2DModel"  # FLUX.1 and FLUX.1 Kontext
        # the CLIP encoders take LoRA with --train_text_encoder (T5 stays frozen, as in diffusers' scripts)
        clips = ["text_encoder"] if self.is_flux else ["text_encoder", "text_encoder_2"]
        self.trainable_text_encoders = {name: getattr(pipe, name) for name in clips}
        self.cond_keys = ("prompt_embeds", "pooled_projections")
        self.max_sequence_length = args.max_sequence_length or (512 if self.is_flux else 77)
        self.guidance = guidance_value(args, self.denoiser.config.get("guidance_embeds", False), class_name)
        self.lora_layers, self.lora_layers_label = lora_targets(args, self.denoiser, self.default_lora_layers())

    def default_lora_layers(self) -> tuple[str, ...]:
        """``--lora_layers``' default for this family (diffusers' training example's choice)."""
        return DEFAULT_LORA_LAYERS[self.class_name]

    def build_objective(self, args: argparse.Namespace) -> FlowMatchingObjective:
        return flow_objective(args, self.scheduler_config)

    def add_adapters(self, args: argparse.Namespace) -> None:
        try:
            add_lora(self.denoiser, args.rank, args.lora_alpha, self.lora_layers, adapter=args.adapter)
        except ValueError as error:
            raise InputError(f"--lora_layers {self.lora_layers_label}: {error} Name modules of the "
                             f"{type(self.denoiser).__name__} (e.g. attn.to_q,attn.to_k) or a preset "
                             f"({', '.join(PRESETS)}).") from error

    def encode_prompts(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        if self.is_flux:
            embeds, pooled, _text_ids = self.pipe.encode_prompt(
                captions, prompt_2=None, device=device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length)
        else:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                captions, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def predictor(self, model, batch: dict[str, Any], weight_dtype: torch.dtype, path: str) -> Predict:
        if path != "flow":
            raise ValueError(f"{type(self.denoiser).__name__} is a flow model; it trains on the 'flow' path only, "
                             f"not {path!r}")
        return lambda noisy, s, cond: self.predict(model, noisy, s, cond, weight_dtype)

    def predict(self, model, noisy: torch.Tensor, s: torch.Tensor, cond: dict[str, torch.Tensor],
                 weight_dtype: torch.dtype, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's velocity for latents ``noisy`` ``[B, C, h, w]`` at flow times ``s`` ``[B]``.
        ``reference`` (FLUX.1 Kontext): latents of reference images, packed after the noisy tokens with their own
        position ids (first id 1, as ``FluxKontextPipeline.prepare_latents``); the output keeps the noisy tokens."""
        device = noisy.device
        embeds = cond["prompt_embeds"].to(device, weight_dtype)
        pooled = cond["pooled_projections"].to(device, weight_dtype)
        if not self.is_flux:
            return model(hidden_states=noisy.to(weight_dtype), timestep=(1000 * s).to(device, torch.float32),
                         encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        tokens, img_ids = self.image_tokens(noisy.to(weight_dtype), 0)
        num_noisy = tokens.shape[1]
        if reference is not None:
            ref_tokens, ref_ids = self.image_tokens(reference.to(device, weight_dtype), 1)
            tokens, img_ids = torch.cat([tokens, ref_tokens], dim=1), torch.cat([img_ids, ref_ids], dim=0)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=weight_dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((len(noisy),), float(self.guidance), device=device, dtype=torch.float32)
        out = model(hidden_states=tokens, timestep=s.to(device, torch.float32), guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                    return_dict=False)[0]
        return self.unpack(out[:, :num_noisy], noisy.shape)

    def image_tokens(self, latents: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX.1's 2x2-packed tokens of ``latents`` ``[B, C, h, w]`` and their position ids ``[h/2 * w/2, 3]``
        (``(index, row, column)``: 0 for the generated image, 1 for a Kontext reference)."""
        b, c, h, w = latents.shape
        packed = self.pipeline_class._pack_latents(latents, b, c, h, w)
        ids = self.pipeline_class._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        ids[..., 0] = index
        return packed, ids

    def unpack(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Packed tokens back to latents of ``shape`` ``[B, C, h, w]``."""
        scale = self.pipe.vae_scale_factor
        return self.pipeline_class._unpack_latents(tokens, shape[2] * scale, shape[3] * scale, scale)

    def sampling_scheduler(self):
        from ...schedulers import ZTSNRFlowMatchScheduler

        return ZTSNRFlowMatchScheduler.from_config(self.scheduler_config)

    def validation_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_sequence_length": self.max_sequence_length}
        if self.guidance is not None:
            kwargs["guidance_scale"] = self.guidance
        return kwargs

    def save_lora(self, output_dir: Path, states, args) -> dict[str, Path]:
        alpha, family = args.lora_alpha or args.rank, self.family
        lora = save_diffusers_lora(self.pipeline_class, output_dir, states, "flow_prediction", False,
                                   lora_alpha=alpha, family=family)
        if is_dora(states):
            return {"lora": lora}  # no kohya copy: see card.kohya_note
        kohya = save_kohya_lora(output_dir / "lora_kohya.safetensors", states, alpha, "flow_prediction", False,
                                family=family, denoiser_config=dict(self.denoiser.config),
                                base_model=args.pretrained_model_name_or_path)
        return {"lora": lora, "kohya": kohya}

    def model_card(self, args: argparse.Namespace, steps: int, grid_name: str | None) -> str:
        run = RunFacts.from_args(args, self.script, self.pipeline_class.__name__, steps, grid_name)
        return render_flow_card(run, weighting_scheme=args.weighting_scheme, timestep_shift=args.timestep_shift,
                                precondition_outputs=bool(args.precondition_outputs),
                                lora_layers=(self.lora_layers_label,),
                                guidance_scale=self.guidance, family=self.family,
                                max_sequence_length=self.snippet_sequence_length())

    def snippet_sequence_length(self) -> int | None:
        """The run's ``max_sequence_length`` where the pipeline's ``__call__`` takes one with another default, else
        None. Prompts are encoded padded (or cut) to that many tokens, and the LoRA learnt that conditioning (FLUX.2
        and SD3 attend to every pad token): the card samples at the length trained and validated at."""
        parameter = inspect.signature(self.pipeline_class.__call__).parameters.get("max_sequence_length")
        if parameter is None or parameter.default == self.max_sequence_length:
            return None
        return self.max_sequence_length
