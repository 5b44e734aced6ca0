"""The plain SD3 and Flux rows: diffusers' ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py``
with per-image captions, reduced to one CPU process at fp32; one loop, only prompt encoding and the transformer
call differ."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .assets import vae_factor
from .plain_loop import example_batches, example_transform, optimizer_step, prepare, run_result
from .trainer_settings import (
    FLUX_GUIDANCE,
    FLUX_LORA_TARGETS,
    FLUX_MAX_SEQUENCE_LENGTH,
    FLUX_WEIGHTING,
    SD3_LORA_TARGETS,
)


def _flow_components(pipeline: str, rank: int, accelerator, transformer_class, lora_targets: list[str],
                     text_encoders: list) -> tuple:
    """A deep copy of the pipeline's FlowMatchEulerDiscreteScheduler (its time tables), the VAE and the
    transformer; every model frozen in fp32 on the device, LoRA on the transformer's ``lora_targets``."""
    import copy

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from peft import LoraConfig

    noise_scheduler_copy = copy.deepcopy(FlowMatchEulerDiscreteScheduler.from_pretrained(pipeline,
                                                                                         subfolder="scheduler"))
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    transformer = transformer_class.from_pretrained(pipeline, subfolder="transformer")
    for model in (transformer, vae, *text_encoders):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=torch.float32)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=lora_targets))
    return noise_scheduler_copy, vae, transformer


def _flow_dataloader(data: str, resolution: int, batch_size: int):
    """The images transformed once up front (the examples' DreamBooth dataset does it in its constructor), each
    with its caption."""
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=data)["train"]
    pixel_values = [example_transform(im.convert("RGB"), resolution) for im in dataset["image"]]
    examples = [{"pixel_values": x, "prompt": c} for x, c in zip(pixel_values, dataset["text"], strict=True)]

    def collate_fn(batch):
        pixels = torch.stack([e["pixel_values"] for e in batch]).to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixels, "prompts": [e["prompt"] for e in batch]}

    return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True, collate_fn=collate_fn,
                                       num_workers=0)


def _sigmas(noise_scheduler_copy, device, timesteps, n_dim: int, dtype) -> torch.Tensor:
    """The scheduler copy's sigma at each of ``timesteps``, broadcastable over ``n_dim`` dimensions."""
    sigmas = noise_scheduler_copy.sigmas.to(device=device, dtype=dtype)
    schedule_timesteps = noise_scheduler_copy.timesteps.to(device)
    indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps.to(device)]
    sigma = sigmas[indices].flatten()
    return sigma.reshape(sigma.shape + (1,) * (n_dim - sigma.ndim))


def example_flow_loss(model_pred: torch.Tensor, noise: torch.Tensor, model_input: torch.Tensor,
                      sigmas: torch.Tensor, weighting_scheme: str) -> torch.Tensor:
    """The examples' loss: ``compute_loss_weighting_for_sd3`` times the squared error to ``noise - x0``, averaged
    per sample, then over the batch."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    per_sample = ((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(len(noise), -1)).mean(1)
    return per_sample.mean()


def _plain_flow_loop(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int, *,
                     transformer_class, lora_targets: list[str], weighting_scheme: str, text_encoders: list,
                     encode_prompts, predict) -> dict:
    """What diffusers' SD3 and Flux DreamBooth-LoRA examples share, reduced to one CPU process at fp32: freeze,
    LoRA on ``lora_targets``, AdamW, images transformed once up front, and per step: ``encode_prompts(captions)``
    (every step, per-image captions), VAE sample, ``compute_density_for_timestep_sampling``, sigmas from a
    FlowMatchEulerDiscreteScheduler copy, ``predict(transformer, noisy, timesteps, embeddings)``, target
    ``noise - x0``, ``compute_loss_weighting_for_sd3``, MSE."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import compute_density_for_timestep_sampling

    start = time.perf_counter()
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    set_seed(0)
    noise_scheduler_copy, vae, transformer = _flow_components(pipeline, rank, accelerator, transformer_class,
                                                              lora_targets, text_encoders)
    lora_layers = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    train_dataloader = _flow_dataloader(data, resolution, batch_size)
    transformer, optimizer, train_dataloader, lr_scheduler = prepare(accelerator, transformer, optimizer,
                                                                     train_dataloader, steps)
    shift_factor, scaling_factor = vae.config.shift_factor, vae.config.scaling_factor
    num_train_timesteps = noise_scheduler_copy.config.num_train_timesteps
    step_times, loss_value = [], float("nan")
    for batch in example_batches(accelerator, transformer, train_dataloader, steps, step_times):
        with accelerator.accumulate([transformer]):
            with torch.no_grad():
                embeddings = encode_prompts(batch["prompts"], accelerator.device)
            model_input = vae.encode(batch["pixel_values"].to(dtype=vae.dtype)).latent_dist.sample()
            model_input = ((model_input - shift_factor) * scaling_factor).to(dtype=torch.float32)
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=bsz,
                                                      logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
            indices = (u * num_train_timesteps).long()
            timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
            sigmas = _sigmas(noise_scheduler_copy, accelerator.device, timesteps, n_dim=model_input.ndim,
                             dtype=model_input.dtype)
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            model_pred = predict(transformer, noisy_model_input, timesteps, embeddings)
            loss = example_flow_loss(model_pred, noise, model_input, sigmas, weighting_scheme)
            optimizer_step(accelerator, loss, lora_layers, optimizer, lr_scheduler)
        if accelerator.sync_gradients:
            loss_value = loss.detach().item()
    return run_result(start, accelerator, step_times, loss_value)


def run_plain_flow(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> dict:
    """diffusers' train_dreambooth_lora_sd3.py with per-image captions (two CLIPs + T5, logit-normal times)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    max_sequence_length = 77  # the example's default
    tokenizers = [CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer"),
                  CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer_2"),
                  T5TokenizerFast.from_pretrained(pipeline, subfolder="tokenizer_3")]
    text_encoders = [CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder"),
                     CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder_2"),
                     T5EncoderModel.from_pretrained(pipeline, subfolder="text_encoder_3")]

    def clip_embeddings(tokenizer, text_encoder, prompt: list[str], device):
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = text_encoder(ids.to(device), output_hidden_states=True)
        return out.hidden_states[-2].to(dtype=text_encoder.dtype), out[0]  # penultimate layer, pooled projection

    def encode_prompts(prompt: list[str], device):
        clip = [clip_embeddings(t, e, prompt, device) for t, e in zip(tokenizers[:2], text_encoders[:2], strict=True)]
        clip_embeds = torch.cat([c[0] for c in clip], dim=-1)
        pooled_embeds = torch.cat([c[1] for c in clip], dim=-1)
        t5_ids = tokenizers[2](prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        t5_embeds = text_encoders[2](t5_ids.to(device))[0].to(dtype=text_encoders[2].dtype)
        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        return torch.cat([clip_embeds, t5_embeds], dim=-2), pooled_embeds

    def predict(transformer, noisy, timesteps, embeddings):
        prompt_embeds, pooled = embeddings
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled, return_dict=False)[0]

    return _plain_flow_loop(pipeline, data, resolution, batch_size, rank, steps,
                            transformer_class=SD3Transformer2DModel, lora_targets=SD3_LORA_TARGETS,
                            weighting_scheme="logit_normal", text_encoders=text_encoders,
                            encode_prompts=encode_prompts, predict=predict)


def run_plain_flux(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> dict:
    """diffusers' train_dreambooth_lora_flux.py with per-image captions (CLIP pooled + T5, packed latents,
    guidance embedding)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    clip_tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    t5_tokenizer = T5TokenizerFast.from_pretrained(pipeline, subfolder="tokenizer_2")
    clip_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    t5_encoder = T5EncoderModel.from_pretrained(pipeline, subfolder="text_encoder_2")
    vae_scale_factor = vae_factor(Path(pipeline))
    guidance_embeds = json.loads((Path(pipeline) / "transformer" / "config.json").read_text())["guidance_embeds"]

    def encode_prompts(prompt: list[str], device):
        """CLIP's pooled output (77 tokens) and T5's last hidden states (max_sequence_length), text ids all 0."""
        clip_ids = clip_tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = clip_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=clip_encoder.dtype)
        t5_ids = t5_tokenizer(prompt, padding="max_length", max_length=FLUX_MAX_SEQUENCE_LENGTH, truncation=True,
                              return_tensors="pt").input_ids
        embeds = t5_encoder(t5_ids.to(device))[0].to(dtype=t5_encoder.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=clip_encoder.dtype)
        return embeds, pooled, text_ids

    def predict(transformer, noisy, timesteps, embeddings):
        prompt_embeds, pooled, text_ids = embeddings
        bsz, channels, height, width = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, noisy.device, noisy.dtype)
        packed = FluxPipeline._pack_latents(noisy, batch_size=bsz, num_channels_latents=channels, height=height,
                                            width=width)
        guidance = torch.tensor([FLUX_GUIDANCE], device=noisy.device).expand(bsz) if guidance_embeds else None
        out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                          img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height=height * vae_scale_factor, width=width * vae_scale_factor,
                                            vae_scale_factor=vae_scale_factor)

    return _plain_flow_loop(pipeline, data, resolution, batch_size, rank, steps,
                            transformer_class=FluxTransformer2DModel, lora_targets=FLUX_LORA_TARGETS,
                            weighting_scheme=FLUX_WEIGHTING, text_encoders=[clip_encoder, t5_encoder],
                            encode_prompts=encode_prompts, predict=predict)
