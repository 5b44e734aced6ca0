"""One conversion between model parameterizations: a 2x2 linear solve.

At a noise level ``(alpha, sigma)`` the noisy input is ``x_t = alpha * x0 + sigma * eps``; every
parameterization is another linear combination ``a * x0 + b * eps``:

==================  ==========================  ===================================
name                quantity                    (a, b)
==================  ==========================  ===================================
``epsilon``         ``eps``                     ``(0, 1)``
``sample``          ``x0``                      ``(1, 0)``
``v_prediction``    ``alpha*eps - sigma*x0``    ``(-sigma, alpha)`` (Salimans & Ho 2022)
``flow_prediction`` ``eps - x0``                ``(-1, 1)`` (diffusers' flow target)
``score``           ``-eps / sigma``            ``(0, -1/sigma)``
==================  ==========================  ===================================

so any one converts to any other given ``x_t`` by solving
``[[alpha, sigma], [a, b]] @ [x0, eps] = [x_t, output]``. The determinant is ``alpha*b - sigma*a``;
it vanishes in exactly the singular cases, which raise :class:`SingularParameterizationError`:
``epsilon`` (and ``score``) carry no information about ``x0`` when ``alpha = 0`` (SNR = 0);
``sample`` and ``score`` are undefined at ``sigma = 0``. ``v_prediction`` and ``flow_prediction`` are
never singular. The formulas hold on any path (VP, flow, or a VP path mapped to flow time).
"""

from __future__ import annotations

import torch

PARAMETERIZATIONS = ("epsilon", "sample", "v_prediction", "flow_prediction", "score")
# what a model may be trained to output; "score" is only a conversion target/source
MODEL_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


class SingularParameterizationError(ValueError):
    """The requested conversion has no solution at this noise level."""


Level = torch.Tensor | float


def _any(condition) -> bool:
    return bool(condition.any()) if isinstance(condition, torch.Tensor) else bool(condition)


def _coefficients(name: str, alpha: Level, sigma: Level) -> tuple[Level, Level]:
    """``(a, b)`` with ``output = a * x0 + b * eps``; plain arithmetic, so floats or tensors alike."""
    zero = 0.0 * alpha
    if name == "epsilon":
        return zero, zero + 1.0
    if name == "sample":
        return zero + 1.0, zero
    if name == "v_prediction":
        return -sigma, alpha
    if name == "flow_prediction":
        return zero - 1.0, zero + 1.0
    if name == "score":
        if _any(sigma == 0):
            raise SingularParameterizationError("the score -eps/sigma is undefined at sigma = 0 (clean data).")
        return zero, -1 / sigma
    raise ValueError(f"unknown parameterization {name!r}; allowed: {', '.join(PARAMETERIZATIONS)}.")


def solve_coefficients(parameterization: str, alpha: Level, sigma: Level) -> tuple[Level, Level, Level, Level]:
    """The 2x2 solve: ``(p, q, r, s)`` with ``x0 = p * x_t + q * output`` and ``eps = r * x_t + s * output``.

    Raises :class:`SingularParameterizationError` where the determinant ``alpha * b - sigma * a`` is 0.
    """
    a, b = _coefficients(parameterization, alpha, sigma)
    det = alpha * b - sigma * a
    if _any(det == 0):
        if parameterization in ("epsilon", "score"):
            raise SingularParameterizationError(
                f"a {parameterization} prediction carries no information about x0 at SNR = 0 (alpha = 0): "
                "at pure noise it only says 'the input is noise'. Use a v_prediction, sample or "
                "flow_prediction model there, or start sampling from a timestep with SNR > 0."
            )
        raise SingularParameterizationError(
            f"a {parameterization} prediction says nothing about the noise at sigma = 0 (clean input), "
            "so it cannot be converted there; evaluate models only at sigma > 0."
        )
    return b / det, -sigma / det, -a / det, alpha / det


def _as_level(value: Level, like: torch.Tensor) -> Level:
    if isinstance(value, (int, float)):
        return float(value)
    level = torch.as_tensor(value, dtype=torch.float64)
    if level.ndim == 0:
        return float(level)
    # broadcast a per-sample level (shape [B]) over the trailing dimensions of the data
    return level.reshape(*level.shape, *([1] * (like.ndim - level.ndim)))


def linear_combination(*terms: tuple[Level, torch.Tensor | None]) -> torch.Tensor:
    """``sum(c * t)`` over ``(c, t)`` terms, skipping zero coefficients.

    With Python-number coefficients each term is one fused kernel (``torch.add(acc, t, alpha=c)``) and a
    leading coefficient of 1 costs no multiply, which keeps a scheduler step at two kernels where the
    update allows it. Tensor coefficients (per-sample levels) broadcast as usual.
    """
    acc = None
    for c, t in terms:
        if isinstance(c, float):
            if c == 0.0:
                continue
            if abs(c - 1.0) <= 4e-16:  # 1 up to rounding of the level arithmetic
                c = 1.0
            if acc is None:
                acc = t if c == 1.0 else t * c
            else:
                acc = torch.add(acc, t, alpha=c)
        else:
            term = c.to(t.device, t.dtype) * t
            acc = term if acc is None else acc + term
    if acc is None:
        return torch.zeros_like(terms[0][1])
    return acc


def _work_dtype(sample: torch.Tensor) -> torch.dtype:
    return torch.promote_types(sample.dtype, torch.float32)


def predicted_x0(
    output: torch.Tensor, sample: torch.Tensor, alpha: Level, sigma: Level, parameterization: str
) -> torch.Tensor:
    """The ``x0`` implied by ``output`` at the noisy ``sample`` (in the working dtype, float32 at least)."""
    alpha, sigma = _as_level(alpha, sample), _as_level(sigma, sample)
    p, q, _, _ = solve_coefficients(parameterization, alpha, sigma)
    work = _work_dtype(sample)
    return linear_combination((p, sample.to(work)), (q, output.to(work)))


def to_x0_eps(
    output: torch.Tensor, sample: torch.Tensor, alpha: Level, sigma: Level, parameterization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` implied by a model ``output`` in ``parameterization`` at the noisy ``sample``.

    ``alpha``/``sigma`` are scalars or per-sample tensors of shape ``[B]``. The solve runs in float32
    at least (float64 if the inputs are float64) so fp16/bf16 latents neither overflow nor lose the
    small coefficients; the results have the dtype of ``sample``.
    """
    alpha, sigma = _as_level(alpha, sample), _as_level(sigma, sample)
    p, q, r, s = solve_coefficients(parameterization, alpha, sigma)
    work = _work_dtype(sample)
    x, y = sample.to(work), output.to(work)
    return linear_combination((p, x), (q, y)).to(sample.dtype), linear_combination((r, x), (s, y)).to(sample.dtype)


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: Level, sigma: Level, parameterization: str) -> torch.Tensor:
    """The quantity ``a * x0 + b * eps`` that a model of ``parameterization`` outputs (or is trained on)."""
    alpha, sigma = _as_level(alpha, x0), _as_level(sigma, x0)
    a, b = _coefficients(parameterization, alpha, sigma)
    work = _work_dtype(x0)
    return linear_combination((a, x0.to(work)), (b, eps.to(work))).to(x0.dtype)


def convert(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float,
    source: str, target: str,
) -> torch.Tensor:
    """Convert a model ``output`` from ``source`` to ``target`` parameterization at ``(alpha, sigma)``."""
    if source == target:
        _coefficients(source, _as_level(alpha, sample), _as_level(sigma, sample))  # validates the names
        return output
    x0, eps = to_x0_eps(output, sample, alpha, sigma, source)
    return from_x0_eps(x0, eps, alpha, sigma, target)
