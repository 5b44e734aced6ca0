"""The plain UNet row: diffusers' ``train_text_to_image_lora.py``, reduced to one CPU process at fp32."""

from __future__ import annotations

import time

import torch

from .plain_loop import example_batches, example_transform, optimizer_step, prepare, run_result
from .trainer_settings import LORA_TARGETS


def _unet_components(pipeline: str, rank: int, accelerator) -> tuple:
    """The example's models, frozen, LoRA on the UNet, in fp32 on the device: ``(noise_scheduler, tokenizer,
    text_encoder, vae, unet)``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    noise_scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    weight_dtype = torch.float32
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    return noise_scheduler, tokenizer, text_encoder, vae, unet


def _unet_dataloader(data: str, resolution: int, batch_size: int, tokenizer):
    """The example's ``imagefolder`` dataset, transformed per batch (pixels and caption ids)."""
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=data)["train"]

    def preprocess_train(examples):
        examples["pixel_values"] = [example_transform(im.convert("RGB"), resolution) for im in examples["image"]]
        examples["input_ids"] = tokenizer(examples["text"], max_length=tokenizer.model_max_length,
                                          padding="max_length", truncation=True, return_tensors="pt").input_ids
        return examples

    train_dataset = dataset.with_transform(preprocess_train)

    def collate_fn(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).contiguous().float()
        return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}

    return torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn,
                                       batch_size=batch_size, num_workers=0)


def run_plain(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> dict:
    """diffusers' train_text_to_image_lora.py, reduced to what one CPU process at fp32 runs (no caching)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    start = time.perf_counter()
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    set_seed(0)
    noise_scheduler, tokenizer, text_encoder, vae, unet = _unet_components(pipeline, rank, accelerator)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    train_dataloader = _unet_dataloader(data, resolution, batch_size, tokenizer)
    unet, optimizer, train_dataloader, lr_scheduler = prepare(accelerator, unet, optimizer, train_dataloader, steps)
    step_times, loss_value, train_loss = [], float("nan"), 0.0
    for batch in example_batches(accelerator, unet, train_dataloader, steps, step_times):
        with accelerator.accumulate(unet):
            latents = vae.encode(batch["pixel_values"].to(dtype=torch.float32)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
            target = noise  # epsilon prediction
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            avg_loss = accelerator.gather(loss.repeat(batch_size)).mean()
            train_loss += avg_loss.item()
            optimizer_step(accelerator, loss, lora_layers, optimizer, lr_scheduler)
        if accelerator.sync_gradients:
            loss_value, train_loss = train_loss, 0.0
    return run_result(start, accelerator, step_times, loss_value)
