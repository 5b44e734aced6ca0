"""LoRA fine-tuning of SD-style UNets (SD 1.x, SD 2.x, SDXL) with accelerate, peft and datasets.

The headline recipe is converting an epsilon base model into a v-prediction model on the zero-terminal-SNR
rescale of its schedule (Lin et al. 2023): ``--prediction_type v_prediction --zero_terminal_snr``. Targets,
weights and timesteps come from :mod:`diffusers_ztsnr.training.objectives` on the schedule actually
trained; validation images are sampled with this package's scheduler under that schedule.

Determinism: the data order of epoch ``e`` and the noise/timesteps of optimizer step ``s`` are functions of
``(seed, e)`` and ``(seed, s, micro-step, rank)`` only, so ``--resume_from_checkpoint latest`` continues the
exact run that an uninterrupted one would have made.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..schedule import VPSchedule
from . import objectives
from .checkpointing import checkpoint_step, resolve_resume_checkpoint, save_checkpoint
from .config import add_common_arguments, add_vp_objective_arguments, parse_with_config
from .lora import add_lora, load_lora_state_dict, lora_state_dict, save_diffusers_lora, save_kohya_lora

logger = logging.getLogger(__name__)

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# flags that may differ between a run and its resumption without making it "a different run"
RESUME_INSENSITIVE = {
    "resume_from_checkpoint", "max_train_steps", "num_train_epochs", "checkpointing_steps", "validation_steps",
    "push_to_hub", "hub_token", "hub_model_id", "overwrite_output_dir", "config", "report_to",
    "dataloader_num_workers", "checkpoints_total_limit", "num_validation_images", "validation_prompt",
    "validation_inference_steps",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    add_vp_objective_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_with_config(build_parser(), argv)
    problems = []
    if not args.pretrained_model_name_or_path:
        problems.append("--pretrained_model_name_or_path is required")
    if (args.train_data_dir is None) == (args.dataset_name is None):
        problems.append("pass exactly one of --train_data_dir and --dataset_name")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "resolution", "checkpointing_steps",
                 "validation_steps", "num_train_epochs", "validation_inference_steps"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        problems.append(f"--max_train_steps must be >= 1 (got {args.max_train_steps})")
    if args.resolution % 8:
        problems.append(f"--resolution must be a multiple of 8 (the VAE factor), got {args.resolution}")
    if args.cache_latents and args.train_text_encoder:
        problems.append("--cache_latents caches the text embeddings too, so it cannot train the text encoder: "
                        "drop --train_text_encoder or --cache_latents")
    if args.cache_latents and not args.center_crop and not args.bucketing:
        problems.append("--cache_latents freezes the random crop: add --center_crop (or drop --cache_latents)")
    if not 0 < args.ema_decay < 1:
        problems.append(f"--ema_decay must lie in (0, 1) (got {args.ema_decay})")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0 (got {args.learning_rate})")
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + ".")
    return args


# --- model ----------------------------------------------------------------------------------------


class Components:
    """The parts of a base pipeline that training uses (loaded once, by repo id or local path)."""

    def __init__(self, args: argparse.Namespace):
        import diffusers

        path = args.pretrained_model_name_or_path
        config = diffusers.DiffusionPipeline.load_config(path, revision=args.revision)
        class_name = config["_class_name"]
        if class_name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
            raise ValueError(
                f"{path} is a {class_name}; train_lora_unet.py trains StableDiffusionPipeline (SD 1.x/2.x) and "
                "StableDiffusionXLPipeline models. Flow transformers (SD3, Flux) need the flow script."
            )
        self.pipeline_class = getattr(diffusers, class_name)
        extra = {}
        if class_name == "StableDiffusionPipeline":  # training never runs the safety checker
            extra = {"safety_checker": None, "requires_safety_checker": False}
        pipe = self.pipeline_class.from_pretrained(path, revision=args.revision, variant=args.variant, **extra)
        self.is_sdxl = class_name == "StableDiffusionXLPipeline"
        self.pipe = pipe
        self.unet, self.vae = pipe.unet, pipe.vae
        self.text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        self.scheduler_config = dict(pipe.scheduler.config)
        self.base_prediction_type = self.scheduler_config.get("prediction_type", "epsilon")

    def schedule(self, zero_terminal_snr: bool) -> VPSchedule:
        c = self.scheduler_config
        return VPSchedule.from_config(
            c.get("num_train_timesteps", 1000), c.get("beta_start", 0.0001), c.get("beta_end", 0.02),
            c.get("beta_schedule", "linear"), c.get("trained_betas"), zero_terminal_snr,
        )

    def encode_prompts(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        """Text conditioning through the pipeline's own ``encode_prompt`` (gradients flow when trained)."""
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        embeds, _ = self.pipe.encode_prompt(captions, device, 1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE mean latent times the scaling factor (the mean, not a sample: deterministic and cacheable)."""
        latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor


def sdxl_time_ids(original_size, crop_top_left, target_size, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, §2.2): original size, crop corner, target size."""
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_size, crop_top_left, strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)


# --- output -----------------------------------------------------------------------------------------


def sampling_scheduler(components: Components, prediction_type: str, zero_terminal_snr: bool):
    """Our recommended scheduler configured for the trained model (what the output folder ships)."""
    from ..schedulers import ZTSNRDPMSolverMultistepScheduler

    return ZTSNRDPMSolverMultistepScheduler.from_config(
        components.scheduler_config, prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr,
        timestep_spacing="logsnr",
    )


def model_card(args: argparse.Namespace, prediction_type: str, components: Components, steps: int,
               grid_name: str | None) -> str:
    recipe = []
    if prediction_type != components.base_prediction_type:
        recipe.append(f"converted from {components.base_prediction_type} to {prediction_type}")
    if args.zero_terminal_snr:
        recipe.append("trained on the zero-terminal-SNR rescale of the base schedule (Lin et al. 2023)")
    if args.snr_gamma:
        recipe.append(f"min-SNR-gamma weighting, gamma = {args.snr_gamma}")
    recipe_text = "; ".join(recipe) or f"{prediction_type} on the base schedule"
    pipeline = components.pipeline_class.__name__
    grid = f"\n![validation samples]({grid_name})\n" if grid_name else ""
    return f"""---
base_model: {args.pretrained_model_name_or_path}
library_name: diffusers
tags:
- lora
- diffusers
- text-to-image
- diffusers-ztsnr
{"- v-prediction" if prediction_type == "v_prediction" else ""}
{"- zero-terminal-snr" if args.zero_terminal_snr else ""}
---

# LoRA for {args.pretrained_model_name_or_path}

Trained with diffusers-ztsnr's `train_lora_unet.py`: {recipe_text}.
Rank {args.rank}, {steps} optimizer steps, batch {args.train_batch_size} x {args.gradient_accumulation_steps}
accumulation, learning rate {args.learning_rate}, resolution {args.resolution}, seed {args.seed}.
{grid}
## Sampling

This LoRA was trained for **{prediction_type}**{" on a zero-terminal-SNR schedule" if args.zero_terminal_snr else ""}:
sample it with the scheduler config shipped in `scheduler/`, which sets that up.

```python
from diffusers import {pipeline}
from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler

pipe = {pipeline}.from_pretrained("{args.pretrained_model_name_or_path}")
pipe.load_lora_weights("<this repo or folder>")
pipe.scheduler = ZTSNRDPMSolverMultistepScheduler.from_pretrained("<this repo or folder>", subfolder="scheduler")
image = pipe("{args.validation_prompt or "a photo"}", guidance_rescale=0.7).images[0]
```

`lora_kohya.safetensors` is the same LoRA in the kohya / ComfyUI key format, with `v_pred` / `ztsnr` markers.
"""


def save_grid(images: list, path: Path) -> Path:
    from ..cli import image_grid

    arrays = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    image_grid(arrays, columns=min(4, len(images))).save(path)
    return path


# --- training ---------------------------------------------------------------------------------------


def _check_output_dir(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    record = output_dir / "training_args.json"
    current = {k: v for k, v in vars(args).items() if k not in RESUME_INSENSITIVE}
    if record.is_file() and not args.overwrite_output_dir:
        previous = {k: v for k, v in json.loads(record.read_text()).items() if k not in RESUME_INSENSITIVE}
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise ValueError(
                f"--output_dir {output_dir} holds a different run (flags that differ: {changed}). Use a new "
                "--output_dir, or pass --overwrite_output_dir to replace it."
            )
    if args.resume_from_checkpoint:
        resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)  # fails early with a clear message


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    # one independent stream per (optimizer step, micro-step, rank): resume-exact by construction
    mixed = (seed * 1_000_003 + step) * 1_009 + micro * 131 + rank
    return torch.Generator().manual_seed(mixed % (2**63))


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by ``args`` (see :func:`parse_args`); returns paths and final numbers."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    from .data import (
        BucketBatchSampler,
        ImageCaptionDataset,
        cache_image_encodings,
        collate_fn,
        load_image_caption_dataset,
        make_buckets,
    )

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.is_main_process:
        _check_output_dir(args)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True))
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    components = Components(args)
    prediction_type = args.prediction_type or components.base_prediction_type
    objectives.check_objective_config(prediction_type, args.zero_terminal_snr, args.noise_offset,
                                      args.input_perturbation, args.snr_gamma)
    schedule = components.schedule(args.zero_terminal_snr)
    unet, vae, text_encoders = components.unet, components.vae, components.text_encoders

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False)
    for te in text_encoders:
        te.requires_grad_(False)
    add_lora(unet, args.rank, args.lora_alpha)
    if args.train_text_encoder:
        for te in text_encoders:
            add_lora(te, args.rank, args.lora_alpha, TEXT_ENCODER_TARGETS)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    for te in text_encoders:
        te.to(accelerator.device, dtype=weight_dtype)
    trained = [unet] + (text_encoders if args.train_text_encoder else [])
    cast_training_params(trained, dtype=torch.float32)  # LoRA weights in fp32 whatever the base dtype
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    dataset = load_image_caption_dataset(
        train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, image_column=args.image_column,
        caption_column=args.caption_column, cache_dir=args.cache_dir,
    )
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    buckets = make_buckets(args.resolution, step=64 if args.resolution >= 256 else 8) if args.bucketing else None
    train_set = ImageCaptionDataset(dataset, resolution=args.resolution, center_crop=args.center_crop,
                                    random_flip=args.random_flip, image_column=args.image_column,
                                    caption_column=args.caption_column, seed=args.seed, buckets=buckets)
    image_set = train_set
    cache_stats = None
    if args.cache_latents:
        cache_dir = Path(args.cache_latents_dir or Path(args.cache_dir or "~/.cache/diffusers-ztsnr").expanduser()
                         / "encodings")
        key = {"model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
               "vae_dtype": str(vae.dtype), "text_dtype": str(weight_dtype)}

        @torch.no_grad()
        def encode(batch):
            cond = components.encode_prompts(batch["caption"], accelerator.device)
            latents = components.encode_images(batch["pixel_values"].to(accelerator.device))
            return {"latents": latents.float().cpu(), **{k: v.float().cpu() for k, v in cond.items()}}

        with accelerator.main_process_first():
            train_set = cache_image_encodings(train_set, cache_dir, key, encode, batch_size=args.train_batch_size)
        cache_stats = {"hits": train_set.cache.hits, "misses": train_set.cache.misses}
        accelerator.print(f"encodings cache in {cache_dir}: {cache_stats['hits']} hits, {cache_stats['misses']} misses")
    if buckets is not None:
        sampler = BucketBatchSampler(train_set.sizes, train_set.buckets, args.train_batch_size, seed=args.seed)
        dataloader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                                 num_workers=args.dataloader_num_workers)
    else:
        dataloader = torch.utils.data.DataLoader(
            train_set, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers, drop_last=False,
        )

    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer_class = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install 'diffusers-ztsnr[8bit]'") from error
        optimizer_class = bnb.optim.AdamW8bit
    optimizer = optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    dataloader = accelerator.prepare(dataloader)  # first: its length per process sets the step counts
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)

    # only the UNet is wrapped for DDP: the text encoders run inside the pipeline's encode_prompt (which needs
    # the bare module), so their LoRA gradients are averaged across processes by hand below
    unet_p, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    te_params = [p for te in trained[1:] for p in te.parameters() if p.requires_grad]

    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay)

    # checkpoints hold the LoRA weights (and their EMA) only, not a copy of the frozen base model
    def save_hook(models, weights, folder):
        for i, model in enumerate(trained):
            torch.save(lora_state_dict(model), Path(folder) / f"lora_{i}.pt")
        if ema is not None:
            torch.save(ema.state_dict(), Path(folder) / "ema.pt")
        weights.clear()

    def load_hook(models, folder):
        for i, model in enumerate(trained):
            load_lora_state_dict(model, torch.load(Path(folder) / f"lora_{i}.pt"))
        if ema is not None:
            ema.load_state_dict(torch.load(Path(folder) / "ema.pt", weights_only=False))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, first_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
        accelerator.print(f"resuming from {path}")
        accelerator.load_state(str(path))
        global_step = checkpoint_step(path)
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    if accelerator.is_main_process and accelerator.trackers == [] and args.report_to != "none":
        accelerator.init_trackers("diffusers-ztsnr", config={k: v for k, v in vars(args).items()
                                                             if isinstance(v, (int, float, str, bool))})
    progress = tqdm(range(max_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    alphas = schedule.alpha(torch.arange(schedule.num_train_timesteps, dtype=torch.float64))
    sigmas = schedule.sigma(torch.arange(schedule.num_train_timesteps, dtype=torch.float64))
    snrs = schedule.snr(torch.arange(schedule.num_train_timesteps, dtype=torch.float64))
    losses: list[float] = []
    micro = 0
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        if buckets is not None:
            sampler.set_epoch(epoch)  # under DDP accelerate only sets the dataset's epoch
        active = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == first_epoch else dataloader
        for batch in active:
            if global_step >= max_steps:
                break
            with accelerator.accumulate(unet_p):
                gen = _step_generator(args.seed, global_step, micro, accelerator.process_index)
                micro = (micro + 1) % args.gradient_accumulation_steps
                if "latents" in batch:  # cached encodings
                    latents = batch["latents"].to(accelerator.device)
                    cond = {k: batch[k].to(accelerator.device) for k in ("encoder_hidden_states", "text_embeds")
                            if k in batch}
                else:
                    with torch.no_grad():
                        latents = components.encode_images(batch["pixel_values"].to(accelerator.device)).float()
                    with torch.set_grad_enabled(args.train_text_encoder):
                        cond = components.encode_prompts(batch["caption"], accelerator.device)
                noise = torch.randn(latents.shape, generator=gen).to(latents.device)
                if args.noise_offset:
                    noise = objectives.apply_noise_offset(noise, args.noise_offset, gen)
                timesteps = objectives.sample_timesteps(len(latents), schedule, generator=gen,
                                                        timestep_shift=args.timestep_shift).to("cpu")
                alpha, sigma = alphas[timesteps], sigmas[timesteps]
                model_noise = noise
                if args.input_perturbation:
                    model_noise = objectives.input_perturbation_noise(noise, args.input_perturbation, gen)
                noisy = objectives.noisy_latents(latents, model_noise, alpha, sigma)
                target = objectives.training_target(latents, noise, alpha, sigma, prediction_type)
                added = None
                if components.is_sdxl:
                    target_size = tuple(int(v) * 8 for v in latents.shape[-2:])  # the (bucket) size trained
                    time_ids = sdxl_time_ids(batch["original_size"].tolist(), batch["crop_top_left"].tolist(),
                                             target_size, accelerator.device, weight_dtype)
                    added = {"text_embeds": cond["text_embeds"].to(weight_dtype), "time_ids": time_ids}
                pred = unet_p(noisy.to(weight_dtype), timesteps.to(accelerator.device),
                              encoder_hidden_states=cond["encoder_hidden_states"].to(weight_dtype),
                              added_cond_kwargs=added).sample
                weights = None
                if args.snr_gamma or args.debiased_estimation:
                    weights = objectives.loss_weights(snrs[timesteps], prediction_type, args.snr_gamma,
                                                      args.debiased_estimation).to(accelerator.device)
                loss = objectives.diffusion_loss(pred, target.to(accelerator.device), weights)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if te_params and accelerator.num_processes > 1:
                        for p in te_params:
                            if p.grad is not None:
                                torch.distributed.all_reduce(p.grad)
                                p.grad /= accelerator.num_processes
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if ema is not None:
                    ema.step(params)
                global_step += 1
                progress.update(1)
                loss_value = accelerator.gather(loss.detach()[None]).mean().item()
                losses.append(loss_value)
                lora_norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params)).item()
                accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                                 "lora_weight_norm": lora_norm}, step=global_step)
                progress.set_postfix(loss=f"{loss_value:.4f}")
                if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        save_checkpoint(output_dir, global_step, accelerator.save_state, args.checkpoints_total_limit)
                    accelerator.wait_for_everyone()
                if args.validation_prompt and global_step % args.validation_steps == 0 and global_step < max_steps:
                    validate(args, accelerator, components, prediction_type, global_step)
        skip_batches = 0
        if global_step >= max_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # what is saved (and validated below) is the averaged LoRA
    # one checksum of the trained weights per process: equal on every rank after a correct DDP run
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in params)], dtype=torch.float64,
                            device=accelerator.device)
    rank_checksums = accelerator.gather(checksum).tolist()
    result: dict[str, Any] = {"global_step": global_step, "losses": losses, "output_dir": output_dir,
                              "rank_checksums": rank_checksums, "cache": cache_stats}
    if accelerator.is_main_process:
        summary = {k: v for k, v in result.items() if k != "output_dir"}
        summary["skipped_images"] = [[str(v) for v in bad] for bad in image_set.report.bad_images]
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        result.update(finish(args, accelerator, components, prediction_type, global_step))
    accelerator.wait_for_everyone()  # no rank leaves (and tears down the process group) while rank 0 writes
    accelerator.end_training()
    return result


@torch.no_grad()
def validate(args, accelerator, components: Components, prediction_type: str, step: int) -> Path | None:
    """Sample validation images with our scheduler under the trained config; save a PNG grid, log it."""
    if not accelerator.is_main_process:
        return None
    pipe = components.pipeline_class(**{**components.pipe.components,
                                        "unet": accelerator.unwrap_model(components.unet)})
    pipe.scheduler = sampling_scheduler(components, prediction_type, args.zero_terminal_snr)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe([args.validation_prompt] * args.num_validation_images,
                  num_inference_steps=args.validation_inference_steps, height=args.resolution,
                  width=args.resolution, generator=generator,
                  guidance_rescale=0.7 if args.zero_terminal_snr else 0.0).images
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(exist_ok=True)
    path = save_grid(images, folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(im) for im in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
    return path


def finish(args, accelerator, components: Components, prediction_type: str, step: int) -> dict[str, Path]:
    """Write the output folder: diffusers LoRA, scheduler config, kohya export, model card (+ upload)."""
    output_dir = Path(args.output_dir)
    unet_state = lora_state_dict(accelerator.unwrap_model(components.unet))
    te_states = None
    if args.train_text_encoder:
        names = ["text_encoder", "text_encoder_2"]
        te_states = {names[i]: lora_state_dict(accelerator.unwrap_model(te))
                     for i, te in enumerate(components.text_encoders)}
    lora_path = save_diffusers_lora(components.pipeline_class, output_dir, unet_state, te_states)
    scheduler = sampling_scheduler(components, prediction_type, args.zero_terminal_snr)
    scheduler.save_pretrained(output_dir / "scheduler")
    kohya_path = save_kohya_lora(output_dir / "lora_kohya.safetensors", unet_state, args.lora_alpha or args.rank,
                                 prediction_type, args.zero_terminal_snr,
                                 {"text_encoder" if i == 0 else "text_encoder_2": s
                                  for i, s in enumerate((te_states or {}).values())},
                                 base_model=args.pretrained_model_name_or_path)
    grid = None
    if args.validation_prompt:
        grid = validate(args, accelerator, components, prediction_type, step)
        if grid is not None:
            shutil.copy(grid, output_dir / "samples.png")
            grid = output_dir / "samples.png"
    (output_dir / "README.md").write_text(
        model_card(args, prediction_type, components, step, grid.name if grid else None), encoding="utf-8"
    )
    paths = {"lora": lora_path, "kohya": kohya_path, "scheduler": output_dir / "scheduler",
             "card": output_dir / "README.md"}
    if grid:
        paths["grid"] = grid
    if args.push_to_hub:
        paths["hub_url"] = push_to_hub(args, output_dir)
    return paths


def push_to_hub(args, output_dir: Path) -> str:
    """Upload the output folder (LoRA, scheduler, kohya export, card, samples); checkpoints stay local."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or output_dir.name
    repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=args.hub_token,
                  commit_message="LoRA trained with diffusers-ztsnr",
                  ignore_patterns=["checkpoint-*", "logs/*", "validation/*", "*.tmp"])
    return f"https://huggingface.co/{repo_id}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))
