"""Sampling accuracy of zero-terminal-SNR samplers against an exact oracle, per frequency band.

Run: ``python benchmarks/sampling_accuracy.py`` (``--json PATH`` to dump the numbers, ``--nfe`` to choose the
evaluation counts). CPU, one torch thread; the numbers do not depend on the machine, only the runtime does (about
10 s).

Data. :func:`diffusers_ztsnr.analytic.image_like_gaussian`: an analytic diagonal Gaussian whose spectrum resembles
image latents, 8 bands. Band 0 is the global-brightness direction (std 32: the global mean of a 64x64x4 latent with
per-image brightness std 0.25 has variance 16384 * 0.25**2 = 1024 in an orthonormal basis, while noise has variance
1 there; that is why a first step that lands at a modest ``sigma/alpha`` shrinks brightness, see
``diffusers_ztsnr.lighting``); bands 1-7 follow a power law from std 0.8 down to 0.15, means 0.

Model. :class:`diffusers_ztsnr.analytic.AnalyticModel`, the exact (MSE-optimal) model of that Gaussian on the
schedule each sampler uses, so every deviation is sampler (or grid) error. diffusers' VP schedulers clamp
``alphabar_T`` to ``2**-24`` under ZTSNR: their oracle is built from that clamped table.

Metric. |log(std of a band's samples / data std of the band)| for the worst band (and which), band 0 and band 7.
Measured exactly, with no sampling noise: a deterministic sampler driving the exact model of a Gaussian is linear
in its initial noise (:func:`diffusers_ztsnr.analytic.sampler_gain`). The ancestral rows are stochastic and are
sampled instead (4096 samples x 32 dims per band: sampling noise about 0.2%). NFE = model evaluations (FlowMatchHeun
makes two per step but one on the last: it is run at the largest step count within the NFE, shown with ``*``).

Tables: the VP path (v-prediction, SD's ``scaled_linear`` schedule rescaled to zero terminal SNR, diffusers rows
on ``trailing`` spacing, ``karras`` rows add ``use_karras_sigmas``; DDIM with ``clip_sample=False``, the SD configs'
value); the flow path with SD3's config (shift 3) and with Flux's dynamic shift at 1024 px (``mu`` = 1.15) under
the sigmas ``FluxPipeline`` passes. A scheduler that raises is shown as ``crash (ExceptionType)``. Our defaults'
targets are printed after each table (VP: ``ZTSNRUniPCMultistepScheduler``'s defaults). No performance
assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from _common import machine_header, markdown_table
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffusers_ztsnr import (
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
    ZTSNRUniPCMultistepScheduler,
)
from diffusers_ztsnr.analytic import AnalyticModel, flow_levels, image_like_gaussian, sampler_gain, vp_levels
from diffusers_ztsnr.schedule import flow_mu
from diffusers_ztsnr.testing.released_schedulers import released_scheduler_config

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
OURS_VP = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)
THEIRS_VP = dict(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
FLOW_SHIFT = 3.0
FLUX_MU = flow_mu((1024 // 16) ** 2)  # FluxPipeline's mu at 1024 x 1024 px
FLOW_DPM = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=FLOW_SHIFT)
#: |log gain| every band of our default must stay within, per NFE
TARGETS = {"vp": {5: 0.25, 10: 0.05, 20: 0.01, 30: 0.005}, "sd3": {10: 0.15, 20: 0.05, 30: 0.03},
           "flux": {10: 0.15, 20: 0.05, 30: 0.03}}
DEFAULT_ROW = {"vp": "ours UniPC (default)", "sd3": "ours FlowMatch (default)",
               "flux": "ours FlowMatch, use_pipeline_sigmas=False"}


@dataclass
class Row:
    label: str
    make: Callable[[], object]
    #: "ours-vp" / "theirs-vp" (oracle on our exact / diffusers' clamped table) or "flow"
    oracle: str
    #: ``set_timesteps`` keywords at a given NFE (a pipeline's sigmas and mu); default ``num_inference_steps=NFE``
    grid: Callable[[int], dict] | None = None
    stochastic: bool = False


def flux_pipeline_grid(nfe: int) -> dict:
    return {"sigmas": np.linspace(1.0, 1 / nfe, nfe), "mu": FLUX_MU}


def heun_grid(nfe: int) -> dict:
    return {"num_inference_steps": (nfe + 1) // 2}  # 2 evaluations per step, one on the last


def vp_rows() -> list[Row]:
    ours = [
        ("ours UniPC (default)", ZTSNRUniPCMultistepScheduler, {}),
        ("ours UniPC solver_order=2", ZTSNRUniPCMultistepScheduler, {"solver_order": 2}),
        ("ours UniPC timestep_spacing=logsnr", ZTSNRUniPCMultistepScheduler, {"timestep_spacing": "logsnr"}),
        ("ours UniPC final_step=first_order", ZTSNRUniPCMultistepScheduler, {"final_step": "first_order"}),
        ("ours DPM++2M", ZTSNRDPMSolverMultistepScheduler, {}),
        ("ours DPM++2M logsnr_warped", ZTSNRDPMSolverMultistepScheduler, {"timestep_spacing": "logsnr_warped"}),
        ("ours DPM++2M final_step=first_order", ZTSNRDPMSolverMultistepScheduler, {"final_step": "first_order"}),
        ("ours DPM++2M final_step=trapezoid", ZTSNRDPMSolverMultistepScheduler, {"final_step": "trapezoid"}),
        ("ours DDIM (default)", ZTSNRDDIMScheduler, {}),
        ("ours Euler (default)", ZTSNREulerScheduler, {}),
        ("ours DPM++2M trailing", ZTSNRDPMSolverMultistepScheduler, {"timestep_spacing": "trailing"}),
        ("ours DPM++2M karras", ZTSNRDPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    ]
    theirs = [
        ("diffusers DDIM trailing", DDIMScheduler, {"clip_sample": False}),
        ("diffusers Euler trailing", EulerDiscreteScheduler, {}),
        ("diffusers Euler karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}),
        ("diffusers DPM++2M trailing", DPMSolverMultistepScheduler, {}),
        ("diffusers DPM++2M karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        ("diffusers UniPC trailing", UniPCMultistepScheduler, {}),
        ("diffusers UniPC karras", UniPCMultistepScheduler, {"use_karras_sigmas": True}),
        ("diffusers UniPC order 3 trailing", UniPCMultistepScheduler, {"solver_order": 3}),
    ]
    rows = [Row(label, lambda c=cls, k=kw: c(**OURS_VP, **k), "ours-vp") for label, cls, kw in ours]
    rows += [Row(label, lambda c=cls, k=kw: c(**THEIRS_VP, **k), "theirs-vp") for label, cls, kw in theirs]
    rows += [Row("ours EulerAncestral (sampled)", lambda: ZTSNREulerAncestralScheduler(**OURS_VP), "ours-vp",
                 stochastic=True),
             Row("diffusers EulerAncestral trailing (sampled)", lambda: EulerAncestralDiscreteScheduler(**THEIRS_VP),
                 "theirs-vp", stochastic=True)]
    return rows


def sd3_rows() -> list[Row]:
    sd3 = released_scheduler_config("sd3")
    rows = [
        Row("ours FlowMatch (default)", lambda: ZTSNRFlowMatchScheduler.from_config(sd3), "flow"),
        Row("ours FlowMatch order 1", lambda: ZTSNRFlowMatchScheduler.from_config(sd3, solver_order=1), "flow"),
        Row("ours FlowMatch linspace (diffusers' grid)",
            lambda: ZTSNRFlowMatchScheduler.from_config(sd3, timestep_spacing="linspace"), "flow"),
    ]
    rows += [Row(f"diffusers FlowMatchEuler shift {s:g}", lambda s=s: FlowMatchEulerDiscreteScheduler(shift=s), "flow")
             for s in (1.0, 2.0, 3.0)]
    rows += [
        Row("diffusers FlowMatchHeun shift 3 *", lambda: FlowMatchHeunDiscreteScheduler(shift=FLOW_SHIFT), "flow",
            grid=heun_grid),
        Row("diffusers DPM++2M use_flow_sigmas shift 3",
            lambda: DPMSolverMultistepScheduler(**FLOW_DPM, final_sigmas_type="zero"), "flow"),
        Row("diffusers UniPC use_flow_sigmas shift 3",
            lambda: UniPCMultistepScheduler(**FLOW_DPM, final_sigmas_type="zero"), "flow"),
    ]
    return rows


def flux_rows() -> list[Row]:
    flux = released_scheduler_config("flux")
    return [
        Row("ours FlowMatch, use_pipeline_sigmas=False",
            lambda: ZTSNRFlowMatchScheduler.from_config(flux, use_pipeline_sigmas=False), "flow", flux_pipeline_grid),
        Row("ours FlowMatch (default: the pipeline's sigmas)", lambda: ZTSNRFlowMatchScheduler.from_config(flux),
            "flow", flux_pipeline_grid),
        Row("diffusers FlowMatchEuler (Flux config)", lambda: FlowMatchEulerDiscreteScheduler.from_config(flux),
            "flow", flux_pipeline_grid),
    ]


def oracle(row: Row, scheduler, data) -> AnalyticModel:
    if row.oracle == "flow":
        return AnalyticModel(data, flow_levels(), "flow_prediction")
    if row.oracle == "ours-vp":
        return AnalyticModel(data, vp_levels(scheduler.schedule.alphas_cumprod), "v_prediction")
    return AnalyticModel(data, vp_levels(scheduler.alphas_cumprod.double().clamp(min=2**-24)), "v_prediction")


class Counted:
    """The model, counting its calls."""

    def __init__(self, model: AnalyticModel):
        self.model, self.data, self.affine, self.calls = model, model.data, model.affine, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.model(x, t)


def sampled_std(scheduler, model, grid: dict, num: int = 4096, seed: int = 0) -> torch.Tensor:
    """Per-dimension std of ``num`` samples (for stochastic samplers)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(**grid)
    x = torch.randn(num, model.data.dim, generator=generator, dtype=torch.float64).float()
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.expand(len(x)) if t.ndim == 0 else t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x.double().std(dim=0)


def measure(row: Row, nfe: int, bands: int) -> dict:
    """Per band: log(output std / data std) at ``nfe`` evaluations; or what went wrong."""
    dims = 32 if row.stochastic else 1
    data = image_like_gaussian(bands, dims)
    try:
        scheduler = row.make()
        model = Counted(oracle(row, scheduler, data))
        grid = row.grid(nfe) if row.grid else {"num_inference_steps": nfe}
        std = sampled_std(scheduler, model, grid) if row.stochastic else sampler_gain(scheduler, model, **grid)
        if not bool(torch.isfinite(std).all()):
            return {"error": "non-finite"}
        per_dim = (std.abs() / data.variance.sqrt()).log().reshape(bands, dims)
        return {"log_gain": per_dim.mean(-1).tolist(), "calls": model.calls}
    except Exception as exc:  # a scheduler that raises is a result, not a failure of the benchmark
        return {"error": f"crash ({type(exc).__name__})", "message": str(exc)[:300]}


def cell(entry: dict, what: str) -> str:
    if "error" in entry:
        return entry["error"]
    g = entry["log_gain"]
    if what == "worst":
        k = max(range(len(g)), key=lambda i: abs(g[i]))
        return f"{abs(g[k]):.3f} (b{k})"
    return f"{g[0 if what == 'b0' else -1]:+.3f}"


def print_section(name: str, title: str, results: dict[str, dict[str, dict]], nfes: list[int]) -> None:
    print(f"## {title}\n")
    header = ["sampler", *(f"NFE {n}" for n in nfes)]
    for what, caption in (("worst", "worst band |log gain| (band)"), ("b0", "band 0 (brightness) log gain"),
                          ("last", "band 7 (finest detail) log gain")):
        print(f"{caption}:\n")
        print(markdown_table(header, [[label, *(cell(res[str(n)], what) for n in nfes)]
                                      for label, res in results.items()]))
        print()
    row = results[DEFAULT_ROW[name]]
    for nfe, bound in TARGETS[name].items():
        entry = row.get(str(nfe))
        if entry is None:
            continue
        worst = max(abs(v) for v in entry["log_gain"]) if "log_gain" in entry else math.inf
        verdict = "met" if worst <= bound else "NOT met"
        print(f"target {name} NFE {nfe}: '{DEFAULT_ROW[name]}' worst |log gain| {worst:.4f} <= {bound}: {verdict}")
    print()


SECTIONS = {
    "vp": ("VP path: v-prediction, SD's schedule rescaled to zero terminal SNR", vp_rows),
    "sd3": ("Flow path: SD3's scheduler config (shift 3)", sd3_rows),
    "flux": (f"Flow path: Flux's scheduler config at 1024 px (mu = {FLUX_MU:.2f}), FluxPipeline's sigmas", flux_rows),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 30], help="model evaluations per sample")
    p.add_argument("--bands", type=int, default=8, help="frequency bands of the Gaussian (>= 3)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="tables to run")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", metavar="PATH", default=None, help="also write every number to PATH as JSON")
    args = p.parse_args(argv)
    if args.bands < 3:
        p.error("--bands must be >= 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print("# Sampling accuracy on an exact Gaussian oracle\n")
    print(machine_header() + "\n")
    everything = {}
    for name in args.sections:
        title, make_rows = SECTIONS[name]
        results = {row.label: {str(n): measure(row, n, args.bands) for n in args.nfe} for row in make_rows()}
        print_section(name, title, results, args.nfe)
        everything[name] = results
    elapsed = time.perf_counter() - start
    print(f"runtime: {elapsed:.1f} s")
    if args.json:
        payload = {"header": machine_header(), "nfe": args.nfe, "targets": TARGETS, "results": everything}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
