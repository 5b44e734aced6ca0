"""Stateless update rules, written for any path ``x = alpha * x0 + sigma * eps``.

Every rule takes the model's prediction already converted to ``(x0, eps)`` (see
:mod:`diffusers_ztsnr.parameterization`) and the noise levels ``(alpha, sigma)`` of the current and
next grid points, so one rule serves the VP path, the flow path and a VP model run at flow times.
Written this way nothing divides by ``alpha``: the first step from SNR 0 (``alpha = 0``) and the
last step to clean data (``sigma_next = 0``) are finite and exact, with no clamp.

Known equivalences (Song et al. 2021, DDIM §4.3; Karras et al. 2022, §3): the Euler step of the
probability-flow ODE in ``sigma/alpha`` with an x0 prediction *is* the DDIM step with ``eta = 0``,
and the ancestral Euler step of k-diffusion *is* DDIM with ``eta = 1``.
"""

from __future__ import annotations

import math

import torch


def ddim_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    level: tuple[float, float],
    next_level: tuple[float, float],
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on a general path, from the current ``x`` and its ``x0`` estimate.

    ``x_next = alpha_n * x0 + sqrt(sigma_n**2 - c**2) * eps + c * noise`` with ``eps = (x - alpha x0) / sigma``
    and ``c = eta * sigma_n * sqrt(1 - (alpha * sigma_n / (alpha_n * sigma))**2)``, the DDPM posterior
    standard deviation at ``eta = 1``; it is invariant to rescaling the path, so it is the same formula
    on VP and flow paths. Written as ``A * x + B * x0`` (two kernels).
    """
    (alpha, sigma), (alpha_n, sigma_n) = level, next_level
    c = 0.0
    if eta > 0 and sigma_n > 0:
        ratio = (alpha * sigma_n) / (alpha_n * sigma)
        c = eta * sigma_n * math.sqrt(max(0.0, 1.0 - ratio * ratio))
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor.")
    along = math.sqrt(max(0.0, sigma_n * sigma_n - c * c)) / sigma  # weight of eps, per unit of x
    out = torch.add(x * along, x0, alpha=alpha_n - along * alpha)
    if c > 0:
        out = out.add_(noise, alpha=c)
    return out


#: second order only while ``h_prev / h`` is at least this: a step much longer in log-SNR than the
#: previous one would extrapolate the x0 trend far beyond where it was measured (``1 / (2r)`` blows up)
MIN_STEP_RATIO = 0.5


def dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    level: tuple[float, float],
    next_level: tuple[float, float],
    previous_x0: torch.Tensor | None = None,
    previous_level: tuple[float, float] | None = None,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) in data-prediction form.

    With ``lambda = log(alpha / sigma)`` and ``h = lambda_n - lambda``, the exponential factor
    ``e^{-h} = (alpha * sigma_n) / (sigma * alpha_n)`` is computed as that ratio, which is finite at
    both ends (0 when ``alpha = 0`` or ``sigma_n = 0``). The second-order correction needs finite step
    sizes, so the step is first order when the previous point had SNR 0, when the next point is clean,
    or when there is no previous prediction.
    """
    (alpha, sigma), (alpha_n, sigma_n) = level, next_level
    decay = (alpha * sigma_n) / (sigma * alpha_n)  # e^{-h}
    x0_term = x0
    second_order = (
        previous_x0 is not None and previous_level is not None and previous_level[0] > 0 and sigma_n > 0
        and alpha > 0
    )
    if second_order:
        lam = math.log(alpha / sigma)
        h = math.log(alpha_n / sigma_n) - lam
        h_prev = lam - math.log(previous_level[0] / previous_level[1])
        ratio = h_prev / h
        if ratio >= MIN_STEP_RATIO:
            if solver_type == "midpoint":
                weight = 0.5
            elif solver_type == "heun":
                weight = (1 - (1 - decay) / h) / (1 - decay)
            else:
                raise ValueError(f"solver_type={solver_type!r}; allowed: 'midpoint', 'heun'.")
            # x0 + weight * D1 with D1 = (x0 - previous_x0) / ratio (diffusers' notation)
            x0_term = torch.add(x0 * (1 + weight / ratio), previous_x0, alpha=-weight / ratio)
    return torch.add(x * (sigma_n / sigma), x0_term, alpha=alpha_n * (1 - decay))
