"""LoRA fine-tuning of flow transformers (SD3: ``SD3Transformer2DModel``, Flux: ``FluxTransformer2DModel``).

Flow-matching conventions (diffusers'): ``x_s = (1 - s) * x0 + s * eps`` with ``s = 1`` pure noise, model time
``1000 * s`` (Flux's transformer takes ``s`` itself and multiplies by 1000 inside), target the velocity
``eps - x0``. The rectified-flow papers write the reverse (``t = 0`` noise, ``u = x1 - eps``): there ``t = 1 - s``
and ``u = -(eps - x0)``; :func:`diffusers_ztsnr.schedule.flow_sigma_from_rectified_flow_time` and
:func:`~diffusers_ztsnr.schedule.flow_velocity_from_rectified_flow_velocity` convert.

Per step: ``s`` from :func:`~diffusers_ztsnr.training.objectives.sample_flow_sigmas` (``--weighting_scheme``
logit_normal / mode / uniform, then ``--timestep_shift``: the base scheduler's static shift or Flux's
resolution-dependent ``mu``), the loss from :func:`~diffusers_ztsnr.training.objectives.flow_matching_loss`
(``--precondition_outputs`` regresses ``x0`` instead), weighted by ``--weighting_scheme`` sigma_sqrt / cosmap.
The loop (data, caching, checkpoints, DDP, EMA, output) is :mod:`diffusers_ztsnr.training.loop`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..schedule import flow_mu
from . import objectives
from .card import RunFacts, render_flow_card
from .config import (
    InputError,
    UsageError,
    add_common_arguments,
    add_flow_objective_arguments,
    check_common_args,
    check_flow_objective_arguments,
    make_parser,
    parse_with_config,
    raise_problems,
)
from .loop import ModelTask
from .loop import train as run_training
from .lora import add_lora, save_diffusers_lora, save_kohya_lora

PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
# attention (and for Flux the feed-forward) projections: the defaults of diffusers' SD3 / Flux LoRA scripts
DEFAULT_LORA_LAYERS = {
    "StableDiffusion3Pipeline": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                 "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"),
    "FluxPipeline": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"),
}
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance, diffusers' Flux script default


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    add_flow_objective_arguments(parser)
    a = parser.add_argument
    a("--timestep_shift", type=str, default="auto",
      help="shift of the training times: 'auto' (what the base scheduler does at sampling: SD3's static shift, "
           "Flux's resolution-dependent mu), 'dynamic' (Flux's mu from each batch's token count), or a number "
           "(static shift; 1 = none).")
    a("--guidance_scale", type=float, default=None,
      help=f"guidance value fed to a guidance-distilled transformer (Flux dev) while training and validating "
           f"(default {DEFAULT_GUIDANCE}); an error for models without a guidance embedding.")
    a("--lora_layers", type=str, default=None,
      help="comma-separated module names to put LoRA on (default: diffusers' SD3 / Flux script choice).")
    a("--max_sequence_length", type=int, default=None,
      help="T5 prompt length in tokens (default: 77 for SD3, 512 for Flux, as diffusers' scripts).")
    return parser


def parse_shift(value: str) -> float | str:
    """``--timestep_shift``: 'auto', 'dynamic', or a finite number > 0."""
    if value in ("auto", "dynamic"):
        return value
    try:
        shift = float(value)
    except ValueError:
        shift = float("nan")
    if not (shift > 0 and shift != float("inf")):
        raise UsageError(f"error: --timestep_shift must be 'auto', 'dynamic' or a number > 0 (got {value!r}).")
    return shift


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), argv)
    problems = check_common_args(args)
    if args.resolution % 16:
        problems.append(f"--resolution must be a multiple of 16 for flow transformers (VAE factor 8 x patch 2), got "
                        f"{args.resolution}")
    problems += check_flow_objective_arguments(args)
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        problems.append(f"--max_sequence_length must be >= 1 (got {args.max_sequence_length})")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        problems.append(f"--guidance_scale must be >= 0 (got {args.guidance_scale})")
    raise_problems(problems)
    args.timestep_shift = parse_shift(str(args.timestep_shift))
    return args


class FlowTask(ModelTask):
    """SD3 / Flux: the transformer trained with LoRA on the flow-matching objective."""

    denoiser_name = "transformer"
    script = "train_lora_flow.py"
    pipelines = PIPELINES
    other_script_hint = "SD 1.x / 2.x / SDXL UNets: use train_lora_unet.py (--objective flow trains them as flows)."

    def __init__(self, args: argparse.Namespace):
        class_name = self.load_pipeline(args)
        pipe = self.pipe
        self.is_flux = class_name == "FluxPipeline"
        self.denoiser, self.vae = pipe.transformer, pipe.vae
        self.text_encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2,
                                          getattr(pipe, "text_encoder_3", None)) if m is not None]
        # the CLIP encoders take LoRA with --train_text_encoder (T5 stays frozen, as in diffusers' scripts)
        clips = ["text_encoder"] if self.is_flux else ["text_encoder", "text_encoder_2"]
        self.trainable_text_encoders = {name: getattr(pipe, name) for name in clips}
        self.cond_keys = ("prompt_embeds", "pooled_projections")
        self.scheduler_config = dict(pipe.scheduler.config)
        self.max_sequence_length = args.max_sequence_length or (512 if self.is_flux else 77)
        self.guidance = None
        if self.denoiser.config.get("guidance_embeds", False):
            self.guidance = DEFAULT_GUIDANCE if args.guidance_scale is None else args.guidance_scale
        elif args.guidance_scale is not None:
            raise InputError(f"--guidance_scale {args.guidance_scale}: {args.pretrained_model_name_or_path}'s "
                             "transformer has no guidance embedding (only guidance-distilled models such as "
                             "FLUX.1-dev do); drop --guidance_scale.")
        self.lora_layers = (tuple(x.strip() for x in args.lora_layers.split(",") if x.strip()) if args.lora_layers
                            else DEFAULT_LORA_LAYERS[class_name])

    # --- time sampling ---------------------------------------------------------------------------------

    def shift_for(self, latents: torch.Tensor) -> tuple[float, float | None]:
        """``(static shift, mu)`` for a batch of latents under ``--timestep_shift``."""
        shift = self.args.timestep_shift
        config = self.scheduler_config
        if shift == "auto":
            shift = "dynamic" if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))
        if shift == "dynamic":
            tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)  # 2x2 patches, SD3 and Flux alike
            mu = flow_mu(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
            return 1.0, mu
        return float(shift), None

    # --- the task --------------------------------------------------------------------------------------

    def add_adapters(self, args: argparse.Namespace) -> None:
        try:
            add_lora(self.denoiser, args.rank, args.lora_alpha, self.lora_layers)
        except ValueError as error:
            raise InputError(f"--lora_layers {','.join(self.lora_layers)}: {error} Name modules of the "
                             f"{type(self.denoiser).__name__} (e.g. attn.to_q,attn.to_k).") from error

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

    def predict(self, model, noisy: torch.Tensor, s: torch.Tensor, cond: dict[str, torch.Tensor],
                weight_dtype: torch.dtype) -> torch.Tensor:
        """The transformer's velocity for latents ``noisy`` ``[B, C, h, w]`` at flow times ``s`` ``[B]``."""
        device = noisy.device
        embeds = cond["prompt_embeds"].to(device, weight_dtype)
        pooled = cond["pooled_projections"].to(device, weight_dtype)
        if not self.is_flux:
            return model(hidden_states=noisy.to(weight_dtype), timestep=(1000 * s).to(device, torch.float32),
                         encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        b, c, h, w = noisy.shape
        packed = self.pipeline_class._pack_latents(noisy.to(weight_dtype), b, c, h, w)
        img_ids = self.pipeline_class._prepare_latent_image_ids(b, h // 2, w // 2, device, weight_dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=weight_dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), float(self.guidance), device=device, dtype=torch.float32)
        out = model(hidden_states=packed, timestep=s.to(device, torch.float32), guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                    return_dict=False)[0]
        scale = self.pipe.vae_scale_factor
        return self.pipeline_class._unpack_latents(out, h * scale, w * scale, scale)

    def loss(self, model, latents, cond, batch, generator, weight_dtype) -> torch.Tensor:
        args, device = self.args, latents.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        shift, mu = self.shift_for(latents)
        s = objectives.sample_flow_sigmas(len(latents), generator, args.weighting_scheme, args.logit_mean,
                                          args.logit_std, args.mode_scale, shift=shift, mu=mu)
        noisy = objectives.noisy_latents(latents, noise, 1 - s, s)
        velocity = self.predict(model, noisy, s, cond, weight_dtype)
        weights = objectives.flow_loss_weights(s, args.weighting_scheme).to(device)
        return objectives.flow_matching_loss(velocity, "flow_prediction", noisy, latents, noise, 1 - s, s, weights,
                                             bool(args.precondition_outputs))

    def sampling_scheduler(self):
        from ..schedulers import ZTSNRFlowMatchScheduler

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
        kohya = save_kohya_lora(output_dir / "lora_kohya.safetensors", states, alpha, "flow_prediction", False,
                                family=family, denoiser_config=dict(self.denoiser.config),
                                base_model=args.pretrained_model_name_or_path)
        return {"lora": lora, "kohya": kohya}

    def model_card(self, args: argparse.Namespace, steps: int, grid_name: str | None) -> str:
        run = RunFacts.from_args(args, self.script, self.pipeline_class.__name__, steps, grid_name)
        return render_flow_card(run, weighting_scheme=args.weighting_scheme, timestep_shift=args.timestep_shift,
                                precondition_outputs=bool(args.precondition_outputs), lora_layers=self.lora_layers,
                                guidance_scale=self.guidance, family=self.family)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by ``args`` (see :func:`parse_args`); returns paths and final numbers."""
    return run_training(args, FlowTask)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))
