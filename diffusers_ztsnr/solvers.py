"""Stateless update rules, written for any path ``x = alpha * x0 + sigma * eps``.

A rule maps the noise levels ``(alpha, sigma)`` of the current and next grid points to the
coefficients of a linear combination (:class:`Update`)::

    x_next = x * u.x + x0 * u.x0 + previous_x0 * u.previous_x0 + sum(e * x0_e for e, x0_e in earlier) + noise * u.noise

where ``x0`` is the model's prediction (``previous_x0`` that of the previous grid point, ``u.earlier_x0`` the
weights of those before it, most recent first) converted to data (see :mod:`diffusers_ztsnr.parameterization`).
One rule therefore serves the VP path, the flow path and a VP model run at flow times, and a scheduler
can fold the conversion ``x0 = p * x + q * output`` into the same combination. The coefficients are
written with ratios of noise levels, so nothing divides by ``alpha``: the first step from SNR 0
(``alpha = 0``) and the last step to clean data (``sigma_next = 0``) are finite and exact, with no clamp.

Known equivalences (Song et al. 2021, DDIM §4.3; Karras et al. 2022, §3): the Euler step of the
probability-flow ODE in ``sigma/alpha`` with an x0 prediction *is* the DDIM step with ``eta = 0``,
and the ancestral Euler step of k-diffusion *is* DDIM with ``eta = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Level = tuple[float, float]

#: second order only while ``h_prev / h`` is at least this: a step much longer in log-SNR than the
#: previous one would extrapolate the x0 trend far beyond where it was measured (``1 / (2r)`` blows up)
MIN_STEP_RATIO = 0.5


@dataclass(frozen=True)
class Update:
    """Coefficients of ``x``, ``x0``, the previous point's x0, noise, and (``earlier_x0``) the x0 predictions of
    the points before the previous one, most recent first."""

    x: float
    x0: float
    previous_x0: float = 0.0
    noise: float = 0.0
    earlier_x0: tuple[float, ...] = ()


def ddim_update(level: Level, next_level: Level, eta: float = 0.0) -> Update:
    """DDIM (Song et al. 2021, eq. 12) on a general path.

    ``x_next = alpha_n * x0 + sqrt(sigma_n**2 - c**2) * eps + c * noise`` with ``eps = (x - alpha x0) / sigma``
    and ``c = eta * sigma_n * sqrt(1 - (alpha * sigma_n / (alpha_n * sigma))**2)``, the DDPM posterior
    standard deviation at ``eta = 1``; it is invariant to rescaling the path, so it is the same formula
    on VP and flow paths.
    """
    (alpha, sigma), (alpha_n, sigma_n) = level, next_level
    c = 0.0
    if eta > 0 and sigma_n > 0:
        ratio = (alpha * sigma_n) / (alpha_n * sigma)
        c = eta * sigma_n * math.sqrt(max(0.0, 1.0 - ratio * ratio))
    along = math.sqrt(max(0.0, sigma_n * sigma_n - c * c)) / sigma  # weight of eps, per unit of x
    return Update(x=along, x0=alpha_n - along * alpha, noise=c)


#: how the last step, to clean data, is taken: :func:`extrapolated_final_update`, :func:`trapezoid_final_update`
#: or the first-order step (the x0 prediction, as diffusers and k-diffusion take it)
FINAL_STEPS = ("extrapolate", "trapezoid", "first_order")


def extrapolated_final_update(level: Level, next_level: Level, previous_level: Level) -> Update:
    """The last step, to clean data ``(alpha_n, 0)``: the x0 predictions at ``level`` and at an earlier
    ``previous_level`` extrapolated to zero noise (the schedulers pair the last with :func:`final_anchor_index`'s).

    With ``tau = sigma / alpha``, Tweedie's formula for the path ``y = x / alpha = x0 + tau * eps`` is
    ``x0_pred = y + tau**2 * score(y)``, and along the probability-flow ODE ``y`` itself moves by ``O(tau**2)``
    (``dy/dtau = -tau * score``); so the prediction approaches the ODE's end point as ``x0_pred(tau) = x0_end +
    c * tau**2 + O(tau**4)`` for data with a smooth density. A straight line in ``tau**2`` through the last two
    predictions removes the ``tau**2`` term: ``x0_end = w * x0 + (1 - w) * previous_x0`` with
    ``w = tau_prev**2 / (tau_prev**2 - tau**2) = 1 / (1 - e^{-2h})`` (``h`` the last step in log-SNR / 2).

    The first-order step returns ``x0`` and keeps ``s / sqrt(s**2 + tau**2)`` of detail of std ``s`` (98.2% for
    ``s = 0.15`` at SD's ``tau = 0.029``, at any step count). Detail finer than ``tau`` is not resolved by any
    step that sees the model only down to ``tau``; there both predictions grow about as ``e^{lambda}`` and this
    step returns about ``(1 - e^{-3h}) / (1 - e^{-2h})`` times the first-order one (between 1 and 1.5), where the
    trapezoid step adds noise of about ``tau / 2``. Uses no model evaluation beyond the first-order step's."""
    (alpha_n, _), (alpha, sigma), (alpha_p, sigma_p) = next_level, level, previous_level
    tau2, tau2_prev = (sigma / alpha) ** 2, (sigma_p / alpha_p) ** 2
    w = tau2_prev / (tau2_prev - tau2)
    return Update(x=0.0, x0=alpha_n * w, previous_x0=alpha_n * (1 - w))


#: the extrapolated last step pairs the last x0 prediction with the latest earlier one whose ``(sigma/alpha)**2`` is
#: at least this times the last one's, so that its weight ``tau_prev**2 / (tau_prev**2 - tau**2)`` is at most this:
#: with the previous point of a fine grid (1000 steps: weight 113) it would multiply the difference of two nearby
#: predictions, and so any error in them, by that much
FINAL_ANCHOR_RATIO = 2.0


def final_anchor_index(levels: Sequence[Level]) -> int | None:
    """For a grid of model levels ending with clean data (``levels[-1]`` has ``sigma = 0``): the latest index before
    the last model evaluation whose ``(sigma/alpha)**2`` is at least :data:`FINAL_ANCHOR_RATIO` times the last one's,
    or ``None`` (no such point at SNR > 0, or a grid that does not end at clean data)."""
    if len(levels) < 3 or levels[-1][1] != 0 or levels[-2][0] == 0:
        return None
    tau2 = (levels[-2][1] / levels[-2][0]) ** 2
    for j in range(len(levels) - 3, -1, -1):
        alpha, sigma = levels[j]
        if alpha == 0:
            return None
        if (sigma / alpha) ** 2 >= FINAL_ANCHOR_RATIO * tau2:
            return j
    return None


def trapezoid_final_update(level: Level, next_level: Level) -> Update:
    """The last step, from the smallest noise level ``(alpha, sigma)`` to clean data ``(alpha_n, 0)``, second order.

    In ``y = x / alpha`` and ``tau = sigma / alpha`` the probability-flow ODE is ``dy/dtau = (y - x0) / tau
    = -tau * score``, which vanishes at ``tau = 0`` for data with a finite score. The trapezoid rule with that zero
    end derivative gives ``y_0 = (y + x0) / 2``. The first-order step returns ``x0`` itself, a posterior mean that
    shrinks detail of std ``s`` by ``s / sqrt(s^2 + tau^2)`` (1.8% for ``s = 0.15`` at SD's ``tau = 0.029``);
    this step leaves ``(1 + r^2/2) / sqrt(1 + r^2)`` with ``r = tau / s`` (0.02% there), using the one model
    evaluation the first-order step uses. The zero end derivative is only reached below the data's finest scale:
    for detail with ``s << tau`` the velocity is still about constant at ``tau`` and the step leaves noise of
    about ``tau / 2`` where the first-order step leaves ``s**2 / tau``; hence an option, not the default."""
    (alpha, _sigma), (alpha_n, _) = level, next_level
    return Update(x=alpha_n / (2 * alpha), x0=alpha_n / 2)


def dpmpp_2m_update(
    level: Level, next_level: Level, previous_level: Level | None = None, solver_type: str = "midpoint",
    final_step: str = "first_order",
) -> Update:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) in data-prediction form.

    With ``lambda = log(alpha / sigma)`` and ``h = lambda_n - lambda``, the exponential factor
    ``e^{-h} = (alpha * sigma_n) / (sigma * alpha_n)`` is computed as that ratio, which is finite at
    both ends (0 when ``alpha = 0`` or ``sigma_n = 0``). The second-order correction needs finite step
    sizes, so the step is first order when the previous point had SNR 0, when there is no previous prediction,
    or when the step is over twice the previous one in log-SNR. The last step, to clean data, is ``final_step``:
    :func:`extrapolated_final_update` (where the two last levels have SNR > 0), :func:`trapezoid_final_update`, or
    first order.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type={solver_type!r}; allowed: 'midpoint', 'heun'.")
    (alpha, sigma), (alpha_n, sigma_n) = level, next_level
    if sigma_n == 0 and alpha > 0 and sigma > 0:
        if final_step == "trapezoid":
            return trapezoid_final_update(level, next_level)
        if (final_step == "extrapolate" and previous_level is not None and previous_level[0] > 0
                and previous_level[1] / previous_level[0] > sigma / alpha):
            return extrapolated_final_update(level, next_level, previous_level)
    decay = (alpha * sigma_n) / (sigma * alpha_n)  # e^{-h}
    first = Update(x=sigma_n / sigma, x0=alpha_n * (1 - decay))
    ratio = second_order_ratio(level, next_level, previous_level)
    if ratio is None:
        return first
    h = math.log(alpha_n / sigma_n) - math.log(alpha / sigma)
    weight = 0.5 if solver_type == "midpoint" else (1 - (1 - decay) / h) / (1 - decay)
    # D = x0 + weight * D1, D1 = (x0 - previous_x0) / ratio (diffusers' notation)
    k = weight / ratio
    return Update(x=first.x, x0=first.x0 * (1 + k), previous_x0=-first.x0 * k)


def second_order_ratio(level: Level, next_level: Level, previous_level: Level | None) -> float | None:
    """``h_prev / h`` (log-SNR step lengths) where the multistep rule from ``level`` to ``next_level`` is second
    order, else ``None``: first order with no previous point, from or after a point of SNR 0, to clean data, for a
    zero-length step (``final_sigmas_type="sigma_min"`` after a grid ending at ``t = 0``: ``h = 0``), or when
    ``h_prev / h < MIN_STEP_RATIO``."""
    (alpha, sigma), (alpha_n, sigma_n) = level, next_level
    if previous_level is None or previous_level[0] == 0 or sigma_n == 0 or alpha == 0 or next_level == level:
        return None
    lam = math.log(alpha / sigma)
    ratio = (lam - math.log(previous_level[0] / previous_level[1])) / (math.log(alpha_n / sigma_n) - lam)
    return ratio if ratio >= MIN_STEP_RATIO else None

