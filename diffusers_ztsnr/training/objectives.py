"""The training objective every training script shares: noise, timesteps, targets, weights, loss.

Conventions (those of the whole package, see :mod:`diffusers_ztsnr.schedule`):

* VP path ``x_t = alpha_t * x0 + sigma_t * eps``, ``alpha_t = sqrt(alphabar_t)``, ``sigma_t = sqrt(1 -
  alphabar_t)``, integer training timesteps ``0 .. T-1`` with ``T-1`` the noisiest; ``SNR = alpha**2 / sigma**2``.
  On a zero-terminal-SNR (ZTSNR) schedule ``SNR(T-1) = 0`` exactly.
* Flow path (SD3 / Flux): ``alpha = 1 - s``, ``sigma = s``; the same functions apply with those levels.
* Noise levels ``alpha`` / ``sigma`` / ``snr`` are Python numbers or per-sample tensors of shape ``[B]``; they
  broadcast over the trailing dimensions of the data.
* Everything that must stay consistent with sampling is computed from the schedule *actually trained*:
  pass ``schedule.snr(t)`` of the ZTSNR-rescaled schedule when training with ZTSNR. (sd-scripts computes its
  SNR table before it rescales the betas, so its min-SNR / debiased weights belong to the un-rescaled
  schedule, one of the anchor bugs this module exists to avoid.)

A training step, for a VP model::

    noise = apply_noise_offset(torch.randn_like(x0), noise_offset, gen)      # optional, see the warning
    t = sample_timesteps(len(x0), schedule, generator=gen, timestep_shift=shift)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = noisy_latents(x0, input_perturbation_noise(noise, gamma, gen), alpha, sigma)
    target = training_target(x0, noise, alpha, sigma, prediction_type)
    weights = loss_weights(schedule.snr(t), prediction_type, snr_gamma, debiased)
    loss = diffusion_loss(model(x_t, t), target, weights)
"""

from __future__ import annotations

import math
import warnings

import torch

from ..parameterization import MODEL_PREDICTION_TYPES, SingularParameterizationError, convert, from_x0_eps
from ..schedule import VPSchedule, dynamic_shift_flow_sigmas, shift_flow_sigmas

TIMESTEP_SCHEMES = ("uniform", "logit_normal")
REDUCTIONS = ("mean", "sum", "none")
# Debiased estimation is evaluated on SNR clamped into this range (see :func:`loss_weights`): sd-scripts
# clamps at 1000 from above; we add the mirror image 1/1000 from below so the epsilon weight stays finite
# (<= sqrt(1000) ~ 31.6) at SNR = 0.
DEBIASED_SNR_RANGE = (1e-3, 1e3)

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


# --- noise, noisy inputs and targets --------------------------------------------------------------


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


# --- timesteps --------------------------------------------------------------------------------------


def sample_timesteps(
    batch_size: int,
    schedule: VPSchedule,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    scheme: str = "uniform",
    timestep_shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Integer training timesteps in ``[0, T-1]`` (``T = schedule.num_train_timesteps``), dtype ``long``.

    A fraction ``u`` in ``[0, 1)`` is drawn by ``scheme``:

    * ``"uniform"``: ``u ~ U(0, 1)``;
    * ``"logit_normal"``: ``u = sigmoid(logit_mean + logit_std * n)``, ``n ~ N(0, 1)`` (Esser et al. 2024,
      arXiv:2403.03206, eq. 19), which concentrates on the middle timesteps;

    then shifted by ``k = timestep_shift`` with the SD3 shift (Esser et al. 2024, eq. 23; the same function as
    the flow schedulers' shift) ``u' = k * u / (1 + (k - 1) * u)`` and mapped to ``t = min(floor(T * u'), T-1)``.
    ``k = 1`` with ``"uniform"`` is exactly uniform over the ``T`` integers (``floor(T*u)``, unlike
    ``round(u * (T-1))``, does not halve the two end bins). For ``k != 1`` the density of ``u'`` is
    ``k / (k - (k - 1) * u')**2``: it rises from ``1/k`` at ``u' = 0`` to ``k`` at ``u' = 1``, so ``k > 1`` draws
    noisier timesteps (the noisiest/cleanest density ratio is ``k**2``) and ``k < 1`` cleaner ones.
    The shift acts on the timestep index, whatever the schedule's SNR at that index.

    The draw happens on ``generator``'s device (CPU if none); the result is moved to ``device`` if given.
    """
    if scheme not in TIMESTEP_SCHEMES:
        raise ValueError(f"unknown timestep sampling scheme {scheme!r}; allowed: {', '.join(TIMESTEP_SCHEMES)}.")
    if not (isinstance(timestep_shift, (int, float)) and math.isfinite(timestep_shift) and timestep_shift > 0):
        raise ValueError(
            f"timestep_shift must be a finite number > 0 (1 = no shift, > 1 = noisier, < 1 = cleaner), "
            f"got {timestep_shift!r}."
        )
    if scheme == "logit_normal" and not (math.isfinite(logit_mean) and logit_std > 0 and math.isfinite(logit_std)):
        raise ValueError(f"logit_normal needs a finite logit_mean and logit_std > 0, got {logit_mean}, {logit_std}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    T = schedule.num_train_timesteps
    draw_device = generator.device if generator is not None else "cpu"
    if scheme == "uniform":
        u = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
    else:
        n = torch.randn(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
        u = torch.sigmoid(logit_mean + logit_std * n)
    if timestep_shift != 1:
        u = shift_flow_sigmas(u, float(timestep_shift))
    t = (u * T).floor().long().clamp(0, T - 1)
    return t if device is None else t.to(device)


# --- loss weighting --------------------------------------------------------------------------------


def loss_weights(
    snr: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
    debiased: bool = False,
    debiased_snr_range: tuple[float, float] = DEBIASED_SNR_RANGE,
) -> torch.Tensor:
    """Per-sample weights that multiply the per-sample MSE of the ``prediction_type`` target.

    ``snr`` (``[B]``, values in ``[0, inf]``) must be the SNR of the schedule actually trained, i.e.
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
    _check_prediction_type(prediction_type)
    snr = torch.as_tensor(snr)
    work = torch.promote_types(snr.dtype, torch.float32) if snr.is_floating_point() else torch.float32
    snr = snr.to(work)
    if not bool((snr >= 0).all()):
        raise ValueError("snr must lie in [0, inf] (no NaN, no negative values).")
    if snr_gamma is not None and not snr_gamma >= 0:
        raise ValueError(f"snr_gamma must be > 0 (or None / 0 to disable min-SNR weighting), got {snr_gamma}.")
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


# --- configuration checks and the loss --------------------------------------------------------------


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
) -> torch.Tensor:
    """Weighted MSE: per-sample mean of ``(model_output - target)**2`` over all non-batch dimensions, times
    ``weights`` (``[B]``, e.g. from :func:`loss_weights`), then the mean (``"mean"``) or sum (``"sum"``) over the
    batch, or the ``[B]`` per-sample losses (``"none"``).

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
    per_sample = error.square().reshape(len(error), -1).mean(dim=1)
    if weights is not None:
        weights = torch.as_tensor(weights).to(per_sample.device, work)
        if weights.shape != per_sample.shape:
            raise ValueError(f"weights must have shape [B] = [{len(per_sample)}], got {tuple(weights.shape)}.")
        per_sample = per_sample * weights
    if reduction == "none":
        return per_sample
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


# --- flow matching ---------------------------------------------------------------------------------

#: diffusers' SD3/Flux ``--weighting_scheme`` values: the first three choose the density of the training
#: time ``s``, the last two a loss weight with uniform ``s`` (one flag for both, as in diffusers)
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")
#: the smallest flow time drawn; diffusers' training grid ``s = k / 1000`` also ends at 1/1000, and it keeps
#: ``sigma_sqrt``'s weight ``1 / s**2`` finite
FLOW_SIGMA_MIN = 1e-3
# f_mode is a bijection of [0, 1] only for mode_scale in [-1, 2 / (pi - 2)] (its derivative changes sign outside)
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))


def check_flow_weighting(weighting_scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                         mode_scale: float = 1.29) -> None:
    """Reject an unknown ``weighting_scheme`` or parameters that make its density improper."""
    if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
        raise ValueError(f"unknown weighting_scheme {weighting_scheme!r}; allowed: "
                         f"{', '.join(FLOW_WEIGHTING_SCHEMES)}.")
    if weighting_scheme == "logit_normal" and not (math.isfinite(logit_mean) and math.isfinite(logit_std)
                                                   and logit_std > 0):
        raise ValueError(f"weighting_scheme 'logit_normal' needs a finite logit_mean and logit_std > 0, got "
                         f"logit_mean={logit_mean}, logit_std={logit_std}.")
    if weighting_scheme == "mode" and not MODE_SCALE_RANGE[0] <= mode_scale <= MODE_SCALE_RANGE[1]:
        raise ValueError(f"mode_scale must lie in [-1, 2/(pi-2) = {MODE_SCALE_RANGE[1]:.4f}] for the mode density "
                         f"to be a bijection of [0, 1] (Esser et al. 2024, eq. 20), got {mode_scale}.")


def sample_flow_sigmas(
    batch_size: int,
    generator: torch.Generator | None = None,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    mu: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flow times ``s`` in ``[FLOW_SIGMA_MIN, 1)`` (float64, ``[B]``; ``s = 1`` is pure noise).

    ``u`` is drawn by the density of ``weighting_scheme`` (Esser et al. 2024, arXiv:2403.03206, §3.1):

    * ``"logit_normal"``: ``u = sigmoid(logit_mean + logit_std * n)``, ``n ~ N(0, 1)`` (eq. 19);
    * ``"mode"``: ``u = 1 - v - mode_scale * (cos(pi v / 2)**2 - 1 + v)``, ``v ~ U(0, 1)`` (eq. 20);
    * ``"none"``, ``"sigma_sqrt"``, ``"cosmap"``: uniform (these weight the loss instead, :func:`flow_loss_weights`).

    Then the shift: ``mu`` given -> Flux's resolution-dependent ``e^mu / (e^mu + (1/u - 1))``; else the static
    SD3 shift ``shift * u / (1 + (shift - 1) * u)`` (eq. 23; ``shift = 1`` is none). Both are the functions the
    flow scheduler applies at sampling time, so training and sampling concentrate on the same times.
    """
    check_flow_weighting(weighting_scheme, logit_mean, logit_std, mode_scale)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0 (1 = none), got {shift!r}.")
    if mu is not None and not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}.")
    draw_device = generator.device if generator is not None else "cpu"
    if weighting_scheme == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
        u = torch.sigmoid(logit_mean + logit_std * n)
    else:
        u = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
        if weighting_scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if mu is not None:
        u = dynamic_shift_flow_sigmas(u, mu)
    elif shift != 1:
        u = shift_flow_sigmas(u, float(shift))
    s = u.clamp(FLOW_SIGMA_MIN, 1.0)
    return s if device is None else s.to(device)


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
) -> torch.Tensor:
    """The rectified-flow loss ``|u_model - (noise - x0)|**2`` for a model of any parameterization.

    ``noisy = alpha * x0 + sigma * noise`` is the model input at the levels it was evaluated at: flow levels
    ``(1 - s, s)`` for a flow transformer, or the VP levels at equal SNR for a VP model trained as a flow
    (:class:`diffusers_ztsnr.adapters.VPModelAsFlow`); the velocity ``noise - x0`` is the same quantity in both
    coordinates. ``model_output`` is converted to ``flow_prediction`` with the one conversion of
    :mod:`diffusers_ztsnr.parameterization` (no-op for a flow model). With ``precondition_outputs`` the loss is on
    ``x0`` instead (diffusers' ``--precondition_outputs``: the output turned into ``x0 = x_s - s * u``, compared
    with ``x0``), which needs a model whose output determines ``x0`` at every level trained.
    """
    _check_prediction_type(prediction_type)
    target_type = "sample" if precondition_outputs else "flow_prediction"
    work = noisy.float() if noisy.dtype in (torch.float16, torch.bfloat16) else noisy
    try:
        prediction = convert(model_output.to(work.dtype), work, alpha, sigma, prediction_type, target_type)
    except SingularParameterizationError as error:
        raise ValueError(f"cannot train a {prediction_type} model on this flow objective: {error}") from error
    target = x0 if precondition_outputs else noise - x0
    return diffusion_loss(prediction, target.to(prediction.dtype), weights)
