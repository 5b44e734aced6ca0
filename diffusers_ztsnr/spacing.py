"""Timestep grids for sampling a discrete VP schedule.

Every function returns a strictly decreasing grid of timesteps in ``[0, T-1]`` (``T-1`` noisiest).
A sampler walks the grid and then takes one last step to clean data; the next timestep of a step
is always the next entry of the grid (diffusers' DDIM recomputes ``t - T // n`` instead, which is
off by one whenever ``n`` does not divide ``T``).

``linspace``, ``leading`` and ``trailing`` reproduce diffusers' spacings exactly (Lin et al. 2023,
Table 2; ``trailing`` is ComfyUI's ``sgm_uniform``). ``trailing`` starts at ``T-1``, the only
timestep with SNR 0 on a ZTSNR schedule, but its last entry is ``T/n - 1``, so a few-step sampler
ends far from clean data and loses fine detail. Our spacings keep the SNR-0 start and end at
``t = 0``:

* ``logsnr`` (every scheduler's default): ``T-1``, then the rest uniform in log-SNR from ``t = T-2`` down
  to ``t = 0``; the first step lands at ``sigma/alpha ~ 2000``, which keeps the high-variance global
  brightness direction (see :mod:`diffusers_ztsnr.lighting`);
* ``flow``: uniform in the flow time at equal SNR, ``s = sigma / (alpha + sigma)`` (:func:`~.schedule.vp_to_flow`),
  from ``t = T-1`` to ``t = 0``, the grid rectified-flow models are sampled on: more accurate for unit-scale
  detail with first-order samplers, but its first step lands at ``sigma/alpha ~ n``, which shrinks the
  brightness direction at few steps;
* ``karras``: ``T-1``, then Karras et al. (2022, eq. 5, ``rho = 7``) in ``sigma/alpha`` over the
  same range (only for schedulers that accept fractional timesteps).

The flow path (``x_s = (1 - s) x0 + s eps``, ``s = 1`` pure noise) gets the same ``logsnr`` grid from
:func:`flow_logsnr_grid`: ``s = 1``, then uniform in log-SNR over the sampling path's trained range.
"""

from __future__ import annotations

import math

import torch

from .schedule import FlowPath, VPSchedule, flow_to_vp, vp_to_flow

SPACINGS = ("linspace", "leading", "trailing", "logsnr", "logsnr_warped", "flow")
#: ``(a, b)`` of the ``logsnr_warped`` spacing's map ``u -> 1 - (1 - u**a)**b`` of the log-SNR range
LOGSNR_WARP = (0.8, 1.1)


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must lie in [1, num_train_timesteps="
            f"{num_train_timesteps}]."
        )


def unique_descending_integers(ideal: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Round a decreasing real grid to distinct integers in ``[0, T-1]``, keeping both ends.

    Where rounding would repeat a timestep, the entry moves down by one, leaving room for the rest
    (entry ``i`` of ``n`` is at least ``n-1-i``), so the result always has ``len(ideal)`` entries.
    """
    n = len(ideal)
    rounded = ideal.round().long().clamp(0, num_train_timesteps - 1).tolist()
    out: list[int] = []
    for i, value in enumerate(rounded):
        upper = out[-1] - 1 if out else num_train_timesteps - 1
        out.append(max(min(value, upper), n - 1 - i))
    return torch.tensor(out, dtype=torch.long)


def discrete_timesteps(
    schedule: VPSchedule, num_inference_steps: int, spacing: str, steps_offset: int = 0
) -> torch.Tensor:
    """Integer timestep grid (descending, int64) of ``num_inference_steps`` entries."""
    T, n = schedule.num_train_timesteps, num_inference_steps
    check_num_inference_steps(n, T)
    if spacing == "linspace":
        # diffusers: np.linspace(0, T - 1, n).round()[::-1]
        return torch.linspace(0, T - 1, n, dtype=torch.float64).round().long().flip(0)
    if spacing == "leading":
        grid = torch.arange(n, dtype=torch.long).flip(0) * (T // n) + steps_offset
        if int(grid[0]) > T - 1:
            raise ValueError(
                f"timestep_spacing='leading' with steps_offset={steps_offset} reaches timestep {int(grid[0])} "
                f"> {T - 1} at num_inference_steps={n}; use timestep_spacing='trailing' or fewer steps."
            )
        return grid
    if spacing == "trailing":
        # diffusers: np.round(np.arange(T, 0, -T / n)) - 1, evaluated without float drift
        return torch.tensor([round(T - i * T / n) - 1 for i in range(n)], dtype=torch.long)
    if spacing == "logsnr":
        return unique_descending_integers(logsnr_grid(schedule, n), T)
    if spacing == "logsnr_warped":
        return unique_descending_integers(logsnr_grid(schedule, n, warped=True), T)
    if spacing == "flow":
        return unique_descending_integers(flow_time_grid(schedule, n), T)
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; allowed: {', '.join(SPACINGS)}.")


def logsnr_grid(schedule: VPSchedule, n: int, warped: bool = False) -> torch.Tensor:
    """Fractional timesteps: ``T-1``, then ``n-1`` points uniform in log-SNR from ``T-2`` down to ``t = 0``;
    ``warped``: at ``1 - (1 - u**a)**b`` of that range for uniform ``u`` (:data:`LOGSNR_WARP`), sparser at the noisy
    end and denser toward clean data, where high-order multistep samplers make their largest errors.

    The first finite point stays at ``T-2`` (``sigma/alpha ~ 2000`` after SD's ZTSNR rescale) on purpose: the
    global-brightness direction of an image has variance ``N * s_b**2`` (``N`` latents), thousands for a
    64x64x4 latent, and a first step that lands at a smaller ``sigma/alpha`` shrinks it (see
    :mod:`diffusers_ztsnr.lighting`: landing at log-SNR -6 kept 53% of the brightness std)."""
    T = schedule.num_train_timesteps
    if n == 1:
        return torch.tensor([T - 1.0], dtype=torch.float64)
    hi, lo = float(schedule.log_snr(T - 2)), float(schedule.log_snr(0))
    u = torch.linspace(0, 1, n - 1, dtype=torch.float64)
    if warped:
        a, b = LOGSNR_WARP
        u = 1 - (1 - u**a) ** b
    rest = schedule.timestep_from_log_snr(hi + (lo - hi) * u)
    rest[-1] = 0  # exact end, whatever the inversion's rounding
    return torch.cat([torch.tensor([T - 1.0], dtype=torch.float64), rest])


def flow_time_grid(schedule: VPSchedule, n: int) -> torch.Tensor:
    """Fractional timesteps uniform in ``s = sigma / (alpha + sigma)`` from ``T-1`` to ``0``."""
    T = schedule.num_train_timesteps
    if n == 1:
        return torch.tensor([T - 1.0], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([T - 1.0, 0.0], dtype=torch.float64))
    s_ends, _ = vp_to_flow(alpha, sigma)
    s = torch.linspace(float(s_ends[0]), float(s_ends[1]), n, dtype=torch.float64)
    vp_alpha, _, _ = flow_to_vp(s)
    grid = schedule.timestep_from_alpha(vp_alpha.clamp(float(alpha[0]), float(alpha[1])))
    grid[0], grid[-1] = T - 1, 0
    return grid


def karras_grid(schedule: VPSchedule, n: int, rho: float = 7.0) -> torch.Tensor:
    """Fractional timesteps: ``T-1``, then Karras' rho-spacing in ``sigma/alpha`` from ``T-2`` to ``0``.

    Karras' formula needs a finite ``sigma_max``; on a ZTSNR schedule ``sigma/alpha`` is infinite at
    ``T-1``, so that point is kept as the first step (taken exactly in VP form) and the formula starts
    at the next timestep, instead of clamping ``alphabar_T`` as diffusers does.
    """
    T = schedule.num_train_timesteps
    if n == 1:
        return torch.tensor([T - 1.0], dtype=torch.float64)
    start = T - 2 if schedule.is_zero_terminal_snr else T - 1
    count = n - 1 if schedule.is_zero_terminal_snr else n
    ve = (schedule.sigma(torch.tensor([start, 0.0])) / schedule.alpha(torch.tensor([start, 0.0])))
    ramp = torch.linspace(0, 1, count, dtype=torch.float64)
    inv_max, inv_min = ve[0] ** (1 / rho), ve[1] ** (1 / rho)
    ve_grid = (inv_max + ramp * (inv_min - inv_max)) ** rho
    # the rho-power round trip can put the end points an ulp outside the table (every n >= 2 on the
    # non-ZTSNR linear/scaled_linear schedules raised "alpha must lie in ..."): clamp, the ends are set below
    alpha_ends = schedule.alpha(torch.tensor([start, 0.0], dtype=torch.float64))
    alpha_grid = (1 / (1 + ve_grid**2).sqrt()).clamp(float(alpha_ends[0]), float(alpha_ends[1]))
    rest = schedule.timestep_from_alpha(alpha_grid)
    rest[0], rest[-1] = start, 0
    if schedule.is_zero_terminal_snr:
        return torch.cat([torch.tensor([T - 1.0], dtype=torch.float64), rest])
    return rest


def flow_logsnr_grid(path: FlowPath, n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Flow times ``s`` (float64, decreasing): ``1`` (pure noise, SNR 0), then ``n-1`` points uniform in
    log-SNR, ``2 log((1-s)/s)``, from ``path.sigma(1 - 1/T)`` down to ``path.sigma(1/T)``: the noisiest and the
    cleanest time of diffusers' training grid after the path's shift (and ``shift_terminal``, which maps the
    cleanest to itself).

    The first step lands at ``sigma/alpha = s/(1-s)``, about ``3000`` for SD3's shift 3 and ``1000`` unshifted,
    which keeps the global-brightness direction (variance ``N * s_b**2``, about 1000 for a 64x64x4 latent);
    diffusers' grid (uniform in the unshifted time) lands at ``sigma/alpha ~ n`` and shrinks it."""
    if n == 1:
        return torch.tensor([1.0], dtype=torch.float64)
    T = num_train_timesteps
    top, bottom = (float(v) for v in path.sigma(torch.tensor([(T - 1) / T, 1 / T], dtype=torch.float64)))
    half_logsnr = torch.linspace(math.log((1 - top) / top), math.log((1 - bottom) / bottom), n - 1,
                                 dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(-half_logsnr)])
