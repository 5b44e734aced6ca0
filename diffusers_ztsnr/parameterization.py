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


def _coefficients(name: str, alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
    if name == "epsilon":
        return zero, one
    if name == "sample":
        return one, zero
    if name == "v_prediction":
        return -sigma, alpha
    if name == "flow_prediction":
        return -one, one
    if name == "score":
        if bool((sigma == 0).any()):
            raise SingularParameterizationError("the score -eps/sigma is undefined at sigma = 0 (clean data).")
        return zero, -1 / sigma
    raise ValueError(f"unknown parameterization {name!r}; allowed: {', '.join(PARAMETERIZATIONS)}.")


def _as_level(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    level = torch.as_tensor(value, dtype=torch.float64)
    # broadcast a per-sample level (shape [B]) over the trailing dimensions of the data
    while level.ndim and level.ndim < like.ndim:
        level = level.reshape(*level.shape, 1)
    return level


def to_x0_eps(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float,
    parameterization: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` implied by a model ``output`` in ``parameterization`` at the noisy ``sample``.

    ``alpha``/``sigma`` are scalars or per-sample tensors of shape ``[B]``. The solve runs in float32
    at least (float64 if the inputs are float64) so fp16/bf16 latents neither overflow nor lose the
    small coefficients; the results have the dtype of ``sample``.
    """
    alpha64, sigma64 = _as_level(alpha, sample), _as_level(sigma, sample)
    a, b = _coefficients(parameterization, alpha64, sigma64)
    det = alpha64 * b - sigma64 * a
    if bool((det == 0).any()):
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
    work = torch.promote_types(sample.dtype, torch.float32)
    x, y = sample.to(work), output.to(work)
    a, b, det, al, si = (c.to(device=sample.device, dtype=work) for c in (a, b, det, alpha64, sigma64))
    x0 = (b * x - si * y) / det
    eps = (al * y - a * x) / det
    return x0.to(sample.dtype), eps.to(sample.dtype)


def from_x0_eps(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float,
    parameterization: str,
) -> torch.Tensor:
    """The quantity ``a * x0 + b * eps`` that a model of ``parameterization`` outputs (or is trained on)."""
    alpha64, sigma64 = _as_level(alpha, x0), _as_level(sigma, x0)
    a, b = _coefficients(parameterization, alpha64, sigma64)
    work = torch.promote_types(x0.dtype, torch.float32)
    a, b = a.to(device=x0.device, dtype=work), b.to(device=x0.device, dtype=work)
    return (a * x0.to(work) + b * eps.to(work)).to(x0.dtype)


def convert(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float,
    source: str, target: str,
) -> torch.Tensor:
    """Convert a model ``output`` from ``source`` to ``target`` parameterization at ``(alpha, sigma)``."""
    if source == target:
        _coefficients(source, _as_level(alpha, sample), _as_level(sigma, sample))  # validates the name
        return output
    x0, eps = to_x0_eps(output, sample, alpha, sigma, source)
    return from_x0_eps(x0, eps, alpha, sigma, target)
