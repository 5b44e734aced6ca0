"""LoRA fine-tuning of SD-style UNets (SD 1.x, SD 2.x, SDXL) with accelerate, peft and datasets.

The headline recipe is converting an epsilon base model into a v-prediction model on the zero-terminal-SNR
rescale of its schedule (Lin et al. 2023): ``--prediction_type v_prediction --zero_terminal_snr``. Targets,
weights and timesteps come from :mod:`diffusers_ztsnr.training.objectives` on the schedule actually
trained; validation images are sampled with this package's scheduler under that schedule.

``--objective flow`` trains the same UNet as a rectified flow: flow times ``s`` are drawn as in SD3
(``--weighting_scheme``), mapped to the VP timestep of equal SNR, and the UNet's output (in ``--prediction_type``)
is converted to the velocity ``eps - x0`` through :class:`diffusers_ztsnr.adapters.VPModelAsFlow`, the same
wrapper that lets a flow sampler drive it afterwards. The UNet keeps its VP timestep conditioning.

The loop itself (data, caching, checkpoints, DDP, EMA, output) is :mod:`diffusers_ztsnr.training.loop`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..adapters import VPModelAsFlow
from ..schedule import VPSchedule
from . import objectives
from .card import RunFacts, render_unet_card
from .config import (
    FLOW_OBJECTIVE_FLAGS,
    InputError,
    add_common_arguments,
    add_flow_objective_arguments,
    add_vp_objective_arguments,
    check_common_args,
    check_flow_objective_arguments,
    make_parser,
    parse_with_config,
    raise_problems,
)
from .loop import ModelTask
from .loop import train as run_training
from .lora import DEFAULT_UNET_TARGETS, add_lora, save_diffusers_lora, save_kohya_lora

OBJECTIVES = ("diffusion", "flow")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    add_vp_objective_arguments(parser)
    parser.add_argument("--objective", type=str, default="diffusion", choices=OBJECTIVES,
                        help="diffusion: the VP loss of --prediction_type; flow: rectified-flow matching through the "
                             "equal-SNR mapping (needs --zero_terminal_snr).")
    add_flow_objective_arguments(parser)
    parser.add_argument("--lora_layers", type=str, default=None,
                        help="comma-separated module names (or dotted name suffixes) to put LoRA on; Linear and Conv2d "
                             f"layers (default: {','.join(DEFAULT_UNET_TARGETS)}, diffusers' LoRA example).")
    parser.add_argument("--export_checkpoint", type=str, default=None,
                        help="also write the LoRA merged into the base as one single-file checkpoint in the original "
                             "layout, with the v_pred / ztsnr keys ComfyUI and A1111 read (a path; relative ones lie "
                             "in --output_dir), e.g. merged.safetensors.")
    parser.add_argument("--export_dtype", type=str, default="fp16", choices=("fp16", "bf16", "fp32"),
                        help="dtype of --export_checkpoint.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_config(parser, argv)
    problems = check_common_args(args)
    if args.objective == "flow":
        problems += check_flow_objective_arguments(args)
        if not args.zero_terminal_snr:
            problems.append("--objective flow starts its paths at pure noise (s = 1), which only a zero-terminal-SNR "
                            "schedule reaches: add --zero_terminal_snr")
        if args.snr_gamma or args.debiased_estimation:
            problems.append("--snr_gamma / --debiased_estimation weight the diffusion objective; with --objective flow "
                            "use --weighting_scheme (none, sigma_sqrt, cosmap, logit_normal, mode)")
    else:
        changed = [f"--{k}" for k in FLOW_OBJECTIVE_FLAGS if getattr(args, k) != parser.get_default(k)]
        if changed:
            problems.append(f"{', '.join(changed)} apply to the flow-matching objective: add --objective flow, or drop "
                            "them")
    raise_problems(problems)
    return args


# --- the task -------------------------------------------------------------------------------------------


class UNetTask(ModelTask):
    """SD 1.x / 2.x / SDXL: the UNet trained with LoRA, on the VP objective or as a rectified flow."""

    denoiser_name = "unet"
    script = "train_lora_unet.py"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    other_script_hint = "Flow transformers (SD3, Flux): use train_lora_flow.py."

    def __init__(self, args: argparse.Namespace):
        class_name = self.load_pipeline(args)
        pipe = self.pipe
        self.is_sdxl = class_name == "StableDiffusionXLPipeline"
        self.denoiser, self.vae = pipe.unet, pipe.vae
        self.text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        names = ["text_encoder", "text_encoder_2"]
        self.trainable_text_encoders = dict(zip(names, self.text_encoders, strict=False))
        self.cond_keys = ("encoder_hidden_states", "text_embeds") if self.is_sdxl else ("encoder_hidden_states",)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.base_prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        default = "v_prediction" if args.objective == "flow" else self.base_prediction_type
        self.prediction_type = args.prediction_type or default
        objectives.check_objective_config(self.prediction_type, args.zero_terminal_snr, args.noise_offset,
                                          args.input_perturbation, args.snr_gamma)
        self.schedule = VPSchedule.from_scheduler_config(self.scheduler_config, args.zero_terminal_snr)
        t = torch.arange(self.schedule.num_train_timesteps, dtype=torch.float64)
        self.alphas, self.sigmas = self.schedule.alpha_sigma(t)
        self.snrs = self.schedule.snr(t)
        if args.objective == "flow":
            alpha_0, sigma_0 = float(self.alphas[0]), float(self.sigmas[0])
            self.flow_s_min = sigma_0 / (alpha_0 + sigma_0)  # the cleanest flow time the VP schedule has

    def add_adapters(self, args: argparse.Namespace) -> None:
        targets = tuple(x.strip() for x in (args.lora_layers or "").split(",") if x.strip()) or DEFAULT_UNET_TARGETS
        try:
            add_lora(self.denoiser, args.rank, args.lora_alpha, targets)
        except ValueError as error:
            raise InputError(f"--lora_layers {','.join(targets)}: {error} Name modules of the UNet (e.g. "
                             "to_q,to_k,to_v,to_out.0 or conv1,conv2).") from error

    def encode_prompts(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        """Text conditioning through the pipeline's own ``encode_prompt`` (gradients flow when trained)."""
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        embeds, _ = self.pipe.encode_prompt(captions, device, 1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def _unet_kwargs(self, latents, cond, batch, weight_dtype) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["encoder_hidden_states"].to(weight_dtype)}
        if self.is_sdxl:
            target_size = tuple(int(v) * 8 for v in latents.shape[-2:])  # the (bucket) size trained
            time_ids = sdxl_time_ids(batch["original_size"].tolist(), batch["crop_top_left"].tolist(),
                                     target_size, latents.device, weight_dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(weight_dtype), "time_ids": time_ids}
        return kwargs

    def loss(self, model, latents, cond, batch, generator, weight_dtype) -> torch.Tensor:
        args, device = self.args, latents.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if args.noise_offset:
            noise = objectives.apply_noise_offset(noise, args.noise_offset, generator)
        model_noise = noise
        if args.input_perturbation:
            model_noise = objectives.input_perturbation_noise(noise, args.input_perturbation, generator)
        kwargs = self._unet_kwargs(latents, cond, batch, weight_dtype)
        if args.objective == "flow":
            s = objectives.sample_flow_sigmas(
                len(latents), generator, args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale,
                shift=args.timestep_shift).clamp(min=self.flow_s_min)
            x_s = objectives.noisy_latents(latents, model_noise, 1 - s, s)
            flow_model = VPModelAsFlow(model, self.schedule, self.prediction_type)
            velocity = flow_model(x_s.to(weight_dtype), (1000 * s).to(device), **kwargs).sample
            weights = objectives.flow_loss_weights(s, args.weighting_scheme).to(device)
            return objectives.flow_matching_loss(velocity, "flow_prediction", x_s, latents, noise, 1 - s, s, weights,
                                                 bool(args.precondition_outputs))
        timesteps = objectives.sample_timesteps(len(latents), self.schedule, generator=generator,
                                                timestep_shift=args.timestep_shift)
        alpha, sigma = self.alphas[timesteps], self.sigmas[timesteps]
        noisy = objectives.noisy_latents(latents, model_noise, alpha, sigma)
        target = objectives.training_target(latents, noise, alpha, sigma, self.prediction_type)
        pred = model(noisy.to(weight_dtype), timesteps.to(device), **kwargs).sample
        weights = None
        if args.snr_gamma or args.debiased_estimation:
            weights = objectives.loss_weights(self.snrs[timesteps], self.prediction_type, args.snr_gamma,
                                              args.debiased_estimation).to(device)
        return objectives.diffusion_loss(pred, target.to(device), weights)

    def sampling_scheduler(self):
        """Our recommended scheduler configured for the trained model (what the output folder ships)."""
        from ..schedulers import ZTSNRDPMSolverMultistepScheduler

        return ZTSNRDPMSolverMultistepScheduler.from_config(
            self.scheduler_config, prediction_type=self.prediction_type,
            rescale_betas_zero_snr=self.args.zero_terminal_snr, timestep_spacing="logsnr",
        )

    def validation_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"guidance_rescale": 0.7 if args.zero_terminal_snr else 0.0}

    def save_lora(self, output_dir: Path, states, args) -> dict[str, Path]:
        alpha, family = args.lora_alpha or args.rank, self.family
        lora = save_diffusers_lora(self.pipeline_class, output_dir, states, self.prediction_type,
                                   args.zero_terminal_snr, lora_alpha=alpha, family=family)
        kohya = save_kohya_lora(output_dir / "lora_kohya.safetensors", states, alpha, self.prediction_type,
                                args.zero_terminal_snr, family=family, denoiser_config=dict(self.denoiser.config),
                                base_model=args.pretrained_model_name_or_path)
        return {"lora": lora, "kohya": kohya}

    def model_card(self, args: argparse.Namespace, steps: int, grid_name: str | None) -> str:
        run = RunFacts.from_args(args, self.script, self.pipeline_class.__name__, steps, grid_name)
        return render_unet_card(
            run, base_prediction_type=self.base_prediction_type, prediction_type=self.prediction_type,
            zero_terminal_snr=args.zero_terminal_snr, snr_gamma=args.snr_gamma,
            flow_weighting=args.weighting_scheme if args.objective == "flow" else None,
            flow_shift=args.timestep_shift, guidance_rescale=self.validation_kwargs(args)["guidance_rescale"],
            family=self.family)


def sdxl_time_ids(original_size, crop_top_left, target_size, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, §2.2): original size, crop corner, target size."""
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_size, crop_top_left, strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by ``args`` (see :func:`parse_args`); returns paths and final numbers."""
    return run_training(args, UNetTask)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))
