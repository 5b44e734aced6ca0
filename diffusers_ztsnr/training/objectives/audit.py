"""The effective loss weight of an objective: how much each noise level teaches about the clean image.

Every target's squared error is a multiple of the x0 error at the same noisy input (``alpha**2 + sigma**2 = 1`` on
the VP path): ``|eps_err|**2 = SNR |x0_err|**2``, ``|v_err|**2 = (SNR + 1) |x0_err|**2``, ``|x0_err|**2`` itself,
and the flow velocity ``|u_err|**2 = |x0_err|**2 / s**2`` (on either path, with ``s = 1 / (1 + sqrt(SNR))``). The
effective weight of a noise level in x0 space is therefore::

    (share of training samples drawn there) x (loss weight: min-SNR-gamma, debiased, sigma_sqrt, cosmap)
                                            x (the target's factor above)

:func:`audit_objective` integrates it exactly (quantile quadrature of the objective's own time density, through
the same maps training draws with: :func:`.times.timesteps_from_draws`, :func:`.times.flow_sigmas_from_draws`) and
bins it by log-SNR. Two findings are flagged: no weight at SNR 0 on a schedule that reaches it (min-SNR-gamma with
a v target does that: the x0 weight is ``min(SNR, gamma)``), and most of the weight on a few timesteps (an epsilon
target puts it on the cleanest ones).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .diffusion import DiffusionObjective
from .flow_matching import FlowMatchingObjective, ResolutionShift
from .times import flow_sigmas_from_draws, timesteps_from_draws
from .weights import flow_loss_weights, loss_weights

logger = logging.getLogger(__name__)
QUADRATURE_POINTS = 200_000
#: the latent side a resolution-dependent shift is evaluated at: ``--resolution`` over the VAE factor
VAE_FACTOR = 8
#: "most weight on a few timesteps": this share of the weight in this share of the time range
CONCENTRATION = (0.5, 0.05)


def target_factor(prediction_type: str, snr: torch.Tensor) -> torch.Tensor:
    """The target's squared error per unit squared x0 error at ``snr`` (see the module docstring)."""
    if prediction_type == "epsilon":
        return snr
    if prediction_type == "v_prediction":
        return snr + 1
    if prediction_type == "sample":
        return torch.ones_like(snr)
    return (1 + snr.sqrt()) ** 2  # flow velocity: 1 / s**2


@dataclass
class WeightAudit:
    """Per log-SNR bin (``edges``, low to high; a first bin for SNR 0 when the objective draws there): the share of
    training samples and the share of the effective x0 weight; ``warnings`` in words."""

    edges: list[tuple[float, float]]
    sample_share: list[float]
    weight_share: list[float]
    warnings: list[str] = field(default_factory=list)

    def table(self, warnings: bool = True) -> str:
        rows = ["log-SNR range        samples  x0 weight"]
        for (low, high), n, w in zip(self.edges, self.sample_share, self.weight_share, strict=True):
            label = "SNR 0 (pure noise)" if low == -math.inf else f"{low:+6.2f} .. {high:+6.2f}"
            rows.append(f"{label:<20} {n:7.1%}  {w:9.1%}")
        return "\n".join(rows + ([f"warning: {w}" for w in self.warnings] if warnings else []))


def _points(objective, resolution_latents: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(snr, loss weight, index in 0..999 of the time range, range size)`` at the quadrature points."""
    q = (torch.arange(QUADRATURE_POINTS, dtype=torch.float64) + 0.5) / QUADRATURE_POINTS
    if isinstance(objective, DiffusionObjective):
        t = timesteps_from_draws(q, objective.schedule, "uniform", objective.timestep_shift)
        snr = objective.snrs[t]
        weight = loss_weights(snr, objective.prediction_type, objective.snr_gamma, objective.debiased_estimation)
        return snr, weight * target_factor(objective.prediction_type, snr), t, objective.schedule.num_train_timesteps
    draws = torch.special.ndtri(q) if objective.weighting_scheme == "logit_normal" else q
    shift, mu = objective.shift, None
    if isinstance(shift, ResolutionShift):
        shift, mu = 1.0, shift.mu(torch.zeros(1, 1, resolution_latents or 128, resolution_latents or 128))
    s = flow_sigmas_from_draws(draws, objective.weighting_scheme, objective.logit_mean, objective.logit_std,
                               objective.mode_scale, shift, mu)
    if objective.min_time is not None:
        s = s.clamp(min=objective.min_time)
    snr = ((1 - s) / s) ** 2
    target = "sample" if objective.precondition_outputs else "flow_prediction"  # preconditioned: a loss on x0
    weight = flow_loss_weights(s, objective.weighting_scheme) * target_factor(target, snr)
    return snr, weight, (s * 1000).floor().long().clamp(0, 999), 1000


def audit_objective(objective: DiffusionObjective | FlowMatchingObjective, bins: int = 10,
                    resolution_latents: int | None = None) -> WeightAudit:
    """Bin the objective's effective x0 weight by log-SNR (``bins`` equal bins over the finite range it draws,
    plus SNR 0); ``resolution_latents``: the latent side a resolution-dependent shift is evaluated at."""
    snr, weight, index, size = _points(objective, resolution_latents)
    total = float(weight.sum())
    zero = snr == 0
    finite = snr[~zero].log()
    low, high = float(finite.min()), float(finite.max())
    span = max(high - low, 1e-9)
    which = ((snr.clamp(min=1e-300).log() - low) / span * bins).floor().long().clamp(0, bins - 1)
    edges = [(low + k * span / bins, low + (k + 1) * span / bins) for k in range(bins)]
    samples = [float(((which == k) & ~zero).double().mean()) for k in range(bins)]
    weights = [float(weight[(which == k) & ~zero].sum()) / total for k in range(bins)]
    if bool(zero.any()):
        edges, samples = [(-math.inf, -math.inf), *edges], [float(zero.double().mean()), *samples]
        weights = [float(weight[zero].sum()) / total, *weights]
    return WeightAudit(edges, samples, weights, _warnings(objective, snr, weight, index, size))


def _warnings(objective, snr: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, size: int) -> list[str]:
    found = []
    if bool((snr == 0).any()) and float(weight[snr == 0].max()) == 0:
        found.append("the effective x0 weight at SNR 0 is zero: the model learns nothing where sampling starts "
                     "(min-SNR-gamma with a v target, or an epsilon target, do this; drop --snr_gamma or use "
                     "--debiased_estimation)")
    per_index = torch.zeros(size, dtype=torch.float64).index_add_(0, index, weight.double())
    share, part = CONCENTRATION
    heaviest = per_index.sort(descending=True).values[: max(1, int(size * part))]
    if float(heaviest.sum()) > share * float(per_index.sum()):
        where = per_index.argmax().item()
        found.append(f"{float(heaviest.sum()) / float(per_index.sum()):.0%} of the x0 weight sits on "
                     f"{part:.0%} of the time range (heaviest at {where}/{size}, "
                     f"{'noisiest' if where > size / 2 else 'cleanest'} end)")
    return found


def audit_plot(audit: WeightAudit, path) -> None:
    """A bar chart of :class:`WeightAudit` (samples and x0 weight per log-SNR bin) written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["SNR 0" if lo == -math.inf else f"{(lo + hi) / 2:+.1f}" for lo, hi in audit.edges]
    x = torch.arange(len(labels)).tolist()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([i - 0.2 for i in x], audit.sample_share, width=0.4, label="training samples")
    ax.bar([i + 0.2 for i in x], audit.weight_share, width=0.4, label="effective x0 weight")
    ax.set_xticks(x, labels)
    ax.set_xlabel("log-SNR (bin centre)")
    ax.set_ylabel("share")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_weight_audit(objective, args, print_fn: Callable[[str], None] = print) -> WeightAudit:
    """Print the audit of the run's objective (its warnings also go to the log)."""
    audit = audit_objective(objective, resolution_latents=args.resolution // VAE_FACTOR)
    print_fn("effective loss weight in x0 space per log-SNR bin (diffusers-ztsnr audit-weights):\n"
             + audit.table(warnings=False))
    for warning in audit.warnings:
        logger.warning("loss weighting: %s", warning)
    return audit
