"""The VP diffusion objective as one callable: timestep, noisy input, target, weight, per-sample loss."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...schedule import VPSchedule
from .losses import diffusion_loss
from .noise import apply_noise_offset, input_perturbation_noise, noisy_latents, training_target
from .times import sample_timesteps
from .weights import loss_weights


class DiffusionObjective:
    """The loss of a VP model of ``prediction_type`` on ``schedule`` (the schedule actually trained: its ZTSNR
    rescale when training with zero terminal SNR).

    Called as ``objective(predict, latents, conditioning, noise, generator, loss_mask=None) -> (per-sample loss [B],
    timesteps [B])``
    where ``predict(x_t, t, conditioning)`` is the model's output in ``prediction_type`` at integer timesteps ``t``
    (``0 .. T-1``, ``T-1`` the noisiest). Draws on ``generator``, in this order: the offset noise, the input
    perturbation (each only when enabled), then the timesteps; ``noise`` is the standard normal draw the caller made.
    ``loss_mask`` ``[B, 1, h, w]`` weighs the latent cells (:func:`~.losses.diffusion_loss`).
    """

    #: the noise path ``predict`` is called on (``"vp"``: ``x_t = alpha_t x0 + sigma_t eps``, integer timesteps)
    path: ClassVar[str] = "vp"

    def __init__(self, schedule: VPSchedule, prediction_type: str, *, timestep_shift: float = 1.0,
                 noise_offset: float = 0.0, input_perturbation: float = 0.0, snr_gamma: float | None = None,
                 debiased_estimation: bool = False):
        self.schedule, self.prediction_type, self.timestep_shift = schedule, prediction_type, timestep_shift
        self.noise_offset, self.input_perturbation = noise_offset, input_perturbation
        self.snr_gamma, self.debiased_estimation = snr_gamma, debiased_estimation
        t = torch.arange(schedule.num_train_timesteps, dtype=torch.float64)
        self.alphas, self.sigmas = schedule.alpha_sigma(t)  # float64 tables, indexed by the drawn timesteps
        self.snrs = schedule.snr(t)

    def __call__(self, predict, latents: torch.Tensor, conditioning: dict[str, torch.Tensor], noise: torch.Tensor,
                 generator: torch.Generator | None, loss_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        device = latents.device
        noise = apply_noise_offset(noise, self.noise_offset, generator)
        model_noise = input_perturbation_noise(noise, self.input_perturbation, generator)  # the input's, not target's
        t = sample_timesteps(len(latents), self.schedule, generator=generator, timestep_shift=self.timestep_shift)
        alpha, sigma = self.alphas[t], self.sigmas[t]
        noisy = noisy_latents(latents, model_noise, alpha, sigma)
        target = training_target(latents, noise, alpha, sigma, self.prediction_type)
        prediction = predict(noisy, t.to(device), conditioning)
        weights = None
        if self.snr_gamma or self.debiased_estimation:
            weights = loss_weights(self.snrs[t], self.prediction_type, self.snr_gamma,
                                   self.debiased_estimation).to(device)
        return diffusion_loss(prediction, target.to(device), weights, reduction="none", mask=loss_mask), t
