"""Scheduler overhead: microseconds per ``scale_model_input`` + ``step`` call, ours vs diffusers.

Run: ``python benchmarks/scheduler_overhead.py`` (``--quick`` for a smoke run, ``--json PATH`` to dump
the numbers).

What is timed: a sampling loop of ``--steps`` steps (default 50) on a 1x4x128x128 latent (SDXL at
1024 px) with a fixed fake model output, so no model cost: per step ``scale_model_input`` (where the
scheduler has one) then ``step``. ``set_timesteps`` is timed separately and not included in µs/step.
Each timed run is one full loop; runs alternate ours/theirs (the order flipped every repeat) and the
median over ``--repeats`` runs is reported, after one untimed warm-up run each. torch runs on ONE
thread (``torch.set_num_threads(1)``) for stable timings; absolute numbers depend on the CPU and on
other load, the ratio ours/theirs is the figure to read.

Pairs (same config for both: v_prediction; VP ones on SD's ``scaled_linear`` schedule rescaled to zero
terminal SNR with ``timestep_spacing="trailing"``; flow ones ``shift=3.0``):
DDIM vs DDIMScheduler (``clip_sample=False``, the SD configs' value), Euler vs EulerDiscreteScheduler,
ancestral Euler vs EulerAncestralDiscreteScheduler, DPM-Solver++(2M) vs DPMSolverMultistepScheduler, UniPC
(ours at its defaults, order 3) vs UniPCMultistepScheduler (order 2),
our flow scheduler with ``solver_order`` 1 and 2 vs FlowMatchEulerDiscreteScheduler.

Also run with fp16 latents (and fp16 model output). Our ``step`` combines them in fp16 (float32
arithmetic inside each pass, one rounding per pass) where the step's coefficients are bounded, and in
float32 where they amplify (an epsilon model's ``1 / alpha``); diffusers' Euler-type schedulers upcast,
its DDIM works in the input dtype. Each timed loop reuses the scheduler, as a pipeline does from its
second image on; the "first run" column times a new scheduler's first loop. ``finite`` tells whether
the loop's final latent is finite (the fake model output is not a real model, so this is informational
only). A scheduler that raises shows ``crash (Type)``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch
from _common import machine_header, markdown_table

import diffusers_ztsnr

VP = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
)
FLOW_SHIFT = 3.0
SHAPE = (1, 4, 128, 128)




# --- pairs ------------------------------------------------------------------------------------------


@dataclass
class Pair:
    label: str
    ours: Callable[[], object]
    theirs: Callable[[], object]


PAIRS = [
    Pair(
        "DDIM",
        lambda: diffusers_ztsnr.ZTSNRDDIMScheduler(**VP),
        lambda: diffusers.DDIMScheduler(**VP, clip_sample=False),
    ),
    Pair("Euler", lambda: diffusers_ztsnr.ZTSNREulerScheduler(**VP), lambda: diffusers.EulerDiscreteScheduler(**VP)),
    Pair(
        "EulerAncestral",
        lambda: diffusers_ztsnr.ZTSNREulerAncestralScheduler(**VP),
        lambda: diffusers.EulerAncestralDiscreteScheduler(**VP),
    ),
    Pair(
        "DPM++2M",
        lambda: diffusers_ztsnr.ZTSNRDPMSolverMultistepScheduler(**VP),
        lambda: diffusers.DPMSolverMultistepScheduler(**VP),
    ),
    Pair(
        "UniPC",
        lambda: diffusers_ztsnr.ZTSNRUniPCMultistepScheduler(**VP),
        lambda: diffusers.UniPCMultistepScheduler(**VP),
    ),
    Pair(
        "Flow order 1 vs FlowMatchEuler",
        lambda: diffusers_ztsnr.ZTSNRFlowMatchScheduler(shift=FLOW_SHIFT, solver_order=1),
        lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
    ),
    Pair(
        "Flow order 1 linspace vs FlowMatchEuler",
        lambda: diffusers_ztsnr.ZTSNRFlowMatchScheduler(shift=FLOW_SHIFT, solver_order=1, timestep_spacing="linspace"),
        lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
    ),
    Pair(
        "Flow default (order 2) vs FlowMatchEuler",
        lambda: diffusers_ztsnr.ZTSNRFlowMatchScheduler(shift=FLOW_SHIFT, solver_order=2),
        lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
    ),
]


class Runner:
    """One scheduler, one dtype: times full sampling loops with a fixed fake model output."""

    def __init__(self, make: Callable[[], object], dtype: torch.dtype, steps: int, device: torch.device):
        self.make, self.scheduler = make, make()
        self.dtype, self.steps, self.device = dtype, steps, device
        g = torch.Generator().manual_seed(0)
        self.noise = torch.randn(SHAPE, generator=g).to(device, dtype)
        self.model_output = (0.5 * torch.randn(SHAPE, generator=g)).to(device, dtype)
        self.scale = getattr(self.scheduler, "scale_model_input", None)
        self.takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        self.step_us: list[float] = []
        self.set_us: list[float] = []
        self.cold_us: list[float] = []
        self.finite = True
        self.error: str | None = None

    def run(self, record: bool = True) -> None:
        if self.error:
            return
        try:
            self._run(record)
        except Exception as exc:  # a crash of a scheduler is a result, not a failure of the benchmark
            self.error = f"crash ({type(exc).__name__})"

    def _run(self, record: bool) -> None:
        set_us, step_us = self._time_loop(self.scheduler)
        if record:
            self.set_us.append(set_us)
            self.step_us.append(step_us)
            # a new scheduler's first loop: what a pipeline's first image pays (ours plans each step of a new grid)
            self.cold_us.append(self._time_loop(self.make())[1])

    def _time_loop(self, s) -> tuple[float, float]:
        """µs of ``set_timesteps``, and µs per step of one sampling loop."""
        out, scale = self.model_output, getattr(s, "scale_model_input", None)
        kw = dict(generator=torch.Generator().manual_seed(1)) if self.takes_generator else {}
        t0 = time.perf_counter()
        s.set_timesteps(self.steps, device=self.device)
        t1 = time.perf_counter()
        x = self.noise * getattr(s, "init_noise_sigma", 1.0)
        x = x.to(self.dtype)
        synchronize(self.device)
        t2 = time.perf_counter()
        for t in s.timesteps:
            if scale is not None:
                scale(x, t)  # the model would see this; its value is not needed here
            x = s.step(out, t, x, **kw).prev_sample
        synchronize(self.device)  # a GPU runs the steps asynchronously: time them, not their launch
        t3 = time.perf_counter()
        self.finite = self.finite and bool(torch.isfinite(x).all())
        return (t1 - t0) * 1e6, (t3 - t2) * 1e6 / self.steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 repeats, 20 steps (< 60 s)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per scheduler and dtype (default 30)")
    p.add_argument("--steps", type=int, default=None, help="steps per sampling run (default 50)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    p.add_argument("--device", default="cpu", help="where the latents and the steps run: cpu (default), cuda, ...")
    p.add_argument("--json", metavar="PATH", default=None, help="also write all numbers to PATH as JSON")
    return p.parse_args(argv)


def pair_result(pair: Pair, dtype_name: str, ours: Runner, theirs: Runner) -> dict:
    """Medians of one pair's timed runs (``None`` where a scheduler crashed) and their ratio."""
    med = {}
    for name, runner in (("ours", ours), ("theirs", theirs)):
        ok = runner.error is None and runner.step_us
        med[name] = statistics.median(runner.step_us) if ok else None
        med[name + "_set"] = statistics.median(runner.set_us) if ok else None
        med[name + "_cold"] = statistics.median(runner.cold_us) if ok else None
    ratio = med["ours"] / med["theirs"] if med["ours"] and med["theirs"] else None
    return dict(
        pair=pair.label, dtype=dtype_name, ours_us=med["ours"], theirs_us=med["theirs"], ratio=ratio,
        ours_set_timesteps_us=med["ours_set"], theirs_set_timesteps_us=med["theirs_set"],
        ours_first_run_us=med["ours_cold"], theirs_first_run_us=med["theirs_cold"],
        ours_error=ours.error, theirs_error=theirs.error, ours_finite=ours.finite,
        theirs_finite=theirs.finite, ours_runs_us=ours.step_us, theirs_runs_us=theirs.step_us,
    )


def time_pairs(dtype_name: str, steps: int, repeats: int, device: torch.device) -> list[dict]:
    """Every pair at one latent dtype: one warm-up each, then ``repeats`` runs, ours and theirs alternating first."""
    dtype = getattr(torch, dtype_name)
    runners = [(pair, Runner(pair.ours, dtype, steps, device), Runner(pair.theirs, dtype, steps, device))
               for pair in PAIRS]
    for _, ours, theirs in runners:  # warm-up
        ours.run(record=False)
        theirs.run(record=False)
    for r in range(repeats):
        for _, ours, theirs in runners:
            first, second = (ours, theirs) if r % 2 == 0 else (theirs, ours)
            first.run()
            second.run()
    return [pair_result(pair, dtype_name, ours, theirs) for pair, ours, theirs in runners]


def print_table(results: list[dict]) -> None:
    header = [
        "pair (ours vs diffusers)", "latent dtype", "ours µs/step", "diffusers µs/step", "ours/diffusers",
        "first run µs/step (ours / diffusers)", "set_timesteps µs (ours / diffusers)", "finite (ours / diffusers)",
    ]
    body = []
    for res in results:
        ours_cell = res["ours_error"] or fmt(res["ours_us"])
        theirs_cell = res["theirs_error"] or fmt(res["theirs_us"])
        body.append([
            res["pair"], res["dtype"], ours_cell, theirs_cell,
            "—" if res["ratio"] is None else f"{res['ratio']:.2f}",
            f"{fmt(res['ours_first_run_us'])} / {fmt(res['theirs_first_run_us'])}",
            f"{fmt(res['ours_set_timesteps_us'])} / {fmt(res['theirs_set_timesteps_us'])}",
            f"{'yes' if res['ours_finite'] else 'no'} / {'yes' if res['theirs_finite'] else 'no'}",
        ])
    print(markdown_table(header, body))
    print()
    print("Legend: µs/step = median over runs of (loop time / steps), each step = scale_model_input (if the")
    print("scheduler has one) + step, of a scheduler sampling again with the same step count (a pipeline's")
    print("second image on); ours/diffusers < 1 means ours is faster. first run = a new scheduler's first loop")
    print("(ours plans each step of a new grid then). set_timesteps is timed once per run and not included.")
    print("fp16: ours combines in the latent dtype where a step's coefficients are bounded, else in float32.")
    print("finite = the final latent of a loop with a constant fake model output is finite (informational).")
    print("crash (X) = raised X.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 30)
    steps = args.steps or (20 if args.quick else 50)
    torch.set_num_threads(1)
    start = time.perf_counter()

    print("# Scheduler overhead: µs per scale_model_input + step, ours vs diffusers (no model cost)")
    print()
    print(machine_header())
    print(
        f"latent {'x'.join(map(str, SHAPE))}, {steps} steps per run, median of {repeats} runs per scheduler "
        "(interleaved ours/theirs, 1 warm-up each), torch.set_num_threads(1); VP: v_prediction, SD schedule, "
        f"rescale_betas_zero_snr=True, trailing; flow: shift={FLOW_SHIFT}; device {args.device}"
    )
    print()
    device = torch.device(args.device)
    results = [res for dtype_name in args.dtypes for res in time_pairs(dtype_name, steps, repeats, device)]
    print_table(results)
    elapsed = time.perf_counter() - start
    print(f"runtime: {elapsed:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(header=machine_header(), shape=SHAPE, steps=steps, repeats=repeats, results=results,
                     runtime_s=elapsed),
                f, indent=1,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
