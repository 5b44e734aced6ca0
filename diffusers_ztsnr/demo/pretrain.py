"""A base model that can draw the demo's shapes: a small VAE and an epsilon UNet trained on SD's schedule.

Both are trained from random weights in about a minute of CPU time, on the demo's own images, with the
epsilon objective and the scaled-linear beta schedule of SD 1.x (non-zero terminal SNR): the kind of base model
whose images cannot be very dark or very bright. The result is saved as an ordinary ``StableDiffusionPipeline``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from ..schedule import VPSchedule
from ..testing.tiny import make_tiny_pipeline
from .data import ShapeSet

Progress = Callable[[int], None]
#: twice SD's 4: what decides the lighting curse is how many latent numbers carry an image's brightness (the
#: residual signal at SD's last training step grows with their count), and a 16x16x8 latent holds as many as a
#: 23x23x4 one while costing the UNet no more than 16x16x4 (SD's own 64x64x4 latents hold 8x as many)
LATENT_CHANNELS = 8


def small_vae(size: int) -> AutoencoderKL:
    """Two levels: latents at half the image size, :data:`LATENT_CHANNELS` channels."""
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(16, 32), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                         norm_num_groups=8, sample_size=size)


def small_unet(latent_size: int, text_width: int, channels: tuple[int, int] = (16, 32)) -> UNet2DConditionModel:
    """SD's UNet layout at two levels, cross-attention on the coarser one (one head: CPU attention kernels are
    slow with many tiny heads)."""
    return UNet2DConditionModel(sample_size=latent_size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=channels,
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=text_width,
                                attention_head_dim=32)


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, count, (batch_size,), generator=generator)


def train_vae(images: torch.Tensor, steps: int, batch_size: int, seed: int, progress: Progress) -> AutoencoderKL:
    """Reconstruction (MSE) with a light KL term, plus a term on each image's mean colour; the scaling factor then
    gives the latents unit variance.

    The mean-colour term matters here: on plain MSE a VAE this small reproduces only about 85% of the data's spread
    of image brightness in a couple of hundred steps, which would cap what any sampler could show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = small_vae(images.shape[-1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for index in _batches(len(images), batch_size, steps, generator):
        posterior = vae.encode(images[index]).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(posterior.mean + posterior.std * noise).sample
        target = images[index]
        mean_colour = (decoded.mean(dim=(2, 3)) - target.mean(dim=(2, 3))).pow(2).mean()
        loss = (decoded - target).pow(2).mean() + 10 * mean_colour + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress(1)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae


def train_eps_unet(latents: torch.Tensor, states: torch.Tensor, empty: torch.Tensor, steps: int, batch_size: int,
                   seed: int, progress: Progress, learning_rate: float = 1e-3) -> UNet2DConditionModel:
    """Epsilon prediction on SD 1.x's schedule (timesteps uniform in 0..999), 10% of captions dropped for CFG."""
    alphas_cumprod = VPSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012).alphas_cumprod.float()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = small_unet(latents.shape[-1], states.shape[-1])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    unet.train()
    for index in _batches(len(latents), batch_size, steps, generator):
        x0 = latents[index]
        t = torch.randint(0, len(alphas_cumprod), (len(index),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        drop = (torch.rand(len(index), generator=generator) < 0.1).view(-1, 1, 1)
        cond = torch.where(drop, empty, states[index])
        pred = unet(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, cond).sample
        # weight ~ the x0-space error (sigma^2/alpha^2, capped): the sampler divides eps errors by alpha at high t
        weight = 1 + ((1 - ab) / ab).clamp(max=20)
        loss = (weight * (pred - noise).pow(2)).mean() / weight.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress(1)
    return unet.eval().requires_grad_(False)


def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]


def build_base(shapes: ShapeSet, settings, folder: Path, progress: Callable[[str, int], Progress]) -> Path:
    """Train the VAE, then the epsilon UNet on its latents; save the pipeline (SD 1.5's scheduler) to ``folder``."""
    seed, batch = settings.seed, settings.batch_size
    pipe = make_tiny_pipeline("sd15", seed=seed)
    vae = train_vae(shapes.images, settings.vae_steps, batch, seed, progress("VAE", settings.vae_steps))
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in shapes.images.split(64)])
    latents = latents * vae.config.scaling_factor
    unique = sorted(set(shapes.captions))
    table = encode_prompts(pipe, [*unique, ""])
    states = table[[unique.index(c) for c in shapes.captions]]
    unet = train_eps_unet(latents, states, table[-1:], settings.unet_steps, batch, seed,
                          progress("UNet", settings.unet_steps), settings.base_learning_rate)
    base = StableDiffusionPipeline(**{**pipe.components, "vae": vae, "unet": unet})
    base.save_pretrained(str(folder), safe_serialization=True)
    return folder
