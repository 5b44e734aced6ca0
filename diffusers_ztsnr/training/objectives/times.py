"""Training times: integer VP timesteps and flow times, each drawn from its density and shifted.

VP timesteps are integers ``0 .. T-1`` with ``T-1`` the noisiest; flow times ``s`` lie in ``[FLOW_SIGMA_MIN, 1)``
with ``s = 1`` pure noise (diffusers' convention). Every draw happens on the generator's device, in float64.
"""

from __future__ import annotations

import math

import torch

from ...schedule import VPSchedule, dynamic_shift_flow_sigmas, shift_flow_sigmas

TIMESTEP_SCHEMES = ("uniform", "logit_normal")
#: diffusers' SD3/Flux ``--weighting_scheme`` values: the first three choose the density of the training
#: time ``s``, the last two a loss weight with uniform ``s`` (one flag for both, as in diffusers)
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")
#: the smallest flow time drawn; diffusers' training grid ``s = k / 1000`` also ends at 1/1000, and it keeps
#: ``sigma_sqrt``'s weight ``1 / s**2`` finite
FLOW_SIGMA_MIN = 1e-3
# f_mode is a bijection of [0, 1] only for mode_scale in [-1, 2 / (pi - 2)] (its derivative changes sign outside)
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))


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
    draw_device = generator.device if generator is not None else "cpu"
    draw = torch.rand if scheme == "uniform" else torch.randn
    draws = draw(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
    t = timesteps_from_draws(draws, schedule, scheme, timestep_shift, logit_mean, logit_std)
    return t if device is None else t.to(device)


def timesteps_from_draws(draws: torch.Tensor, schedule: VPSchedule, scheme: str = "uniform",
                         timestep_shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """:func:`sample_timesteps`' map from its draws (uniform in ``[0, 1)`` for ``"uniform"``, standard normal for
    ``"logit_normal"``) to timesteps: given quantiles instead of random draws it integrates the density exactly."""
    u = draws if scheme == "uniform" else torch.sigmoid(logit_mean + logit_std * draws)
    if timestep_shift != 1:
        u = shift_flow_sigmas(u, float(timestep_shift))
    T = schedule.num_train_timesteps
    return (u * T).floor().long().clamp(0, T - 1)


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
    draw = torch.randn if weighting_scheme == "logit_normal" else torch.rand
    draws = draw(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
    s = flow_sigmas_from_draws(draws, weighting_scheme, logit_mean, logit_std, mode_scale, shift, mu)
    return s if device is None else s.to(device)


def flow_sigmas_from_draws(draws: torch.Tensor, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                           logit_std: float = 1.0, mode_scale: float = 1.29, shift: float = 1.0,
                           mu: float | None = None) -> torch.Tensor:
    """:func:`sample_flow_sigmas`' map from its draws (standard normal for ``"logit_normal"``, uniform in
    ``[0, 1)`` otherwise) to flow times: given quantiles instead of random draws it integrates the density
    exactly."""
    if weighting_scheme == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * draws)
    else:
        u = draws
        if weighting_scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if mu is not None:
        u = dynamic_shift_flow_sigmas(u, mu)
    elif shift != 1:
        u = shift_flow_sigmas(u, float(shift))
    return u.clamp(FLOW_SIGMA_MIN, 1.0)
