"""Sampling accuracy under classifier-free guidance, on an exact Gaussian oracle: which solver order to guide with.

Run: ``python benchmarks/guided_accuracy.py`` (``--scales``, ``--nfe``, ``--json PATH``). CPU, one torch thread,
about 10 s; the numbers do not depend on the machine.

Models. The unconditional model is exact for :func:`diffusers_ztsnr.analytic.image_like_gaussian` (8 bands, band 0
the global brightness). The conditional one is exact for a Gaussian inside it: every dimension's mean moved by
``--mean-shift`` (0.7) of its std along a fixed direction, its std times 0.9 ("mild") or 0.7 ("narrow"). A pipeline
guides with ``u + w (c - u)``; both predictions are affine in ``x_t``, so the guided sample is affine in the initial
noise and each sampler's output mean and std per dimension follow from two runs in float64
(:func:`diffusers_ztsnr.analytic.sampler_affine`).

Reference. The guided probability-flow ODE is linear for Gaussians; its end is closed form up to a 1-D quadrature
(:func:`diffusers_ztsnr.analytic.guided_ode_solution`), started where each sampler starts: SNR 0 for ours and the
flow rows, ``alphabar_T = 2**-24`` for diffusers' VP rows (its clamp under ``rescale_betas_zero_snr``).

Metrics, worst over dimensions: "std" ``|log(std / reference std)|``; "W2" the Wasserstein-2 distance of the
sampled and the reference 1-D Gaussians in units of the conditional data's std (``sqrt(d_mean^2 + d_std^2)``: an
absolute error, where the log ratio magnifies dimensions that guidance narrows to a small std). VP rows:
v-prediction, SD's ``scaled_linear`` schedule rescaled to zero terminal SNR (diffusers' on ``trailing``); flow rows:
SD3's scheduler config, flow prediction.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch
from _common import machine_header, markdown_table
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler, ZTSNRFlowMatchScheduler, ZTSNRUniPCMultistepScheduler
from diffusers_ztsnr.analytic import (
    AnalyticModel,
    GaussianMixture,
    GuidedModel,
    conditional_gaussian,
    flow_levels,
    guided_ode_solution,
    image_like_gaussian,
    sampler_affine,
    vp_levels,
)
from diffusers_ztsnr.testing.released_schedulers import released_scheduler_config

OURS_VP = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
THEIRS_VP = dict(**SD_BETAS, **OURS_VP, timestep_spacing="trailing")
STD_RATIOS = {"mild": 0.9, "narrow": 0.7}


def vp_table(scheduler) -> Callable:
    """The noise table a VP scheduler samples: ours (exact SNR 0) or diffusers' (``alphabar_T`` clamped to
    ``2**-24`` under ``rescale_betas_zero_snr``, as its multistep schedulers do)."""
    if hasattr(scheduler, "schedule"):
        return vp_levels(scheduler.schedule.alphas_cumprod)
    return vp_levels(scheduler.alphas_cumprod.double().clamp(min=2**-24))


VP_ROWS = {
    "ours UniPC (default: order 3)": lambda: ZTSNRUniPCMultistepScheduler(**OURS_VP),
    "ours UniPC solver_order=2": lambda: ZTSNRUniPCMultistepScheduler(**OURS_VP, solver_order=2),
    "ours DPM++2M": lambda: ZTSNRDPMSolverMultistepScheduler(**OURS_VP),
    "diffusers UniPC trailing (order 2)": lambda: UniPCMultistepScheduler(**THEIRS_VP),
    "diffusers UniPC order 3 trailing": lambda: UniPCMultistepScheduler(**THEIRS_VP, solver_order=3),
    "diffusers DPM++2M trailing": lambda: DPMSolverMultistepScheduler(**THEIRS_VP),
}
FLOW_ROWS = {
    "ours FlowMatch (default: order 2)": lambda: ZTSNRFlowMatchScheduler.from_config(released_scheduler_config("sd3")),
    "ours FlowMatch order 1": lambda: ZTSNRFlowMatchScheduler.from_config(released_scheduler_config("sd3"),
                                                                          solver_order=1),
    "diffusers FlowMatchEuler (SD3 config)":
        lambda: FlowMatchEulerDiscreteScheduler.from_config(released_scheduler_config("sd3")),
}


def start_level(label: str, path: str) -> tuple[float, float]:
    """``(alpha, sigma)`` where the sampler starts: SNR 0, or diffusers' VP table clamped to ``alphabar_T = 2**-24``."""
    if path == "vp" and label.startswith("diffusers"):
        return (2**-12, math.sqrt(1 - 2**-24))
    return (0.0, 1.0)


def guided(scheduler, path: str, conditional: GaussianMixture, marginal: GaussianMixture, scale: float):
    """The pipeline's ``u + w (c - u)`` of the exact models on the noise table ``scheduler`` samples."""
    levels, prediction = (flow_levels(), "flow_prediction") if path == "flow" else (vp_table(scheduler), "v_prediction")
    return GuidedModel(AnalyticModel(conditional, levels, prediction), AnalyticModel(marginal, levels, prediction),
                       scale)


def errors(result, reference, conditional: GaussianMixture) -> dict:
    """Worst dimension's ``|log(std / reference std)|``, ``|mean - reference mean|`` and the W2 distance of the two
    1-D Gaussians ``sqrt(d_mean^2 + d_std^2)``, the last two in units of the conditional data's std."""
    (gain, offset), (ref_std, ref_mean) = result, reference
    if not bool(torch.isfinite(gain).all() and torch.isfinite(offset).all()):
        return {"error": "non-finite"}
    unit = conditional.variance.sqrt()
    d_mean, d_std = (offset - ref_mean) / unit, (gain.abs() - ref_std) / unit
    return {"std": float((gain.abs() / ref_std).log().abs().max()), "mean": float(d_mean.abs().max()),
            "w2": float((d_mean**2 + d_std**2).sqrt().max())}


def measure_row(label: str, make, path: str, conditional, marginal, scale: float, nfes: list[int]) -> dict:
    """Errors at each NFE against the guided ODE's exact end from where this sampler starts."""
    reference = guided_ode_solution(guided(make(), path, conditional, marginal, scale), start_level(label, path))
    out = {}
    for nfe in nfes:
        scheduler = make()
        try:
            model = guided(scheduler, path, conditional, marginal, scale)
            out[str(nfe)] = errors(sampler_affine(scheduler, model, nfe), reference, conditional)
        except Exception as exc:  # a scheduler that raises is a result
            out[str(nfe)] = {"error": f"crash ({type(exc).__name__})"}
    return out


def cell(entry: dict) -> str:
    return entry.get("error") or f"{entry['std']:.3f} / {entry['w2']:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 30], help="model evaluations per sample")
    p.add_argument("--scales", type=float, nargs="+", default=[3.0, 7.5, 12.0], help="guidance scales w")
    p.add_argument("--mean-shift", type=float, default=0.7, help="conditional mean shift, in stds")
    p.add_argument("--json", metavar="PATH", default=None, help="also write every number to PATH as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    print("# Sampling accuracy under classifier-free guidance (exact Gaussian oracle)\n")
    print(machine_header() + "\n")
    print("cells: std / W2 (worst dimension; see the module docstring)\n")
    marginal = image_like_gaussian(8, 4)
    everything = {}
    for name, ratio in STD_RATIOS.items():
        conditional = conditional_gaussian(marginal, args.mean_shift, ratio)
        for path, rows in (("vp", VP_ROWS), ("flow", FLOW_ROWS)):
            for scale in args.scales:
                results = {label: measure_row(label, make, path, conditional, marginal, scale, args.nfe)
                           for label, make in rows.items()}
                print(f"## {path} path, {name} conditional (std x {ratio}), guidance scale {scale:g}\n")
                header = ["sampler", *(f"NFE {n}" for n in args.nfe)]
                print(markdown_table(header, [[label, *(cell(r[str(n)]) for n in args.nfe)]
                                              for label, r in results.items()]) + "\n")
                everything[f"{path}/{name}/{scale:g}"] = results
    print(f"runtime: {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": machine_header(), "results": everything}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
