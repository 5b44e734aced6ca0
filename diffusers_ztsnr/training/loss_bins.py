"""The training loss by noise level: each optimizer step's per-sample losses averaged per tenth of the time range.

The scalar loss mixes every noise level; which levels a run is learning (or not) shows only per level, as minRF and
SD3's paper plot it. The time is the objective's own, as a fraction of its range with 1 the noisiest: ``t / T`` for
the VP objective's integer timesteps (monotone in log-SNR), the flow time ``s`` for flow matching. Tracker tags are
``loss_by_noise/<from>-<to>``, one per tenth that the step's samples fell in (the samples of every process).
"""

from __future__ import annotations

import torch

BINS = 10


def noise_fraction(objective, times: torch.Tensor) -> torch.Tensor:
    """``times`` the objective returned, as a fraction of its range in [0, 1] (1: pure noise)."""
    if objective.path == "flow":
        return times.double()
    return times.double() / objective.schedule.num_train_timesteps


class LossByNoise:
    """Sums and counts of per-sample losses per tenth of the noise range, until :meth:`take`. They stay on the
    losses' device: the loop reads them with the step's loss, in its one host transfer per optimizer step."""

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, per_sample: torch.Tensor, fraction: torch.Tensor) -> None:
        device = per_sample.device
        if self.sums is None:
            self.sums = torch.zeros(self.bins, dtype=torch.float64, device=device)
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=device)
        index = (fraction.to(device) * self.bins).long().clamp(0, self.bins - 1)
        self.sums.index_add_(0, index, per_sample.detach().double())
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def take(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The sums then the counts since the last take (``2 * bins`` values, zeros when nothing was added), still
        on the device; then empty. Sum what several processes took to pool them."""
        packed = torch.zeros(2 * self.bins, dtype=torch.float64, device=device) if self.sums is None \
            else torch.cat([self.sums, self.counts])
        self.sums, self.counts = None, None
        return packed

    def tags(self, packed: list[float]) -> dict[str, float]:
        """``{tag: mean loss}`` of the non-empty tenths of what :meth:`take` returned (read on the host)."""
        sums, counts = packed[:self.bins], packed[self.bins:]
        return {f"loss_by_noise/{k / self.bins:.1f}-{(k + 1) / self.bins:.1f}": sums[k] / counts[k]
                for k in range(self.bins) if counts[k] > 0}

    def flush(self) -> dict[str, float]:
        """``{tag: mean loss}`` of the non-empty tenths since the last flush; then empty (one host transfer)."""
        return self.tags(self.take().tolist())
