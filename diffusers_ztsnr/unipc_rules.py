"""UniPC (Zhao et al. 2023, arXiv:2302.04867) as stateless update rules, data prediction, ``B(h) = e^h - 1`` ("bh2").

Notation (diffusers' and the paper's): ``lambda = log(alpha / sigma)``, a step ``h = lambda_next - lambda``,
``hh = -h``; earlier points enter through ``r_k = (lambda_{i-k} - lambda_i) / h`` (negative) and
``D_k = (x0_{i-k} - x0_i) / r_k``. The weights ``rho`` solve ``R rho = b`` with ``R[j][k] = r_k**j`` and
``b_j = j! * phi_{j+1}(hh) / B(h)`` (``phi_1(hh) = e^hh - 1``, ``phi_{j+1} = phi_j / hh - 1 / j!``).

* UniP-p, the predictor from point ``i``: ``x_next = (sigma_n / sigma) x + alpha_n (1 - e^{-h}) x0_i
  - alpha_n B(h) sum_k rho_k D_k`` over the ``p - 1`` earlier points (``rho = 0.5`` at ``p = 2``, where it is
  DPM-Solver++(2M), midpoint).
* UniC-p, the corrector at point ``i``: the step that led here re-taken with this point's x0 as one more
  point (``r = 1``); the model is not evaluated again at the corrected sample. It moves the sample by
  ``alpha_i (1 - e^{-h}) (corrector residual - predictor residual)``, a combination of x0 predictions that
  :func:`unipc_update` folds into the next step through its ``x`` coefficient.

Points are usable while they have SNR > 0 (a step from SNR 0 has no finite ``h``), and the step before this one
is used only while it is at least ``MIN_STEP_RATIO`` times this one, as in
:func:`diffusers_ztsnr.solvers.dpmpp_2m_update`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .solvers import Level, Update, dpmpp_2m_update, second_order_ratio

#: the longest step (in ``lambda = log(alpha / sigma)``) taken at third order: a Gaussian band's x0 prediction
#: varies on a log-SNR scale of about one, and a cubic extrapolated further than that amplifies its error
#: (measured on the image-like Gaussian: at 10 evaluations, third order everywhere leaves 24% in every band)
MAX_THIRD_ORDER_STEP = 0.7

#: x0 weights keyed by how many points back (0: this point)
Weights = dict[int, float]


def unipc_update(levels: Sequence[Level], next_level: Level, order: int = 2, final_step: str = "first_order") -> Update:
    """The UniC corrector at ``levels[-1]``, then the UniP predictor of up to ``order`` to ``next_level``.

    ``levels``: this point's level last, after up to ``order`` earlier ones (the corrector of an order-``p`` step
    uses ``p`` of them). The last step, to clean data, is :func:`~diffusers_ztsnr.solvers.dpmpp_2m_update`'s
    ``final_step``."""
    level, earlier = levels[-1], list(levels[:-1])[::-1]  # earlier: most recent first
    if next_level[1] == 0 or order == 1:
        previous = earlier[0] if earlier and order > 1 else None
        step = dpmpp_2m_update(level, next_level, previous, "midpoint", final_step if order > 1 else "first_order")
        predictor = {0: step.x0, 1: step.previous_x0}
    else:
        step = dpmpp_2m_update(level, next_level, None)
        predictor = _unip_residual(level, next_level, earlier, order)
        predictor[0] = predictor.get(0, 0.0) + step.x0
    weights = dict(predictor)
    if step.x:
        for k, w in _unic_move(level, earlier, order).items():
            weights[k] = weights.get(k, 0.0) + step.x * w
    return Update(x=step.x, x0=weights.get(0, 0.0), previous_x0=weights.get(1, 0.0),
                  earlier_x0=tuple(weights.get(k, 0.0) for k in range(2, 1 + max(weights, default=1))))


def predictor_order(level: Level, next_level: Level, earlier: Sequence[Level], order: int) -> int:
    """The order UniP takes from ``level``: 1 plus the usable earlier points, at most ``order``."""
    if order == 1 or second_order_ratio(level, next_level, earlier[0] if earlier else None) is None:
        return 1
    usable = 1
    while usable < min(order - 1, len(earlier)) and earlier[usable][0] > 0:
        usable += 1
    if usable == 2 and next_level[1] > 0 and _lam(next_level) - _lam(level) > MAX_THIRD_ORDER_STEP:
        usable = 1
    return usable + 1


def _unip_residual(level: Level, next_level: Level, earlier: Sequence[Level], order: int) -> Weights:
    """x0 weights of ``-alpha_n B(h) sum_k rho_k D_k``, the predictor beyond first order."""
    p = predictor_order(level, next_level, earlier, order)
    if p == 1:
        return {}
    h = _lam(next_level) - _lam(level)
    r = [(_lam(e) - _lam(level)) / h for e in earlier[: p - 1]]
    rho = [0.5] if p == 2 else _solve([[rk**j for rk in r] for j in range(p - 1)], _b(-h, p - 1))
    scale = -next_level[0] * math.expm1(-h)  # -alpha_n B(h)
    return _d_weights(rho, r, scale)


def _unic_move(level: Level, earlier: Sequence[Level], order: int) -> Weights:
    """x0 weights of UniC's move of the sample at ``level`` (empty where the step that led here had no finite h)."""
    if not earlier or earlier[0][0] == 0:
        return {}
    start, before = earlier[0], earlier[1:]
    q = predictor_order(start, level, before, order)  # the order the step that led here was taken at
    h = _lam(level) - _lam(start)
    r = [(_lam(e) - _lam(start)) / h for e in before[: q - 1]]
    a = level[0] * -math.expm1(-h)  # alpha (1 - e^{-h})
    rho_c = [0.5] if q == 1 else _solve([[rk**j for rk in [*r, 1.0]] for j in range(q)], _b(-h, q))
    rho_p = [] if q == 1 else [0.5] if q == 2 else _solve([[rk**j for rk in r] for j in range(q - 1)], _b(-h, q - 1))
    # corrector residual - predictor residual, with D_k on the interval's start (one point back) as base
    diff = [c - (rho_p[k] if k < len(rho_p) else 0.0) for k, c in enumerate(rho_c[:-1])]
    shifted = {k + 1: w for k, w in _d_weights(diff, r, a).items()}  # D_k of the start: points k + 1 back
    shifted[0] = shifted.get(0, 0.0) + a * rho_c[-1]  # (x0_i - x0_start) with r = 1
    shifted[1] = shifted.get(1, 0.0) - a * rho_c[-1]
    return shifted


def _d_weights(rho: Sequence[float], r: Sequence[float], scale: float) -> Weights:
    """x0 weights of ``scale * sum_k rho_k D_k`` with ``D_k = (x0_{k+1 back} - x0_base) / r_k`` (base: key 0)."""
    weights: Weights = {0: 0.0}
    for k, (rho_k, r_k) in enumerate(zip(rho, r, strict=False)):
        weights[k + 1] = weights.get(k + 1, 0.0) + scale * rho_k / r_k
        weights[0] -= scale * rho_k / r_k
    return weights


def _b(hh: float, count: int) -> list[float]:
    """``b_j = j! phi_{j+1}(hh) / B(h)`` for ``j = 1..count`` (UniPC's right-hand side, bh2)."""
    b_h = math.expm1(hh)
    phi, factorial, out = b_h / hh - 1, 1, []
    for j in range(1, count + 1):
        out.append(phi * factorial / b_h)
        factorial *= j + 1
        phi = phi / hh - 1 / factorial
    return out


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for these 1x1 to 3x3 systems."""
    n = len(rhs)
    m = [row[:] + [v] for row, v in zip(matrix, rhs, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda i: abs(m[i][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for i in range(col + 1, n):
            f = m[i][col] / m[col][col]
            m[i] = [a - f * c for a, c in zip(m[i], m[col], strict=True)]
    out = [0.0] * n
    for i in reversed(range(n)):
        out[i] = (m[i][n] - sum(m[i][j] * out[j] for j in range(i + 1, n))) / m[i][i]
    return out


def _lam(level: Level) -> float:
    return math.log(level[0] / level[1])
