"""Noise, noisy inputs and regression targets on a VP or flow path.

Noise levels ``alpha`` / ``sigma`` are Python numbers or per-sample tensors of shape ``[B]`` that broadcast over the
trailing dimensions of the data: ``x_t = alpha * x0 + sigma * noise`` (VP: ``alpha**2 + sigma**2 = 1``; flow:
``alpha = 1 - s``, ``sigma = s``).
"""

from __future__ import annotations

import torch

from ...parameterization import MODEL_PREDICTION_TYPES, from_x0_eps

Level = torch.Tensor | float


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in MODEL_PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(MODEL_PREDICTION_TYPES)} "
            "(the score is a conversion target, not a training target)."
        )


def _check_nonnegative(name: str, value: float | None) -> None:
    if value is not None and not value >= 0:  # `not >=` also rejects NaN
        raise ValueError(f"{name} must be >= 0 (0 disables it), got {value}.")


def _per_sample(level: Level, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or ``[B]`` level as a tensor that broadcasts over ``like`` (``[B, 1, 1, ...]``)."""
    level = torch.as_tensor(level).to(like.device, dtype)
    if level.ndim == 0:
        return level
    if level.ndim != 1 or (like.ndim > 0 and len(level) != len(like)):
        raise ValueError(f"noise levels must be scalars or of shape [B] = [{len(like)}], got {tuple(level.shape)}.")
    return level.reshape(-1, *([1] * (like.ndim - 1)))


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), returned on ``like``'s."""
    device = generator.device if generator is not None else like.device
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype).to(like.device, like.dtype)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, alpha: Level, sigma: Level) -> torch.Tensor:
    """The model input ``x_t = alpha * x0 + sigma * noise`` (per-sample levels of shape ``[B]`` or scalars).

    Computed in float32 at least (float64 levels are not rounded to bf16 first); returned in ``x0``'s dtype.
    """
    work = torch.promote_types(x0.dtype, torch.float32)
    a, s = _per_sample(alpha, x0, work), _per_sample(sigma, x0, work)
    return (a * x0.to(work) + s * noise.to(work)).to(x0.dtype)


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, alpha: Level, sigma: Level, prediction_type: str
) -> torch.Tensor:
    """The regression target of a ``prediction_type`` model at ``x_t = alpha * x0 + sigma * noise``.

    ``epsilon``: ``noise``; ``sample``: ``x0``; ``v_prediction``: ``alpha * noise - sigma * x0`` (Salimans & Ho
    2022); ``flow_prediction``: ``noise - x0`` (diffusers' flow-matching target, Esser et al. 2024; pass flow
    levels ``alpha = 1 - s``, ``sigma = s`` for the matching input). Made by
    :func:`diffusers_ztsnr.parameterization.from_x0_eps`, the one place these formulas live, so a model that
    outputs the target exactly gives ``x0`` back through :func:`~diffusers_ztsnr.parameterization.to_x0_eps`.

    When training with input perturbation, pass the *unperturbed* noise here (Ning et al. 2023).
    """
    _check_prediction_type(prediction_type)
    return from_x0_eps(x0, noise, alpha, sigma, prediction_type)


def apply_noise_offset(
    noise: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Offset noise (Guttenberg 2023, "Diffusion with Offset Noise", crosslabs.org).

    ``noise + noise_offset * n`` with ``n ~ N(0, 1)`` of shape ``[B, C, 1, ..., 1]``: one constant per sample and
    channel, which raises the variance of each channel's mean by ``noise_offset**2``. Use the result both for the
    noisy input and for the target (as diffusers' and sd-scripts' scripts do). It is a workaround for
    non-zero terminal SNR and contradicts ZTSNR (see :func:`check_objective_config`). ``noise_offset = 0``
    returns ``noise`` itself and draws nothing. ``n`` is drawn on ``generator``'s device.
    """
    _check_nonnegative("noise_offset", noise_offset)
    if not noise_offset:
        return noise
    if noise.ndim < 2:
        raise ValueError(f"noise offset needs noise of shape [B, C, ...], got {tuple(noise.shape)}.")
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
    return noise + noise_offset * _randn(shape, generator, noise)


def input_perturbation_noise(
    noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, arXiv:2301.11706): ``noise + gamma * n``, ``n ~ N(0, I)``.

    Build the *model input* from the returned noise and keep the original ``noise`` for the target; this
    simulates the prediction errors the model sees at sampling time (exposure bias). ``gamma = 0`` returns
    ``noise`` itself and draws nothing; the paper uses ``gamma = 0.1``.
    """
    _check_nonnegative("input_perturbation", gamma)
    if not gamma:
        return noise
    return noise + gamma * _randn(tuple(noise.shape), generator, noise)
