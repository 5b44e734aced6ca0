"""Sampling accuracy under classifier-free guidance, on an exact Gaussian oracle: which solver order to guide with.

Run: ``python benchmarks/guided_accuracy.py`` (``--scales``, ``--nfe``, ``--json PATH``). CPU, one torch thread,
about a minute; the numbers do not depend on the machine.

Models. The unconditional model is exact for :func:`diffusers_ztsnr.analytic.image_like_gaussian` (8 bands, band 0
the global brightness). The conditional one is exact for a Gaussian inside it: every dimension's mean moved by
``--mean-shift`` (0.7) of its std along a fixed direction, its std times a ratio, 0.9 ("mild") or 0.7
("narrow"). A pipeline guides with ``u + w (c - u)``; both predictions are affine in ``x_t``, so the guided sample
is affine in the initial noise and each sampler's output mean and std per dimension are exact
(:func:`diffusers_ztsnr.analytic.sampler_affine`).

Reference. The guided probability-flow ODE has no closed form (the guided prediction is no Gaussian's posterior
mean). Its solution is our DPM-Solver++(2M) at 1000 steps on the ``logsnr`` grid of the same noise table: on our
zero-SNR table for our rows, on diffusers' table (``alphabar_T`` clamped to ``2**-24``) for diffusers' rows, on the
flow path for the flow rows. "reference drift" is how far 500 steps land from it: the reference's own error is
below that.

Metrics, worst over dimensions: "std" ``|log(std / reference std)|``, "mean" ``|mean - reference mean|`` in units of
the conditional data's std. VP rows: v-prediction, SD's ``scaled_linear`` schedule rescaled to zero terminal SNR
(diffusers' on ``trailing``); flow rows: SD3's scheduler config, flow prediction.
"""

from __future__ import annotations

import argparse
import json
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
    image_like_gaussian,
    sampler_affine,
    vp_levels,
)
from diffusers_ztsnr.testing.released_schedulers import released_scheduler_config

OURS_VP = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
THEIRS_VP = dict(**SD_BETAS, **OURS_VP, timestep_spacing="trailing")
STD_RATIOS = {"mild": 0.9, "narrow": 0.7}
REFERENCE_STEPS = 1000


def clamped_table_scheduler() -> ZTSNRDPMSolverMultistepScheduler:
    """Our DPM-Solver++ on diffusers' noise table: the zero-SNR table with ``alphabar_T = 2**-24``."""
    alphabar = DPMSolverMultistepScheduler(**THEIRS_VP).alphas_cumprod.double()
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphabar[:-1]])
    betas = (1 - alphabar / previous).tolist()
    return ZTSNRDPMSolverMultistepScheduler(trained_betas=betas, prediction_type="v_prediction",
                                            timestep_spacing="logsnr")


def vp_table(scheduler) -> Callable:
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


def reference_for(label: str, path: str):
    if path == "flow":
        return ZTSNRFlowMatchScheduler.from_config(released_scheduler_config("sd3"))
    if label.startswith("diffusers"):
        return clamped_table_scheduler()
    return ZTSNRDPMSolverMultistepScheduler(**OURS_VP, timestep_spacing="logsnr")


def guided(scheduler, path: str, conditional: GaussianMixture, marginal: GaussianMixture, scale: float):
    levels, prediction = (flow_levels(), "flow_prediction") if path == "flow" else (vp_table(scheduler), "v_prediction")
    return GuidedModel(AnalyticModel(conditional, levels, prediction), AnalyticModel(marginal, levels, prediction),
                       scale)


def errors(result, reference, conditional: GaussianMixture) -> dict:
    (gain, offset), (ref_gain, ref_offset) = result, reference
    if not bool(torch.isfinite(gain).all() and torch.isfinite(offset).all()):
        return {"error": "non-finite"}
    std_error = (gain.abs() / ref_gain.abs()).log().abs().max()
    mean_error = ((offset - ref_offset).abs() / conditional.variance.sqrt()).max()
    return {"std": float(std_error), "mean": float(mean_error)}


def measure_row(label: str, make, path: str, conditional, marginal, scale: float, nfes: list[int]) -> dict:
    ref_scheduler = reference_for(label, path)
    ref_model = guided(ref_scheduler if path == "vp" else None, path, conditional, marginal, scale)
    reference = sampler_affine(ref_scheduler, ref_model, REFERENCE_STEPS)
    out = {"reference drift": errors(sampler_affine(ref_scheduler, ref_model, REFERENCE_STEPS // 2), reference,
                                     conditional)}
    for nfe in nfes:
        scheduler = make()
        try:
            model = guided(scheduler, path, conditional, marginal, scale)
            out[str(nfe)] = errors(sampler_affine(scheduler, model, nfe), reference, conditional)
        except Exception as exc:  # a scheduler that raises is a result
            out[str(nfe)] = {"error": f"crash ({type(exc).__name__})"}
    return out


def cell(entry: dict) -> str:
    return entry.get("error") or f"{entry['std']:.3f} / {entry['mean']:.3f}"


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
    print("cells: std error / mean error (worst dimension; see the module docstring)\n")
    marginal = image_like_gaussian(8, 4)
    everything = {}
    for name, ratio in STD_RATIOS.items():
        conditional = conditional_gaussian(marginal, args.mean_shift, ratio)
        for path, rows in (("vp", VP_ROWS), ("flow", FLOW_ROWS)):
            for scale in args.scales:
                results = {label: measure_row(label, make, path, conditional, marginal, scale, args.nfe)
                           for label, make in rows.items()}
                print(f"## {path} path, {name} conditional (std x {ratio}), guidance scale {scale:g}\n")
                header = ["sampler", *(f"NFE {n}" for n in args.nfe), "reference drift"]
                print(markdown_table(header, [[label, *(cell(r[str(n)]) for n in args.nfe), cell(r["reference drift"])]
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
