"""``sum(c_k * t_k)`` over latent-sized tensors with Python-number coefficients, planned once as fused kernels.

A scheduler step is such a sum over two to four tensors (the sample, the model output, earlier x0 predictions,
noise) with coefficients that depend only on the grid. On a 1x4x128x128 latent one elementwise pass costs more
than the whole step's Python, so the number of passes is the step's cost. A plan starts from

* a term with coefficient 1, taken as it is (no pass);
* else a pair whose coefficients sum to 1, as one ``torch.lerp``: every update of the flow path
  ``x = (1 - s) x0 + s eps`` is affine in ``(x, x0, previous x0)`` (a constant field of data maps to itself),
  so its coefficients sum to 1;
* else one scaled copy;

and adds every other nonzero term in place with ``add_(t, alpha=c)``. A plan is built once per grid point and
reused for every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: a coefficient this close to 1 is 1 (rounding of the level arithmetic)
ONE_TOLERANCE = 4e-16
#: a pair whose coefficients sum to 1 within this is combined by ``lerp``; the error is this times the term
PAIR_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Combination:
    """How to compute ``sum(c_k * tensors[k])``: ``start`` then ``adds``.

    ``start`` is ``()`` (all coefficients are 0), ``(k,)`` (``tensors[k]`` itself), ``(k, c)`` (``c *
    tensors[k]``) or ``(i, j, w)`` (``torch.lerp(tensors[i], tensors[j], w)``); ``adds`` are ``(k, c)`` pairs.
    """

    start: tuple
    adds: tuple[tuple[int, float], ...] = ()

    def __call__(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        start, adds = self.start, self.adds
        if len(start) == 1:
            acc = tensors[start[0]]
            if not adds:
                return acc
            k, c = adds[0]
            acc = torch.add(acc, tensors[k], alpha=c)  # out of place: the taken tensor is the caller's
            adds = adds[1:]
        elif len(start) == 2:
            acc = tensors[start[0]] * start[1]
        elif len(start) == 3:
            acc = torch.lerp(tensors[start[0]], tensors[start[1]], start[2])
        else:
            return torch.zeros_like(tensors[0])
        for k, c in adds:
            acc.add_(tensors[k], alpha=c)
        return acc


def plan_combination(coefficients: Sequence[float]) -> Combination:
    """The plan for ``sum(coefficients[k] * t_k)``; zero coefficients are skipped (their tensor may be ``None``)."""
    terms = [(k, 1.0 if abs(c - 1.0) <= ONE_TOLERANCE else float(c)) for k, c in enumerate(coefficients) if c != 0]
    if not terms:
        return Combination(())
    start = _unit_or_affine_start(terms) or terms[0]
    used = start[:2] if len(start) == 3 else start[:1]
    return Combination(start, tuple(term for term in terms if term[0] not in used))


def _unit_or_affine_start(terms: list[tuple[int, float]]) -> tuple | None:
    for k, c in terms:
        if c == 1.0:
            return (k,)
    for n, (i, ci) in enumerate(terms):
        for j, cj in terms[n + 1:]:
            if abs(ci + cj - 1.0) <= PAIR_TOLERANCE:
                return (i, j, cj)
    return None
