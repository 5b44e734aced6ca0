"""The model family's side of the shared training loop: :class:`ModelTask`.

A task knows its model: how to load the base pipeline, encode captions and images, call the denoiser on a batch
(:meth:`ModelTask.predictor`, adapted to the path the objective trains on), where LoRA goes, which scheduler the
output ships and how the LoRA files are written. What the loss is belongs to the objective
(:mod:`diffusers_ztsnr.training.objectives`); :meth:`ModelTask.build_objective` only picks it from the flags.
A new family is one new module under :mod:`diffusers_ztsnr.training.families`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .objectives import DiffusionObjective, FlowMatchingObjective, Predict

Objective = DiffusionObjective | FlowMatchingObjective
#: the pipelines' text-encoder components, in the order the loop freezes and places them
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


class ModelTask:
    """One model family's side of the shared loop. ``__init__`` loads the pipeline and sets ``pipe``,
    ``pipeline_class``, ``class_name``, ``denoiser``, ``vae``, ``text_encoders`` and ``scheduler_config``; a subclass
    adds ``trainable_text_encoders`` and ``cond_keys`` and whatever its model needs.

    Attributes: ``pipeline_class``, ``pipe`` (the loaded base pipeline), ``denoiser`` (the module LoRA is
    trained on: UNet or transformer), ``denoiser_name`` (its pipeline component name), ``vae``,
    ``text_encoders`` (all of them, frozen), ``trainable_text_encoders`` (``{component name: module}`` that
    ``--train_text_encoder`` adds LoRA to), ``script`` (the entry point's file name, for messages and cards).
    """

    pipeline_class: type
    pipe: Any
    denoiser: torch.nn.Module
    denoiser_name: str
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    trainable_text_encoders: dict[str, torch.nn.Module]
    script: str
    #: the base pipeline classes the task trains, and where a user of another family is sent
    pipelines: tuple[str, ...] = ()
    other_script_hint: str = ""
    #: the names of :meth:`encode_prompts`' outputs (what the encodings cache stores beside ``latents``)
    cond_keys: tuple[str, ...] = ()
    text_encoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def __init__(self, args: argparse.Namespace):
        """Load the base pipeline and pick out its denoiser, VAE, text encoders and scheduler config."""
        self.class_name = self.load_pipeline(args)
        pipe = self.pipe
        self.denoiser, self.vae = getattr(pipe, self.denoiser_name), pipe.vae
        self.text_encoders = [m for m in (getattr(pipe, name, None) for name in TEXT_ENCODER_NAMES) if m is not None]
        self.scheduler_config = dict(pipe.scheduler.config)

    def load_pipeline(self, args: argparse.Namespace, allowed: tuple[str, ...] | None = None,
                      hint: str | None = None) -> str:
        """Load the base pipeline into ``self.pipe`` / ``self.pipeline_class`` if its class is one of ``allowed``
        (default ``pipelines``; else an ``InputError`` ending with ``hint``, the script to use instead); returns the
        class name."""
        import diffusers

        from .inputs import check_pipeline_class, load_base_pipeline

        class_name = check_pipeline_class(args, allowed or self.pipelines, self.script,
                                          self.other_script_hint if hint is None else hint)
        self.pipeline_class = getattr(diffusers, class_name)
        self.pipe = load_base_pipeline(args, class_name)
        return class_name

    @property
    def family(self) -> str:
        """``sd1`` / ``sd2`` / ``sdxl`` / ``sd3`` / ``flux``: the naming and metadata conventions of the files the
        LoRA ships in."""
        from ..lora_keys import model_family

        return model_family(self.pipeline_class.__name__, self.denoiser.config)

    def add_adapters(self, args: argparse.Namespace) -> None:
        raise NotImplementedError

    def encode_prompts(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE mean latent, shifted and scaled (the mean, not a sample: deterministic and cacheable)."""
        latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def predictor(self, model: torch.nn.Module, batch: dict[str, Any], weight_dtype: torch.dtype,
                  path: str) -> Predict:
        """``predict(noisy, time, conditioning)`` for one batch: ``model`` (the possibly DDP-wrapped denoiser) on
        the noise ``path`` an objective trains (``"vp"``: integer timesteps, the model's own prediction type;
        ``"flow"``: flow times ``s`` in [0, 1], the velocity ``eps - x0``). ``batch`` supplies per-image
        conditioning beyond the captions (SDXL's sizes)."""
        raise NotImplementedError

    def build_objective(self, args: argparse.Namespace) -> Objective:
        """The training objective the flags ask for, on this model's schedule."""
        raise NotImplementedError

    def sampling_scheduler(self):
        """This package's scheduler configured for the trained model (what the output folder ships)."""
        raise NotImplementedError

    def validation_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        return {}

    def save_lora(self, output_dir: Path, states: dict[str, dict[str, torch.Tensor]],
                  args: argparse.Namespace) -> dict[str, Path]:
        """Write the diffusers-format LoRA (and the kohya export); ``states`` maps component names to peft
        state dicts. Returns the written paths."""
        raise NotImplementedError

    def model_card(self, args: argparse.Namespace, steps: int, grid_name: str | None) -> str:
        raise NotImplementedError

    def cache_key(self, args: argparse.Namespace, weight_dtype: torch.dtype) -> dict[str, Any]:
        return {"model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
                "vae_dtype": str(self.vae.dtype), "text_dtype": str(weight_dtype)}
