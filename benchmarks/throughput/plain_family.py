"""The plain row of the newer flow families (SD3.5, FLUX.1 Kontext, Chroma, Qwen-Image, Z-Image, FLUX.2 Klein):
diffusers' DreamBooth-LoRA examples for them with per-image captions, reduced to one CPU process at fp32.

What those examples share (``train_dreambooth_lora_{sd3,flux_kontext,qwen_image,z_image,flux2_klein}.py``): the
pipeline's own ``encode_prompt`` for every batch when captions differ per image, a VAE encode of every batch
(no latent cache unless asked), ``compute_density_for_timestep_sampling`` and sigmas from a copy of the
pipeline's FlowMatchEulerDiscreteScheduler, the transformer called as the pipeline calls it, target
``noise - x0``, ``compute_loss_weighting_for_sd3``, MSE, AdamW on LoRA (``init_lora_weights="gaussian"``, alpha =
rank) at the family's default targets, gradient clipping at 1.0. The family-specific parts (how the pipeline
encodes a prompt, normalises latents, packs them and calls its transformer) are taken from the training task of
the family (``diffusers_ztsnr.training.families``), which the family tests prove equal to the pipeline's own
step; everything around them (no cache, no run identity, no checkpoints, no health checks) is the example's.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch

from .plain_flow import _flow_dataloader, _sigmas, example_flow_loss
from .plain_loop import example_batches, optimizer_step, prepare, run_result


def _family_task(pipeline: str, data: str, resolution: int, rank: int):
    """The family's task on ``pipeline`` (loads it), every model frozen in fp32, LoRA on the default targets."""
    from peft import LoraConfig

    from diffusers_ztsnr.training.families.registry import make_flow_task
    from diffusers_ztsnr.training.flow import parse_args

    args = parse_args(["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data,
                       "--output_dir", tempfile.mkdtemp(prefix="plain-family-"), "--resolution", str(resolution),
                       "--rank", str(rank)])
    task = make_flow_task(args)
    for model in (task.denoiser, task.vae, *task.text_encoders):
        model.requires_grad_(False)
        model.to(dtype=torch.float32)
    task.denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                         target_modules=list(task.lora_layers)))
    return task


def run_plain_family(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> dict:
    """One plain run of ``steps`` optimizer steps (logit-normal times, as the examples' default)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import compute_density_for_timestep_sampling

    start = time.perf_counter()
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    set_seed(0)
    task = _family_task(pipeline, data, resolution, rank)
    scheduler_copy = copy.deepcopy(task.pipe.scheduler)
    transformer = task.denoiser
    lora_layers = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    train_dataloader = _flow_dataloader(data, resolution, batch_size)
    transformer, optimizer, train_dataloader, lr_scheduler = prepare(accelerator, transformer, optimizer,
                                                                     train_dataloader, steps)
    num_train_timesteps = scheduler_copy.config.num_train_timesteps
    step_times, loss_value = [], float("nan")
    for batch in example_batches(accelerator, transformer, train_dataloader, steps, step_times):
        with accelerator.accumulate([transformer]):
            with torch.no_grad():
                conditioning = task.encode_prompts(batch["prompts"], accelerator.device)
                model_input = task.encode_images(batch["pixel_values"]).float()
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=bsz,
                                                      logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
            timesteps = scheduler_copy.timesteps[(u * num_train_timesteps).long()]
            sigmas = _sigmas(scheduler_copy, accelerator.device, timesteps, model_input.ndim, model_input.dtype)
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            predict = task.predictor(transformer, batch, torch.float32, "flow")
            model_pred = predict(noisy_model_input, sigmas.flatten(), conditioning)
            loss = example_flow_loss(model_pred, noise, model_input, sigmas, "logit_normal")
            optimizer_step(accelerator, loss, lora_layers, optimizer, lr_scheduler)
        if accelerator.sync_gradients:
            loss_value = loss.detach().item()
    return run_result(start, accelerator, step_times, loss_value)
