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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    Calling it runs a function built once from the plan (a sampling step's Python is part of its cost).
    """

    start: tuple
    adds: tuple[tuple[int, float], ...] = ()
    run: Callable[[Sequence[torch.Tensor | None]], torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", _compile(self.start, self.adds))

    def __call__(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return self.run(tensors)


def _compile(start: tuple, adds: tuple[tuple[int, float], ...]) -> Callable:
    if not start:
        return lambda t: torch.zeros_like(t[0])
    if len(start) == 1:
        (k,) = start
        if not adds:
            return lambda t: t[k]
        (a, c), rest = adds[0], adds[1:]
        first = lambda t: torch.add(t[k], t[a], alpha=c)  # noqa: E731 (out of place: the taken tensor is the caller's)
    elif len(start) == 2:
        k, c0 = start
        first, rest = (lambda t: t[k] * c0), adds
    else:
        i, j, w = start
        first, rest = (lambda t: torch.lerp(t[i], t[j], w)), adds
    if not rest:
        return first
    if len(rest) == 1:
        (b, cb), = rest
        return lambda t: first(t).add_(t[b], alpha=cb)

    def run(t):
        acc = first(t)
        for m, cm in rest:
            acc.add_(t[m], alpha=cm)
        return acc

    return run


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
