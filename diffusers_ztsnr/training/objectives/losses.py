"""The weighted MSE of a batch, the flow-matching loss of a model of any parameterization, and the checks of
settings that cannot train."""

from __future__ import annotations

import warnings

import torch

from ...parameterization import SingularParameterizationError, convert
from .noise import Level, _check_nonnegative, _check_prediction_type

REDUCTIONS = ("mean", "sum", "none")


def check_objective_config(
    prediction_type: str,
    zero_terminal_snr: bool,
    noise_offset: float | None = 0.0,
    input_perturbation: float | None = 0.0,
    snr_gamma: float | None = None,
) -> None:
    """Reject objective settings that cannot work, and warn about those that fight each other.

    Raises :class:`ValueError` for an unknown ``prediction_type``, negative ``noise_offset`` /
    ``input_perturbation`` / ``snr_gamma``, and ``epsilon`` with ``zero_terminal_snr``: at SNR = 0 the input is
    pure noise, so the epsilon target equals the input and the model learns nothing about the image there
    (and cannot be sampled from there; Lin et al. 2023, arXiv:2305.08891, §3.2).

    Warns (:class:`UserWarning`) when ``noise_offset > 0`` or ``input_perturbation > 0`` is combined with
    ``zero_terminal_snr``: both change the noise the model is trained on at the terminal timestep, so its
    input there is no longer the ``N(0, I)`` that sampling starts from, the very match ZTSNR establishes. Offset
    noise adds a per-channel (lowest-frequency) component: it was the workaround for the brightness problem
    that ZTSNR fixes at its root (Lin et al. 2023, §3.1).
    """
    _check_prediction_type(prediction_type)
    _check_nonnegative("noise_offset", noise_offset)
    _check_nonnegative("input_perturbation", input_perturbation)
    _check_nonnegative("snr_gamma", snr_gamma)
    if not zero_terminal_snr:
        return
    if prediction_type == "epsilon":
        raise ValueError(
            "prediction_type='epsilon' with zero_terminal_snr: at SNR 0 the input is pure noise, so an epsilon "
            "model cannot learn anything there (its target is its own input) and cannot be sampled from the "
            "zero-SNR timestep. Train prediction_type='v_prediction' with zero_terminal_snr (the ε→v conversion "
            "recipe of Lin et al. 2023: an epsilon base model fine-tunes into it), or disable "
            "zero_terminal_snr."
        )
    if noise_offset:
        warnings.warn(
            f"noise_offset={noise_offset} with zero_terminal_snr: offset noise adds a per-channel component to the "
            "noise, so the terminal training input is no longer the N(0, I) noise sampling starts from, which "
            "contradicts ZTSNR; ZTSNR already fixes the brightness problem offset noise works around "
            "(Lin et al. 2023, §3.1). Consider noise_offset=0.",
            UserWarning,
            stacklevel=2,
        )
    if input_perturbation:
        warnings.warn(
            f"input_perturbation={input_perturbation} with zero_terminal_snr: the perturbed noise has variance "
            f"1 + {input_perturbation}**2, so the terminal training input is no longer the N(0, I) noise sampling "
            "starts from, which contradicts ZTSNR (Lin et al. 2023, §3.1). Consider input_perturbation=0.",
            UserWarning,
            stacklevel=2,
        )


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted MSE: per-sample mean of ``(model_output - target)**2`` over all non-batch dimensions, times
    ``weights`` (``[B]``, e.g. from :func:`loss_weights`), then the mean (``"mean"``) or sum (``"sum"``) over the
    batch, or the ``[B]`` per-sample losses (``"none"``).

    A loss ``mask`` ``[B, 1, h, w]`` (the latent grid; values in [0, 1]) weighs each latent cell, and the sample's
    loss is normalised by the mask's sum instead of the cell count: ``sum(m * e**2) / (C * sum(m))`` with ``C``
    channels, so an all-ones mask gives the plain mean, and cells where ``m = 0`` add nothing (no gradient). An
    all-zero mask gives a loss of 0 for that sample.

    Computed in float32 at least, whatever the dtype of the inputs (fp16 / bf16 squares and means lose the
    small errors the end of training is about); the result is float32 (float64 for float64 inputs).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}.")
    if model_output.shape != target.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and target {tuple(target.shape)} differ in shape.")
    if model_output.ndim == 0:
        raise ValueError("model_output needs a batch dimension.")
    work = torch.promote_types(torch.promote_types(model_output.dtype, target.dtype), torch.float32)
    error = model_output.to(work) - target.to(work).to(model_output.device)
    if mask is None:
        per_sample = error.square().reshape(len(error), -1).mean(dim=1)
    else:
        mask = mask.to(error.device, work).expand(len(error), 1, *error.shape[2:])
        cells = mask.reshape(len(error), -1).sum(dim=1) * error.shape[1]
        per_sample = (error.square() * mask).reshape(len(error), -1).sum(dim=1) / cells.clamp_min(1e-12)
    if weights is not None:
        weights = torch.as_tensor(weights).to(per_sample.device, work)
        if weights.shape != per_sample.shape:
            raise ValueError(f"weights must have shape [B] = [{len(per_sample)}], got {tuple(weights.shape)}.")
        per_sample = per_sample * weights
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def flow_matching_loss(
    model_output: torch.Tensor,
    prediction_type: str,
    noisy: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alpha: Level,
    sigma: Level,
    weights: torch.Tensor | None = None,
    precondition_outputs: bool = False,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rectified-flow loss ``|u_model - (noise - x0)|**2`` for a model of any parameterization.

    ``noisy = alpha * x0 + sigma * noise`` is the model input at the levels it was evaluated at: flow levels
    ``(1 - s, s)`` for a flow transformer, or the VP levels at equal SNR for a VP model trained as a flow
    (:meth:`diffusers_ztsnr.adapters.PathTransformedModel.vp_as_flow`); the velocity ``noise - x0`` is the same
    quantity in both coordinates. ``model_output`` is converted to ``flow_prediction`` with the one conversion of
    :mod:`diffusers_ztsnr.parameterization` (no-op for a flow model). With ``precondition_outputs`` the loss is on
    ``x0`` instead (diffusers' ``--precondition_outputs``: the output turned into ``x0 = x_s - s * u``, compared
    with ``x0``), which needs a model whose output determines ``x0`` at every level trained. ``reduction`` and the
    loss ``mask`` as in :func:`diffusion_loss`.
    """
    _check_prediction_type(prediction_type)
    target_type = "sample" if precondition_outputs else "flow_prediction"
    work = noisy.float() if noisy.dtype in (torch.float16, torch.bfloat16) else noisy
    try:
        prediction = convert(model_output.to(work.dtype), work, alpha, sigma, prediction_type, target_type)
    except SingularParameterizationError as error:
        raise ValueError(f"cannot train a {prediction_type} model on this flow objective: {error}") from error
    target = x0 if precondition_outputs else noise - x0
    return diffusion_loss(prediction, target.to(prediction.dtype), weights, reduction, mask)
