"""The GPU anchor rows: diffusers' example LoRA trainers, reduced to what they do per step in bf16 on one GPU.

* SD1.5: ``examples/text_to_image/train_text_to_image_lora.py --mixed_precision bf16``: the frozen models and the
  LoRA in bf16 (the example casts LoRA to fp32 only under fp16), accelerate's autocast, an ``imagefolder`` dataset
  transformed per batch, the VAE and the text encoder every step, epsilon MSE, the gathered loss read every step.
* SD3: ``examples/dreambooth/train_dreambooth_lora_sd3.py --mixed_precision bf16`` on its fast path: one instance
  prompt encoded once up front, the text encoders then freed; the VAE (fp32, as the example keeps it) every step,
  logit-normal times, ``--precondition_outputs`` (its default), the loss read every step.

Both use torch's default AdamW (not fused) and ``num_workers=0``, as the examples do by default.
"""

from __future__ import annotations

import gc
import time

import torch

from .plain_loop import example_transform
from .trainer_settings import LORA_TARGETS, SD3_LORA_TARGETS


def _images(data: str, resolution: int) -> tuple[list[torch.Tensor], list[str]]:
    """The images transformed once (the SD3 example's DreamBooth dataset does it in its constructor)."""
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=data)["train"]
    return [example_transform(im.convert("RGB"), resolution) for im in dataset["image"]], list(dataset["text"])


def _per_batch_loader(data: str, resolution: int, batch_size: int, tokenizer):
    """The SD1.5 example's ``imagefolder`` dataset, images transformed and captions tokenized per batch."""
    from datasets import load_dataset

    def transform(examples):
        examples["pixel_values"] = [example_transform(im.convert("RGB"), resolution) for im in examples["image"]]
        examples["input_ids"] = tokenizer(examples["text"], max_length=tokenizer.model_max_length,
                                          padding="max_length", truncation=True, return_tensors="pt").input_ids
        return examples

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),
                "input_ids": torch.stack([e["input_ids"] for e in examples])}

    dataset = load_dataset("imagefolder", data_dir=data)["train"].with_transform(transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                       drop_last=True)


def _loop(accelerator, model, params, optimizer, batches, steps: int, compute_loss) -> list[float]:
    """The examples' step: loss, backward, clip at 1.0, step, zero_grad, the loss read on the host; returns the
    clock after each step."""
    times = []
    while len(times) < steps:
        for batch in batches:
            with accelerator.accumulate(model):
                loss = compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            _ = loss.detach().item()  # the examples log it every step
            times.append(time.perf_counter())
            if len(times) >= steps:
                break
    return times


def plain_sd15(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> list[float]:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(mixed_precision="bf16")
    scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    for model in (unet, vae, text_encoder):
        model.to(accelerator.device, dtype=torch.bfloat16)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    loader = _per_batch_loader(data, resolution, batch_size, tokenizer)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)

    def compute_loss(batch):
        latents = vae.encode(batch["pixel_values"].to(torch.bfloat16)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, t)
        states = text_encoder(batch["input_ids"], return_dict=False)[0]
        pred = unet(noisy, t, states, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        return accelerator.gather(loss.repeat(batch_size)).mean()

    return _loop(accelerator, unet, params, optimizer, loader, steps, compute_loss)


def _sd3_prompt(pipeline: str, prompt: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The instance prompt through the pipeline's encoders once; the encoders are then freed."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline, transformer=None, vae=None,
                                                    torch_dtype=torch.bfloat16).to(device)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=77)
    del pipe
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return embeds, pooled


def plain_sd3(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> list[float]:
    import copy

    from accelerate import Accelerator
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig

    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    embeds, pooled = _sd3_prompt(pipeline, "a photo of sks object", device)
    schedule = copy.deepcopy(FlowMatchEulerDiscreteScheduler.from_pretrained(pipeline, subfolder="scheduler"))
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae").to(device, dtype=torch.float32)
    transformer = SD3Transformer2DModel.from_pretrained(pipeline, subfolder="transformer")
    vae.requires_grad_(False)
    transformer.requires_grad_(False)
    transformer.to(device, dtype=torch.bfloat16)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=SD3_LORA_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    pixels, _ = _images(data, resolution)
    loader = torch.utils.data.DataLoader(pixels, batch_size=batch_size, shuffle=True, drop_last=True)
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    sigmas_table, timesteps_table = schedule.sigmas.to(device), schedule.timesteps.to(device)

    def compute_loss(pixel_values):
        x0 = vae.encode(pixel_values.to(torch.float32)).latent_dist.sample()
        x0 = ((x0 - vae.config.shift_factor) * vae.config.scaling_factor).to(torch.bfloat16)
        noise = torch.randn_like(x0)
        u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=x0.shape[0],
                                                  logit_mean=0.0, logit_std=1.0)
        index = (u * schedule.config.num_train_timesteps).long().to(device)
        sigma = sigmas_table[index].to(x0.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        pred = transformer(hidden_states=noisy, timestep=timesteps_table[index],
                           encoder_hidden_states=embeds.expand(x0.shape[0], -1, -1),
                           pooled_projections=pooled.expand(x0.shape[0], -1), return_dict=False)[0]
        pred = pred * (-sigma) + noisy  # --precondition_outputs: the x0 estimate, compared with x0
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigma)
        return torch.mean((weighting.float() * (pred.float() - x0.float()) ** 2).reshape(x0.shape[0], -1), 1).mean()

    return _loop(accelerator, transformer, params, optimizer, loader, steps, compute_loss)
