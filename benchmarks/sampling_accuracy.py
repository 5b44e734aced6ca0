"""Sampling accuracy of zero-terminal-SNR samplers against an exact oracle, per frequency band.

Run: ``python benchmarks/sampling_accuracy.py`` (``--quick`` for a smoke run, ``--json PATH`` to dump
the numbers). CPU only, one torch thread by default (``--threads``); the results do not depend on the
machine, only the runtime does (about 40 s on an idle core).

Data. An analytic diagonal Gaussian whose spectrum resembles image latents: ``B`` frequency bands
(default 8) of ``D`` dimensions each (default 32).

* band 0 is the "global brightness" direction: std 32 (``BRIGHTNESS_STD``), mean 0.3. In an orthonormal
  basis the global mean of an image of ``N`` latents has variance ``N * s_b**2`` (1024 for a 64x64x4
  latent with per-image brightness std 0.25) while noise has variance 1 in every direction; that is why
  a first step that lands at a modest ``sigma/alpha`` shrinks brightness (the lighting curse of
  a non-zero terminal SNR is the same effect, see ``diffusers_ztsnr.lighting``);
* bands 1 .. B-1 follow a power law ``std ~ 1/f`` from 0.8 down to 0.15, with octave-like centre
  frequencies ``f_k`` spaced geometrically (``f_k = (0.8/0.15)^((k-1)/(B-2))``), so the stds are
  0.80, 0.61, 0.46, 0.35, 0.26, 0.20, 0.15 for ``B = 8``; all means 0.

Why the finest band stops at std 0.15: SD's schedule ends at ``sigma/alpha = 0.029`` at ``t = 0``
(``alphabar_0 = 1 - 0.00085``, unchanged by the ZTSNR rescale). The last step of any sampler on that
schedule goes from ``t = 0`` (at best) to clean data with the posterior mean, which keeps only a
fraction ``sqrt(s^2 / (s^2 + 0.029^2))`` of a band's std ``s``: 0.982 for ``s = 0.15``, 0.960 for
``s = 0.1``, 0.86 for ``s = 0.05``. Detail with std much below ~0.1 therefore cannot be resolved by any
sampler on that schedule, and a band there would measure the schedule, not the sampler. The script
prints this floor per band.

Model. :class:`diffusers_ztsnr.analytic.AnalyticModel`, the exact (MSE-optimal) v-prediction model of
that Gaussian on the schedule the sampler uses, so every deviation below is sampler (or grid) error.
For diffusers' Euler / DPM / UniPC (which clamp ``alphabar_T`` to ``2**-24`` under ZTSNR) the oracle
is built from the scheduler's own clamped table, ``vp_levels(alphas_cumprod.clamp(min=2**-24))``;
for ours from our exact table. Between integer timesteps (Karras grids) the oracle interpolates
``alpha`` linearly, diffusers interpolates ``log sigma``: the mismatch is far below the effects shown.

Metric. For each band: (std of the generated samples in that band, pooled over its ``D`` dims) /
(data std of that band), from ``N`` samples (default 2048; ``--quick``: 512) drawn from one fixed seed,
the same initial noise for every row. Sampling noise of the ratio is about ``1/sqrt(2 N D)``: 0.3% at
the defaults, 0.6% with ``--quick``. Reported at NFE 5, 10, 20, 30 (one model evaluation per step for
every sampler here): the worst band's ``|ratio - 1|`` (and which band), the ratio of band 0
(brightness) and of the last band (finest detail).

Rows (all v-prediction, SD schedule ``scaled_linear`` 0.00085 .. 0.012, 1000 steps, rescaled to zero
terminal SNR, float32 latents):

* ours with defaults (only ``prediction_type="v_prediction", rescale_betas_zero_snr=True`` passed):
  DPM-Solver++(2M) (``logsnr`` spacing), DDIM, Euler, ancestral Euler (``flow`` spacing);
* ours DPM with ``timestep_spacing="trailing"`` and with ``use_karras_sigmas=True``;
* diffusers DDIM, Euler, DPMSolverMultistep, UniPCMultistep with ``timestep_spacing="trailing"`` and
  (Euler, DPM, UniPC) ``use_karras_sigmas=True`` as separate rows; DDIM with ``clip_sample=False``
  (the SD configs' value; diffusers' default ``True`` clips x0 to [-1, 1], which would cut the
  brightness band); diffusers EulerAncestral trailing as an extra row;
* flow path: our ZTSNRFlowMatchScheduler (defaults: second-order multistep) and, as an extra row, its
  ``solver_order=1`` (Euler) vs diffusers FlowMatchEulerDiscreteScheduler, all ``shift=3.0`` (SD3),
  with the exact flow_prediction model ``AnalyticModel(data, flow_levels(), "flow_prediction")``.

A diffusers scheduler that raises is shown as ``crash (ExceptionType)``; non-finite samples as
``non-finite``. No performance assertions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import machine_header, markdown_table
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffusers_ztsnr import (
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
)
from diffusers_ztsnr.analytic import AnalyticModel, GaussianMixture, flow_levels, vp_levels

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
OURS_DEFAULT = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)
THEIRS_VP = dict(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
FLOW_SHIFT = 3.0
CHECK_LABEL = "ours DPM++2M (default: logsnr)"
CHECK_NFE, CHECK_TOL = 20, 0.05




# --- data -------------------------------------------------------------------------------------------


#: brightness band: the global-mean direction of a 64x64x4 latent (N = 16384) with per-image brightness std
#: 0.25 has variance N * 0.25**2 = 1024 (std 32) in an orthonormal basis; noise has variance 1 there
BRIGHTNESS_STD = 32.0


def band_stds(num_bands: int, top: float = 0.8, bottom: float = 0.15) -> torch.Tensor:
    """Band 0: ``BRIGHTNESS_STD``; bands 1..B-1: ``top / f_k`` with geometric ``f_k`` from 1 to top/bottom."""
    rest = num_bands - 1
    freqs = [(top / bottom) ** (k / max(rest - 1, 1)) for k in range(rest)]
    return torch.tensor([BRIGHTNESS_STD, *(top / f for f in freqs)], dtype=torch.float64)


def make_data(num_bands: int, dims: int, brightness_mean: float = 0.3) -> GaussianMixture:
    stds = band_stds(num_bands)
    mean = torch.zeros(num_bands, dims, dtype=torch.float64)
    mean[0] = brightness_mean
    var = (stds**2)[:, None].expand(num_bands, dims)
    return GaussianMixture.gaussian(mean.reshape(-1), var.reshape(-1).clone())


# --- samplers ---------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    make: Callable[[], object]
    kind: str  # "ours-vp", "theirs-vp", "flow"


def rows() -> list[Row]:
    out = [
        Row(CHECK_LABEL, lambda: ZTSNRDPMSolverMultistepScheduler(**OURS_DEFAULT), "ours-vp"),
        Row("ours DDIM (default: logsnr)", lambda: ZTSNRDDIMScheduler(**OURS_DEFAULT), "ours-vp"),
        Row("ours Euler (default: logsnr)", lambda: ZTSNREulerScheduler(**OURS_DEFAULT), "ours-vp"),
        Row("ours EulerAncestral (default: logsnr)", lambda: ZTSNREulerAncestralScheduler(**OURS_DEFAULT), "ours-vp"),
        Row(
            "ours DPM++2M trailing",
            lambda: ZTSNRDPMSolverMultistepScheduler(**OURS_DEFAULT, timestep_spacing="trailing"),
            "ours-vp",
        ),
        Row(
            "ours DPM++2M karras",
            lambda: ZTSNRDPMSolverMultistepScheduler(**OURS_DEFAULT, use_karras_sigmas=True),
            "ours-vp",
        ),
        Row("diffusers DDIM trailing", lambda: DDIMScheduler(**THEIRS_VP, clip_sample=False), "theirs-vp"),
        Row("diffusers Euler trailing", lambda: EulerDiscreteScheduler(**THEIRS_VP), "theirs-vp"),
        Row(
            "diffusers Euler karras",
            lambda: EulerDiscreteScheduler(**THEIRS_VP, use_karras_sigmas=True),
            "theirs-vp",
        ),
        Row("diffusers DPM++2M trailing", lambda: DPMSolverMultistepScheduler(**THEIRS_VP), "theirs-vp"),
        Row(
            "diffusers DPM++2M karras",
            lambda: DPMSolverMultistepScheduler(**THEIRS_VP, use_karras_sigmas=True),
            "theirs-vp",
        ),
        Row("diffusers UniPC trailing", lambda: UniPCMultistepScheduler(**THEIRS_VP), "theirs-vp"),
        Row(
            "diffusers UniPC karras",
            lambda: UniPCMultistepScheduler(**THEIRS_VP, use_karras_sigmas=True),
            "theirs-vp",
        ),
        Row(
            "diffusers EulerAncestral trailing (extra)",
            lambda: EulerAncestralDiscreteScheduler(**THEIRS_VP),
            "theirs-vp",
        ),
        Row("ours FlowMatch (default: order 2)", lambda: ZTSNRFlowMatchScheduler(shift=FLOW_SHIFT), "flow"),
        Row(
            "ours FlowMatch order 1 (extra)",
            lambda: ZTSNRFlowMatchScheduler(shift=FLOW_SHIFT, solver_order=1),
            "flow",
        ),
        Row("diffusers FlowMatchEuler", lambda: FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT), "flow"),
    ]
    return out


def model_for(row: Row, scheduler, data: GaussianMixture) -> AnalyticModel:
    if row.kind == "flow":
        return AnalyticModel(data, flow_levels(), "flow_prediction")
    if row.kind == "ours-vp":
        return AnalyticModel(data, vp_levels(scheduler.schedule.alphas_cumprod), "v_prediction")
    return AnalyticModel(
        data, vp_levels(scheduler.alphas_cumprod.double().clamp(min=2**-24)), "v_prediction"
    )


def sample(scheduler, model: AnalyticModel, num: int, nfe: int, seed: int) -> torch.Tensor:
    """:func:`diffusers_ztsnr.analytic.run_sampler`, but doing what a pipeline does for schedulers
    without ``init_noise_sigma`` / ``scale_model_input`` (FlowMatchEuler: SD3's pipeline uses
    neither) and handing ``generator`` only to a ``step`` that takes one (UniPC's does not). Counts
    model calls: every sampler here makes one per step."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(nfe)
    x = torch.randn(num, model.data.dim, generator=generator, dtype=torch.float64).float()
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    calls = 0
    for t in scheduler.timesteps:
        out = model(scale(x, t), t.expand(len(x)) if t.ndim == 0 else t)
        calls += 1
        kw = dict(generator=generator) if takes_generator else {}
        x = scheduler.step(out, t, x, **kw).prev_sample
    if calls != nfe:
        raise RuntimeError(f"expected {nfe} model calls, made {calls}")
    return x


def band_ratios(x: torch.Tensor, data: GaussianMixture, num_bands: int) -> tuple[list[float], float]:
    """Per band: pooled std of the samples / data std; and the mean of band 0."""
    x = x.double().reshape(len(x), num_bands, -1)
    var = x.var(dim=0, unbiased=True).mean(-1)  # [B]
    data_var = data.variance.reshape(num_bands, -1).mean(-1)
    return (var / data_var).sqrt().tolist(), float(x[:, 0].mean())


def schedule_floor(data: GaussianMixture, num_bands: int) -> list[float]:
    """Best possible std ratio per band for a last step from SD's ``t = 0`` to clean data."""
    ve2 = 0.00085 / (1 - 0.00085)  # (sigma/alpha)^2 at t = 0
    var = data.variance.reshape(num_bands, -1).mean(-1)
    return (var / (var + ve2)).sqrt().tolist()


# --- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 512 samples (< 60 s)")
    p.add_argument("--samples", type=int, default=None, help="samples per run (default 2048; --quick 512)")
    p.add_argument("--bands", type=int, default=8)
    p.add_argument("--dims", type=int, default=32, help="dimensions per band")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 30])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: modest on shared machines)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write all numbers to PATH as JSON")
    args = p.parse_args(argv)
    if args.bands < 3:
        p.error("--bands must be >= 3")
    return args


def print_setup(args: argparse.Namespace, num: int, stds: list[float], floor: list[float]) -> None:
    print("# Sampling accuracy on an exact Gaussian oracle (v-prediction, SD schedule rescaled to ZTSNR)")
    print()
    print(machine_header())
    print(
        f"data: {args.bands} bands x {args.dims} dims, band stds {', '.join(f'{s:.2f}' for s in stds)}; "
        f"band 0 mean 0.3; {num} samples, seed {args.seed}, float32 latents"
    )
    print(
        "schedule floor (std ratio left after a last step from SD's t=0, sigma/alpha=0.029, to clean data): "
        + ", ".join(f"b{k} {f:.3f}" for k, f in enumerate(floor))
    )
    print()


def run_entry(row: Row, data: GaussianMixture, num: int, nfe: int, seed: int, num_bands: int) -> dict:
    """One row at one NFE: the band ratios and band 0's mean, or what went wrong."""
    entry: dict = {"error": None, "ratios": None, "band0_mean": None}
    try:
        scheduler = row.make()
        x = sample(scheduler, model_for(row, scheduler, data), num, nfe, seed)
        if not bool(torch.isfinite(x).all()):
            entry["error"] = "non-finite"
        else:
            entry["ratios"], entry["band0_mean"] = band_ratios(x, data, num_bands)
    except Exception as exc:  # a crash of a scheduler is a result, not a failure of the benchmark
        entry["error"] = f"crash ({type(exc).__name__})"
        entry["message"] = str(exc)[:300]
    return entry


def cell(entry: dict, what: str, last: int) -> str:
    """A table cell: ``what`` is "worst" (band), "b0" / "last" (that band's ratio) or "mean" (band 0's mean)."""
    if entry["error"]:
        return entry["error"]
    r = entry["ratios"]
    if what == "worst":
        k = max(range(len(r)), key=lambda i: abs(r[i] - 1))
        return f"{abs(r[k] - 1) * 100:.1f}% (b{k})"
    if what == "mean":
        return f"{entry['band0_mean']:+.3f}"
    return f"{r[0 if what == 'b0' else last]:.3f}"


def print_tables(results: dict[str, dict[str, dict]], args: argparse.Namespace, num: int, stds: list[float],
                 floor: list[float]) -> None:
    last = args.bands - 1
    header = ["sampler", *(f"NFE {n}" for n in args.nfe)]
    tables = [
        ("worst", "Worst band: |std ratio - 1| (band index); 0% is exact"),
        ("b0", f"Band 0 (brightness, std {BRIGHTNESS_STD:g}) std ratio; 1 is exact"),
        ("last", f"Band {last} (finest detail, std {stds[-1]:.2f}) std ratio; 1 is exact, floor {floor[-1]:.3f}"),
        ("mean", "Band 0 sample mean (data mean +0.300)"),
    ]
    for what, title in tables:
        print(f"## {title}")
        print()
        body = [[label, *(cell(res[str(n)], what, last) for n in args.nfe)] for label, res in results.items()]
        print(markdown_table(header, body))
        print()

    print("Legend: std ratio = (std of generated samples in a band) / (data std of that band), pooled over the")
    print(f"band's {args.dims} dims; b<k> = band k (b0 brightness, b{last} finest detail). NFE = model evaluations")
    print("= steps. 'ours ...' = diffusers_ztsnr schedulers, 'diffusers ...' = diffusers' own; VP rows on SD's")
    print("scaled_linear schedule with rescale_betas_zero_snr=True, v_prediction; 'trailing'/'karras' = timestep")
    print("spacing (diffusers rows are all trailing, karras rows add use_karras_sigmas=True); flow rows use")
    print(f"shift={FLOW_SHIFT} and the flow_prediction oracle. crash (X) = the scheduler raised X;")
    noise = 100 / math.sqrt(2 * num * args.dims)
    print(f"non-finite = NaN/Inf in the samples. Sampling noise of a ratio ~ {noise:.1f}%.")
    print()


def print_check(results: dict[str, dict[str, dict]]) -> None:
    """Whether the default DPM row keeps every band within ``CHECK_TOL`` at ``CHECK_NFE``."""
    check = results[CHECK_LABEL].get(str(CHECK_NFE))
    if check is None:
        print(f"check skipped: NFE {CHECK_NFE} not in --nfe")
    elif check["error"]:
        print(f"check: every band within {CHECK_TOL:.0%} at {CHECK_NFE} NFE for '{CHECK_LABEL}': NO ({check['error']})")
    else:
        r = check["ratios"]
        k = max(range(len(r)), key=lambda i: abs(r[i] - 1))
        ok = abs(r[k] - 1) <= CHECK_TOL
        print(
            f"check: every band within {CHECK_TOL:.0%} at {CHECK_NFE} NFE for '{CHECK_LABEL}': "
            f"{'YES' if ok else 'NO'} (worst |ratio - 1| = {abs(r[k] - 1) * 100:.2f}% in band {k}, ratio {r[k]:.4f})"
        )


def write_json(path: str, args: argparse.Namespace, num: int, stds: list[float], floor: list[float],
               results: dict[str, dict[str, dict]], elapsed: float) -> None:
    payload = {
        "header": machine_header(),
        "config": dict(
            bands=args.bands, dims=args.dims, samples=num, seed=args.seed, nfe=args.nfe, band_stds=stds,
            band0_mean=0.3, schedule_floor=floor, flow_shift=FLOW_SHIFT,
        ),
        "results": results,
        "runtime_s": elapsed,
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    num = args.samples or (512 if args.quick else 2048)
    start = time.perf_counter()
    data = make_data(args.bands, args.dims)
    stds = band_stds(args.bands).tolist()
    floor = schedule_floor(data, args.bands)
    print_setup(args, num, stds, floor)
    results = {row.label: {str(nfe): run_entry(row, data, num, nfe, args.seed, args.bands) for nfe in args.nfe}
               for row in rows()}
    print_tables(results, args, num, stds, floor)
    print_check(results)
    elapsed = time.perf_counter() - start
    print(f"runtime: {elapsed:.1f} s")
    if args.json:
        write_json(args.json, args, num, stds, floor, results, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
