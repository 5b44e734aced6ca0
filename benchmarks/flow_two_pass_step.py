"""Would a two-pass second-order flow step do? Accuracy of Adams-Bashforth 2 against our DPM-Solver++(2M).

Run: ``python benchmarks/flow_two_pass_step.py`` (a few seconds). A multistep update that keeps the previous model
output ``v`` (the caller's tensor, stored at no cost) instead of the previous x0 prediction is
``x_next = x + a v + b v_prev``: two passes over the latent, as FlowMatchEuler's step, where DPM-Solver++(2M) needs
three (see the overhead section of the benchmarks page). Here ``a, b`` come from integrating ``v`` over ``s``
(``dx = v ds``) with ``v`` extrapolated linearly through the last two evaluations, in ``s`` (classic variable-step
AB2) or in log-SNR ``lambda = log((1 - s) / s)``. All rows sample the exact model of the image-like Gaussian on our
default grid with SD3's config (shift 3); cells are the worst band's |log(std ratio)|, exact
(:func:`diffusers_ztsnr.analytic.sampler_gain` for ours, the same two-run measurement for the AB2 loops).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import torch
from _common import machine_header, markdown_table

from diffusers_ztsnr import ZTSNRFlowMatchScheduler
from diffusers_ztsnr.analytic import AnalyticModel, flow_levels, image_like_gaussian, sampler_gain
from diffusers_ztsnr.testing.released_schedulers import released_scheduler_config

DATA = image_like_gaussian(8, 1)
MODEL = AnalyticModel(DATA, flow_levels(), "flow_prediction")
NODES, WEIGHTS = np.polynomial.legendre.leggauss(8)


def ab2_gain(nfe: int, tau: Callable[[float], float]) -> torch.Tensor:
    """Per-dimension gain of AB2 on our grid, ``v`` extrapolated linearly in ``tau(s)`` (Euler on the first step)."""
    scheduler = ZTSNRFlowMatchScheduler.from_config(released_scheduler_config("sd3"))
    scheduler.set_timesteps(nfe)
    s = scheduler.sigmas.double().tolist()
    x = torch.stack([torch.zeros(DATA.dim), torch.ones(DATA.dim)]).double()
    v_prev = None
    for k, t in enumerate(scheduler.timesteps):
        v = MODEL(x, t.expand(2)).double()
        x = x + (s[k + 1] - s[k]) * v
        if v_prev is not None:  # + int (tau(s') - tau(s_k)) ds' * slope, Gauss-Legendre over the step
            nodes = (s[k] + s[k + 1]) / 2 + (s[k + 1] - s[k]) / 2 * NODES
            moment = sum(w * (tau(q) - tau(s[k])) for q, w in zip(nodes, WEIGHTS, strict=True)) * (s[k + 1] - s[k]) / 2
            x = x + moment / (tau(s[k]) - tau(s[k - 1])) * (v - v_prev)
        v_prev = v
    return x[1] - x[0]


def log_snr(s: float) -> float:
    """``log((1 - s) / s)``; ``-inf`` at pure noise, so no slope is taken through the SNR-0 point."""
    return math.log((1 - s) / s) if s < 1 else -math.inf


def worst(gain: torch.Tensor) -> str:
    return f"{float((gain.abs() / DATA.variance.sqrt()).log().abs().max()):.3f}"


def main() -> int:
    torch.set_num_threads(1)
    print(machine_header() + "\n")
    nfes = (10, 20, 30)
    ours = [sampler_gain(ZTSNRFlowMatchScheduler.from_config(released_scheduler_config("sd3")), MODEL, n) for n in nfes]
    rows = [["ours DPM-Solver++(2M), 3 passes", *map(worst, ours)],
            ["AB2 in s, 2 passes", *(worst(ab2_gain(n, lambda q: q)) for n in nfes)],
            ["AB2 in log-SNR, 2 passes", *(worst(ab2_gain(n, log_snr)) for n in nfes)]]
    print(markdown_table(["step (SD3 config, our grid)", *(f"NFE {n}" for n in nfes)], rows))
    print("\ntarget: 0.15 / 0.05 / 0.03")
    return 0


if __name__ == "__main__":
    sys.exit(main())
