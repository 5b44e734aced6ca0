"""Training objectives: what one batch's loss is, whatever model family computes the prediction.

An objective is a callable ``objective(predict, latents, conditioning, noise, generator) -> (loss [B], times [B])``:
it draws the training times, builds the noisy input, calls ``predict(noisy, time, conditioning)`` (the model
family's forward pass, adapted to the objective's ``path``) and returns the per-sample loss (weighted per latent
cell by an optional ``loss_mask=`` ``[B, 1, h, w]``, normalised by its sum). The loop averages it; it never knows
which family or objective it trains.

* :class:`DiffusionObjective`: the VP loss of a ``prediction_type`` target with min-SNR / debiased weighting,
  offset noise and input perturbation (``path = "vp"``).
* :class:`FlowMatchingObjective`: rectified-flow matching with a time density, a static or resolution-dependent
  shift and sigma_sqrt / cosmap weighting (``path = "flow"``).

Conventions (those of the whole package, see :mod:`diffusers_ztsnr.schedule`): VP path ``x_t = alpha_t * x0 +
sigma_t * eps`` with integer timesteps ``0 .. T-1`` (``T-1`` the noisiest), ``SNR = alpha**2 / sigma**2``, exactly 0
at ``T-1`` on a zero-terminal-SNR schedule; flow path ``alpha = 1 - s``, ``sigma = s`` (``s = 1`` pure noise).
Everything that must agree with sampling is computed from the schedule *actually trained*: the SNR of the
ZTSNR-rescaled schedule when training with ZTSNR. (sd-scripts computes its SNR table before it rescales the betas,
so its min-SNR / debiased weights belong to the un-rescaled schedule.)

The building blocks are public: :mod:`.noise` (noisy inputs, targets, offset noise, input perturbation),
:mod:`.times` (timestep and flow-time densities), :mod:`.weights`, :mod:`.losses`.
"""

from collections.abc import Callable

import torch

from .diffusion import DiffusionObjective
from .flow_matching import FlowMatchingObjective, ResolutionShift, resolve_flow_shift
from .losses import REDUCTIONS, check_objective_config, diffusion_loss, flow_matching_loss
from .noise import Level, apply_noise_offset, input_perturbation_noise, noisy_latents, training_target
from .times import (
    FLOW_SIGMA_MIN,
    FLOW_WEIGHTING_SCHEMES,
    MODE_SCALE_RANGE,
    TIMESTEP_SCHEMES,
    check_flow_weighting,
    sample_flow_sigmas,
    sample_timesteps,
)
from .weights import DEBIASED_SNR_RANGE, flow_loss_weights, loss_weights

#: ``predict(noisy, time, conditioning) -> model output``: a model family's forward pass on one batch
Predict = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

__all__ = [
    "DEBIASED_SNR_RANGE", "FLOW_SIGMA_MIN", "FLOW_WEIGHTING_SCHEMES", "MODE_SCALE_RANGE", "REDUCTIONS",
    "TIMESTEP_SCHEMES", "DiffusionObjective", "FlowMatchingObjective", "Level", "Predict", "ResolutionShift",
    "apply_noise_offset", "check_flow_weighting", "check_objective_config", "diffusion_loss", "flow_loss_weights",
    "flow_matching_loss", "input_perturbation_noise", "loss_weights", "noisy_latents", "resolve_flow_shift",
    "sample_flow_sigmas", "sample_timesteps", "training_target",
]
