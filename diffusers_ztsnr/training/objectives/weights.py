"""Per-sample loss weights: min-SNR-gamma and debiased estimation (VP), sigma_sqrt and cosmap (flow).

:func:`loss_weights`' ``snr`` (``[B]``, values in ``[0, inf]``) must be the SNR of the schedule actually trained, i.e.
``schedule.snr(t)`` of the ZTSNR-rescaled schedule when training with ZTSNR, not a table computed before
the rescale. The result has ``snr``'s floating dtype (float32 at least) and is finite and ``>= 0`` for
every SNR in ``[0, inf]``, every target and every option.

**One weighting, four targets.** At a fixed ``x_t`` an error ``d`` in the predicted ``x0`` is an error
``sqrt(c) * d`` in the target, with ``c = SNR`` (epsilon), ``SNR + 1`` (v_prediction, VP path), ``1``
(sample) and ``(1 + sqrt(SNR))**2`` (flow_prediction). A weighting is specified as an x0-space weight
``lam(SNR)`` and each target's weight is ``lam / c``, so the four targets train the same objective:
``w_eps * SNR == w_v * (SNR + 1) == w_x0 == w_flow * (1 + sqrt(SNR))**2``.

* Neither option: weight 1 (the plain MSE of the target).
* **Min-SNR-gamma** (Hang et al. 2023, arXiv:2303.09556): ``lam = min(SNR, gamma)``, i.e.
  epsilon ``min(SNR, gamma) / SNR``, v ``min(SNR, gamma) / (SNR + 1)``, sample ``min(SNR, gamma)``. The
  epsilon weight is evaluated as ``min(1, gamma / SNR)``, which is 1 at SNR = 0; the form in diffusers'
  example scripts, ``min(SNR, gamma) / SNR``, is ``0/0 = NaN`` there and poisons a ZTSNR run. Note that
  ``lam(0) = 0``: for v / sample / flow targets the zero-SNR timestep gets weight 0 under this (the paper's)
  weighting, as do all timesteps in proportion to their SNR.
* **Debiased estimation** (Yu et al. 2024, arXiv:2310.08442): weight ``1 / sqrt(SNR)`` on the epsilon loss,
  i.e. ``lam = sqrt(SNR)``; v: ``sqrt(SNR) / (SNR + 1)`` (``= alpha * sigma``), sample: ``sqrt(SNR)``. With
  ``snr_gamma`` too, the two multiply as in sd-scripts: ``lam = min(SNR, gamma) / sqrt(SNR)``.
  sd-scripts' ``apply_debiased_estimation`` clamps SNR at 1000 from above (its SNR at t = 0 is ~1175) and not
  at all from below, so at SNR = 0 its epsilon weight is ``1/sqrt(0) = inf`` (and for v_prediction it uses
  ``1 / (SNR + 1)``, which is not the debiased weighting in x0-space). Here the whole debiased weight is
  evaluated at ``SNR`` clamped into ``debiased_snr_range`` (default ``[1e-3, 1e3]``, sd-scripts' upper clamp
  and its mirror image in log-SNR): the epsilon weight lies in ``[1/sqrt(1000), sqrt(1000)]``, equal to
  sd-scripts' wherever ``SNR >= 1e-3`` (all of SD's non-ZTSNR schedule, whose smallest SNR is 0.0047), the
  targets still agree in x0-space at the clamped SNR, and beyond the range each weight is held at its
  boundary value, which keeps the zero-SNR timestep of a v / sample target at a small positive weight
  instead of 0. To clamp at the smallest positive SNR of a schedule instead, pass
  ``debiased_snr_range=(snr[snr > 0].min(), 1e3)``.

``snr_gamma`` of ``None`` or 0 disables min-SNR (CLI flags use both to mean "off").
"""

from __future__ import annotations

import math

import torch

from .noise import _check_prediction_type
from .times import check_flow_weighting

# Debiased estimation is evaluated on SNR clamped into this range (see :func:`loss_weights`): sd-scripts
# clamps at 1000 from above; we add the mirror image 1/1000 from below so the epsilon weight stays finite
# (<= sqrt(1000) ~ 31.6) at SNR = 0.
DEBIASED_SNR_RANGE = (1e-3, 1e3)


def _checked_snr(snr: torch.Tensor, prediction_type: str, snr_gamma: float | None) -> torch.Tensor:
    """``snr`` as a float tensor (float32 at least) after rejecting what no weighting can use."""
    _check_prediction_type(prediction_type)
    snr = torch.as_tensor(snr)
    work = torch.promote_types(snr.dtype, torch.float32) if snr.is_floating_point() else torch.float32
    snr = snr.to(work)
    if not bool((snr >= 0).all()):
        raise ValueError("snr must lie in [0, inf] (no NaN, no negative values).")
    if snr_gamma is not None and not snr_gamma >= 0:
        raise ValueError(f"snr_gamma must be > 0 (or None / 0 to disable min-SNR weighting), got {snr_gamma}.")
    return snr


def loss_weights(
    snr: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
    debiased: bool = False,
    debiased_snr_range: tuple[float, float] = DEBIASED_SNR_RANGE,
) -> torch.Tensor:
    """Per-sample weights that multiply the per-sample MSE of the ``prediction_type`` target.

    The weightings and their forms for each target are described in this module's docstring.
    """
    snr = _checked_snr(snr, prediction_type, snr_gamma)
    gamma = snr_gamma or None
    if gamma is None and not debiased:
        return torch.ones_like(snr)

    if debiased:
        lo, hi = debiased_snr_range
        if not 0 < lo <= hi < math.inf:
            raise ValueError(f"debiased_snr_range must satisfy 0 < low <= high < inf, got {debiased_snr_range}.")
        snr = snr.clamp(float(lo), float(hi))  # finite and positive from here on
        lam = snr.sqrt() if gamma is None else snr.clamp(max=gamma) / snr.sqrt()
        eps_weight = lam / snr
    else:
        lam = snr.clamp(max=gamma)  # min(SNR, gamma): finite on [0, inf]
        eps_weight = (gamma / snr).clamp(max=1.0)  # == lam / SNR, and 1 (not 0/0) at SNR = 0

    if prediction_type == "epsilon":
        return eps_weight
    if prediction_type == "v_prediction":
        return lam / (snr + 1)
    if prediction_type == "sample":
        return lam
    return lam / (1 + snr.sqrt()) ** 2  # flow_prediction


def flow_loss_weights(s: torch.Tensor, weighting_scheme: str) -> torch.Tensor:
    """Per-sample loss weights of diffusers' SD3/Flux scripts for flow times ``s`` (``[B]``).

    ``"sigma_sqrt"``: ``1 / s**2``; ``"cosmap"``: ``2 / (pi * (1 - 2 s + 2 s**2))`` (Esser et al. 2024, §3.1,
    the cosine map); every other scheme: 1 (it acted on the density of ``s`` already).
    """
    check_flow_weighting(weighting_scheme)
    s = torch.as_tensor(s, dtype=torch.float64)
    if weighting_scheme == "sigma_sqrt":
        if bool((s <= 0).any()):
            raise ValueError("sigma_sqrt weighting is infinite at s = 0; draw s with sample_flow_sigmas.")
        return s.pow(-2.0)
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    return torch.ones_like(s)
