"""SD 1.x / 2.x / SDXL: the UNet trained with LoRA, on the VP objective or as a rectified flow.

On the VP path the UNet is called at integer timesteps and outputs its ``prediction_type``. For the flow objective
it is wrapped by :meth:`diffusers_ztsnr.adapters.PathTransformedModel.vp_as_flow`: flow time ``s`` maps to the VP
timestep of equal SNR and the output converts to the velocity ``eps - x0`` (the same wrapper that lets a flow
sampler drive it afterwards); the UNet keeps its VP timestep conditioning.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from ...adapters import PathTransformedModel
from ...schedule import VPSchedule
from ..card import RunFacts, render_unet_card
from ..config import InputError
from ..lora import DEFAULT_UNET_TARGETS, add_lora, is_dora, save_diffusers_lora, save_kohya_lora
from ..lycoris import ALGORITHMS, LYCORIS_FILE, save_lycoris
from ..objectives import DiffusionObjective, FlowMatchingObjective, Predict, check_objective_config
from ..task import TEXT_ENCODER_NAMES, ModelTask

logger = logging.getLogger(__name__)


def trained_prediction_type(args: argparse.Namespace, scheduler_config: dict[str, Any]) -> str:
    """``--prediction_type``, else the base scheduler's (``v_prediction`` under ``--objective flow``), checked
    against the other objective flags."""
    default = "v_prediction" if args.objective == "flow" else scheduler_config.get("prediction_type", "epsilon")
    prediction_type = args.prediction_type or default
    check_objective_config(prediction_type, args.zero_terminal_snr, args.noise_offset, args.input_perturbation,
                           args.snr_gamma)
    return prediction_type


def unet_objective(args: argparse.Namespace, scheduler_config: dict[str, Any]
                   ) -> DiffusionObjective | FlowMatchingObjective:
    """``--objective diffusion``: the VP loss of the trained prediction type on the base schedule (its ZTSNR
    rescale under ``--zero_terminal_snr``); ``--objective flow``: flow matching, times clamped at the schedule's
    cleanest flow time."""
    schedule = VPSchedule.from_scheduler_config(scheduler_config, args.zero_terminal_snr)
    prediction_type = trained_prediction_type(args, scheduler_config)
    if args.objective == "flow":
        alpha_0, sigma_0 = (float(v) for v in schedule.alpha_sigma(torch.zeros(1, dtype=torch.float64)))
        return FlowMatchingObjective(
            args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, shift=args.timestep_shift,
            min_time=sigma_0 / (alpha_0 + sigma_0), precondition_outputs=bool(args.precondition_outputs),
            noise_offset=args.noise_offset, input_perturbation=args.input_perturbation)
    return DiffusionObjective(schedule, prediction_type, timestep_shift=args.timestep_shift,
                              noise_offset=args.noise_offset, input_perturbation=args.input_perturbation,
                              snr_gamma=args.snr_gamma, debiased_estimation=args.debiased_estimation)


class UNetTask(ModelTask):
    """SD 1.x / 2.x / SDXL: the UNet trained with LoRA, on the VP objective or as a rectified flow."""

    denoiser_name = "unet"
    script = "train_lora_unet.py"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    other_script_hint = "Flow transformers (SD3, Flux): use train_lora_flow.py."

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.is_sdxl = self.class_name == "StableDiffusionXLPipeline"
        self.trainable_text_encoders = dict(zip(TEXT_ENCODER_NAMES, self.text_encoders, strict=False))
        self.cond_keys = ("encoder_hidden_states", "text_embeds") if self.is_sdxl else ("encoder_hidden_states",)
        self.base_prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        self.prediction_type = trained_prediction_type(args, self.scheduler_config)
        self.zero_terminal_snr = bool(args.zero_terminal_snr)
        self.schedule = VPSchedule.from_scheduler_config(self.scheduler_config, args.zero_terminal_snr)

    def build_objective(self, args: argparse.Namespace) -> DiffusionObjective | FlowMatchingObjective:
        return unet_objective(args, self.scheduler_config)

    def add_adapters(self, args: argparse.Namespace) -> None:
        targets = tuple(x.strip() for x in (args.lora_layers or "").split(",") if x.strip()) or DEFAULT_UNET_TARGETS
        try:
            add_lora(self.denoiser, args.rank, args.lora_alpha, targets, adapter=args.adapter)
            if args.adapter in ALGORITHMS:
                logger.warning("--adapter %s: diffusers' load_lora_weights cannot load it; the run writes %s for "
                               "ComfyUI and A1111 / Forge", args.adapter, LYCORIS_FILE)
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

    def predictor(self, model, batch: dict[str, Any], weight_dtype: torch.dtype, path: str) -> Predict:
        def predict(noisy: torch.Tensor, time: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            kwargs = self._unet_kwargs(noisy, cond, batch, weight_dtype)
            if path == "vp":
                return model(noisy.to(weight_dtype), time, **kwargs).sample
            flow_model = PathTransformedModel.vp_as_flow(model, self.schedule, self.prediction_type)
            return flow_model(noisy.to(weight_dtype), (1000 * time).to(noisy.device), **kwargs).sample

        if path not in ("vp", "flow"):
            raise ValueError(f"a UNet trains on the 'vp' or 'flow' path, not {path!r}")
        return predict

    def _unet_kwargs(self, latents, cond, batch, weight_dtype) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["encoder_hidden_states"].to(weight_dtype)}
        if self.is_sdxl:
            target_size = tuple(int(v) * 8 for v in latents.shape[-2:])  # the (bucket) size trained
            time_ids = sdxl_time_ids(batch["original_size"].tolist(), batch["crop_top_left"].tolist(),
                                     target_size, latents.device, weight_dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(weight_dtype), "time_ids": time_ids}
        return kwargs

    def sampling_scheduler(self):
        """Our recommended scheduler configured for the trained model (what the output folder ships)."""
        from ...schedulers import ZTSNRUniPCMultistepScheduler

        return ZTSNRUniPCMultistepScheduler.from_config(
            self.scheduler_config, prediction_type=self.prediction_type,
            rescale_betas_zero_snr=self.zero_terminal_snr, timestep_spacing="logsnr_warped",
        )

    def validation_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"guidance_rescale": 0.7 if self.zero_terminal_snr else 0.0}

    def save_lora(self, output_dir: Path, states, args) -> dict[str, Path]:
        alpha, family = args.lora_alpha or args.rank, self.family
        if args.adapter in ALGORITHMS:  # diffusers reads no LoKr / LoHa: LyCORIS' format only
            return {"lycoris": save_lycoris(output_dir / LYCORIS_FILE, states, args.adapter, alpha, args.rank,
                                            self.prediction_type, self.zero_terminal_snr, family=family,
                                            denoiser_config=dict(self.denoiser.config),
                                            base_model=args.pretrained_model_name_or_path)}
        lora = save_diffusers_lora(self.pipeline_class, output_dir, states, self.prediction_type,
                                   self.zero_terminal_snr, lora_alpha=alpha, family=family)
        if is_dora(states):
            return {"lora": lora}  # no kohya copy: see card.kohya_note
        kohya = save_kohya_lora(output_dir / "lora_kohya.safetensors", states, alpha, self.prediction_type,
                                self.zero_terminal_snr, family=family, denoiser_config=dict(self.denoiser.config),
                                base_model=args.pretrained_model_name_or_path)
        return {"lora": lora, "kohya": kohya}

    def model_card(self, args: argparse.Namespace, steps: int, grid_name: str | None) -> str:
        run = RunFacts.from_args(args, self.script, self.pipeline_class.__name__, steps, grid_name)
        return render_unet_card(
            run, base_prediction_type=self.base_prediction_type, prediction_type=self.prediction_type,
            zero_terminal_snr=self.zero_terminal_snr, snr_gamma=args.snr_gamma,
            flow_weighting=args.weighting_scheme if args.objective == "flow" else None,
            flow_shift=args.timestep_shift, guidance_rescale=self.validation_kwargs(args)["guidance_rescale"],
            family=self.family)


def sdxl_time_ids(original_size, crop_top_left, target_size, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, §2.2): original size, crop corner, target size."""
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_size, crop_top_left, strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)
