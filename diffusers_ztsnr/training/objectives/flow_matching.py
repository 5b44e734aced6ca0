"""The rectified-flow objective as one callable: flow time, noisy input, velocity loss.

Conventions (diffusers'): ``x_s = (1 - s) * x0 + s * eps`` with ``s = 1`` pure noise; the target velocity is
``eps - x0``. A model of another parameterization or path is adapted by its family before it gets here (a VP UNet
through :meth:`diffusers_ztsnr.adapters.PathTransformedModel.vp_as_flow`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...schedule import flow_mu
from .losses import flow_matching_loss
from .noise import apply_noise_offset, input_perturbation_noise, noisy_latents
from .times import sample_flow_sigmas
from .weights import flow_loss_weights


@dataclass(frozen=True)
class ResolutionShift:
    """Flux's resolution-dependent time shift: ``mu`` grows linearly with the number of 2x2 latent patches, from
    ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (the scheduler's settings)."""

    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> ResolutionShift:
        return cls(config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                   config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    def mu(self, latents: torch.Tensor) -> float:
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)  # 2x2 patches, SD3 and Flux alike
        return flow_mu(tokens, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift)


def resolve_flow_shift(value: float | str, scheduler_config: dict[str, Any]) -> float | ResolutionShift:
    """``--timestep_shift`` for a flow model: ``"auto"`` is what its scheduler does at sampling time (SD3's static
    shift, Flux's resolution-dependent one), ``"dynamic"`` the resolution-dependent one, a number a static shift."""
    if value == "auto":
        value = "dynamic" if scheduler_config.get("use_dynamic_shifting", False) else scheduler_config.get("shift", 1.0)
    if value == "dynamic":
        return ResolutionShift.from_scheduler_config(scheduler_config)
    return float(value)


class FlowMatchingObjective:
    """The rectified-flow loss ``|u(x_s, s) - (eps - x0)|**2`` (or on ``x0`` with ``precondition_outputs``).

    Called as ``objective(predict, latents, conditioning, noise, generator) -> (per-sample loss [B], s [B])`` where
    ``predict(x_s, s, conditioning)`` is the velocity at flow times ``s`` in ``[0, 1]`` (float64). ``s`` is drawn by
    ``weighting_scheme``'s density (:func:`~.times.sample_flow_sigmas`), shifted by ``shift`` (a static factor or a
    :class:`ResolutionShift`) and, with ``min_time``, clamped from below (a VP schedule's cleanest level). Draws on
    ``generator``: the offset noise and the input perturbation (only when enabled), then the times. A
    ``loss_mask=`` ``[B, 1, h, w]`` weighs the latent cells (:func:`~.losses.diffusion_loss`).
    """

    #: the noise path ``predict`` is called on (``"flow"``: ``x_s = (1 - s) x0 + s eps``, ``s`` in [0, 1])
    path: ClassVar[str] = "flow"

    def __init__(self, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, *, shift: float | ResolutionShift = 1.0, min_time: float | None = None,
                 precondition_outputs: bool = False, noise_offset: float = 0.0, input_perturbation: float = 0.0):
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.mode_scale, self.shift, self.min_time = mode_scale, shift, min_time
        self.precondition_outputs = precondition_outputs
        self.noise_offset, self.input_perturbation = noise_offset, input_perturbation

    def shift_and_mu(self, latents: torch.Tensor) -> tuple[float, float | None]:
        """``(static shift, mu)`` for a batch of ``latents``: ``mu`` is ``None`` unless the shift depends on the
        resolution (then the static shift is 1)."""
        if isinstance(self.shift, ResolutionShift):
            return 1.0, self.shift.mu(latents)
        return self.shift, None

    def times(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Flow times ``s`` ``[B]`` (float64) for a batch of ``latents``."""
        shift, mu = self.shift_and_mu(latents)
        s = sample_flow_sigmas(len(latents), generator, self.weighting_scheme, self.logit_mean, self.logit_std,
                               self.mode_scale, shift=shift, mu=mu)
        return s if self.min_time is None else s.clamp(min=self.min_time)

    def __call__(self, predict, latents: torch.Tensor, conditioning: dict[str, torch.Tensor], noise: torch.Tensor,
                 generator: torch.Generator | None, loss_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        noise = apply_noise_offset(noise, self.noise_offset, generator)
        model_noise = input_perturbation_noise(noise, self.input_perturbation, generator)
        s = self.times(latents, generator)
        noisy = noisy_latents(latents, model_noise, 1 - s, s)
        velocity = predict(noisy, s, conditioning)
        weights = flow_loss_weights(s, self.weighting_scheme).to(latents.device)
        loss = flow_matching_loss(velocity, "flow_prediction", noisy, latents, noise, 1 - s, s, weights,
                                  self.precondition_outputs, reduction="none", mask=loss_mask)
        return loss, s
