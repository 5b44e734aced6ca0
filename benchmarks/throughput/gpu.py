"""GPU rows of the training-throughput benchmark (``train_throughput.py --device cuda``).

Real architectures with random weights (:mod:`.gpu_models`), 512 px, bf16, batch 4, LoRA rank 4 on the attention
projections, 64 generated images; every row runs in this one process, one after another, in priority order:

1. SD1.5: diffusers' example loop (:mod:`.gpu_plain`), ours with ``--cache_latents``, ours cached with
   ``--torch_compile regional`` and ``full``;
2. SD3-medium: the example's fast path, ours cached (profiled over three steps: ``profile_sd3.txt``);
3. SD3-medium quantized bases: ours cached with ``--base_quantization int8``, ``nf4`` and ``fp8``;
4. SD3 ours cached with ``--torch_compile regional``.

A row that would end past ``--budget`` seconds is skipped (and says so), so the table always comes back.
s/step is the median step time after the first ``skip`` steps (which hold the compile, the cache build and
cuDNN's autotuning); "first" is the time to the end of step ``skip`` from the row's start (model loading, cache,
compile included). Peak is ``torch.cuda.max_memory_allocated`` over the row. Our trainer's step times are taken
where the loop finishes each step (after its one host sync), the example's after its ``loss.item()``.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch

#: the seconds each row needs on an H100/H200 at 512 px (the budget check); tiny rows take a few seconds
ESTIMATE_S = {"build-sd15": 15, "plain-sd15": 25, "ours-sd15": 25, "regional-sd15": 70, "full-sd15": 170,
              "build-sd3": 40, "plain-sd3": 35, "ours-sd3": 35, "int8-sd3": 35, "nf4-sd3": 35,
              "regional-sd3": 80, "fp8-sd3": 35, "full-sd3": 110}
ORDER = ("build-sd15", "plain-sd15", "ours-sd15", "regional-sd15", "full-sd15", "build-sd3", "plain-sd3",
         "ours-sd3", "int8-sd3", "nf4-sd3", "fp8-sd3", "regional-sd3")
OURS_FLAGS = {"ours": [], "regional": ["--torch_compile", "regional"], "full": ["--torch_compile", "full"],
              "int8": ["--base_quantization", "int8"], "nf4": ["--base_quantization", "nf4"],
              "fp8": ["--base_quantization", "fp8"]}
LABELS = {"plain": "diffusers example loop", "ours": "ours, --cache_latents",
          "regional": "ours, cached, --torch_compile regional", "full": "ours, cached, --torch_compile full",
          "int8": "ours, cached, --base_quantization int8", "nf4": "ours, cached, --base_quantization nf4",
          "fp8": "ours, cached, --base_quantization fp8"}


def steady(times: list[float], skip: int) -> float | None:
    """Median seconds per step after the first ``skip`` steps."""
    steps = [b - a for a, b in zip(times[skip:], times[skip + 1:], strict=False)]
    return statistics.median(steps) if steps else None


class StepClock:
    """Records when our loop finishes each step (wrapping ``loop.after_step``); optionally profiles steps
    ``[profile_at, profile_at + 3)`` with the torch profiler into ``profile_path``."""

    def __init__(self, profile_at: int | None = None, profile_path: Path | None = None):
        self.times: list[float] = []
        self.profile_at, self.profile_path, self.profiler = profile_at, profile_path, None

    def __enter__(self):
        import diffusers_ztsnr.training.loop as loop

        self.loop, self.original = loop, loop.after_step

        def after_step(*args, **kwargs):
            self.times.append(time.perf_counter())
            self._profile(len(self.times))
            return self.original(*args, **kwargs)

        loop.after_step = after_step
        return self

    def _profile(self, done: int) -> None:
        if self.profile_at is None:
            return
        if done == self.profile_at:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        elif done == self.profile_at + 3 and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            self.profile_path.write_text(
                "three steps of ours, cached, SD3; by device time:\n" + averages.table(sort_by=sort, row_limit=30)
                + "\n\nby self CPU time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=20))
            self.profiler = None

    def __exit__(self, *exc):
        self.loop.after_step = self.original


def run_ours(family: str, pipeline: str, data: str, settings: dict, out: Path, flags: list[str],
             clock: StepClock) -> list[float]:
    from diffusers_ztsnr.training.flow import main as flow_main
    from diffusers_ztsnr.training.unet import main as unet_main

    argv = ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data,
            "--resolution", str(settings["resolution"]), "--train_batch_size", str(settings["batch_size"]),
            "--max_train_steps", str(settings["steps"]), "--center_crop", "--cache_latents",
            "--cache_latents_dir", str(out.parent / f"cache-{family}"), "--output_dir", str(out),
            "--rank", str(settings["rank"]), "--report_to", "none", "--checkpointing_steps", str(10**9),
            "--learning_rate", "1e-4", "--seed", "0", "--mixed_precision", settings["precision"], *flags]
    with clock:
        (unet_main if family == "sd15" else flow_main)(argv)
    return clock.times


def reset_between_rows() -> None:
    """Free the last row's models and compiled graphs; forget accelerate's process-wide state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _row(key: str, settings: dict, work: Path, state: dict) -> dict:
    """Run one row of :data:`ORDER`; returns its record."""
    from .gpu_models import build_sd3, build_sd15
    from .gpu_plain import plain_sd3, plain_sd15

    what, family = key.split("-")
    started = time.perf_counter()
    if what == "build":
        build = build_sd15 if family == "sd15" else build_sd3
        folder, params = build(work / family, settings["scale"], settings["device"])
        state[family] = str(folder)
        return {"row": key, "params": params, "seconds": time.perf_counter() - started}
    pipeline, data = state[family], state["data"]
    if what == "plain":
        plain = plain_sd15 if family == "sd15" else plain_sd3
        times = plain(pipeline, data, settings["resolution"], settings["batch_size"], settings["rank"],
                      settings["steps"])
    else:
        profile = settings["skip"] + 5 if key == "ours-sd3" else None
        clock = StepClock(profile, Path(settings["out"]) / "profile_sd3.txt")
        times = run_ours(family, pipeline, data, settings, work / f"out-{key}", OURS_FLAGS[what], clock)
        if profile is not None:  # the profiled steps are slower: time the steps before them
            times = times[:profile]
    skip = settings["skip"]
    return {"row": key, "model": family, "label": LABELS[what], "s_per_step": steady(times, skip),
            "first_s": times[skip] - started if len(times) > skip else None, "peak_mib": peak_mib(),
            "steps": len(times)}


def report(rows: list[dict], settings: dict) -> str:
    """The markdown table: s/step, steps/s relative to the example row of the same model, peak memory."""
    lines = [f"device: {settings['device_name']}; {settings['resolution']} px, {settings['precision']}, batch "
             f"{settings['batch_size']}, rank {settings['rank']}, {settings['steps']} steps, median after "
             f"{settings['skip']}", "",
             "| model | row | s/step | speed vs example | peak MiB | first steps s |", "|---|---|---|---|---|---|"]
    anchors = {r["model"]: r["s_per_step"] for r in rows if r["row"].startswith("plain") and r.get("s_per_step")}
    for r in rows:
        if "model" not in r:
            continue
        if r.get("error") or r.get("skipped"):
            lines.append(f"| {r['model']} | {r['label']} | {r.get('error') or r.get('skipped')} | | | |")
            continue
        speed = anchors.get(r["model"], 0) / r["s_per_step"] if r["s_per_step"] and r["model"] in anchors else None
        peak = f"{r['peak_mib']:,.0f}" if r["peak_mib"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['label']} | {r['s_per_step']:.4f} | "
                     f"{f'{speed:.2f}x' if speed else 'n/a'} | {peak} | {r['first_s']:.1f} |")
    builds = [f"{r['row']}: {r['params'] / 1e6:,.0f} M parameters, {r['seconds']:.0f} s" for r in rows
              if r["row"].startswith("build") and "params" in r]
    return "\n".join(lines + ["", *builds])


def _run_or_skip(key: str, settings: dict, work: Path, state: dict, began: float, log) -> dict:
    """The row's record: run, or skipped (its model not built, or past the budget), or the error it raised."""
    what, family = key.split("-")
    elapsed = time.perf_counter() - began
    estimate = ESTIMATE_S[key] if settings["scale"] == "real" else 0
    record = {"row": key, "model": family, "label": LABELS.get(what, what)} if what != "build" else {"row": key}
    if family not in state and what != "build":
        return {**record, "skipped": "not run: its model was not built"}
    if elapsed + estimate > settings["budget"]:
        log(f"{key}: skipped (budget)")
        return {**record, "skipped": f"not run: {elapsed:.0f} s + ~{estimate} s > --budget"}
    reset_between_rows()
    log(f"{key} ...")
    try:
        result = _row(key, settings, work, state)
    except (Exception, SystemExit) as error:  # one failing row (or refused flag) must not lose the others
        result = {**record, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    log(f"{key}: {result}")
    return result


def run_gpu_rows(settings: dict, work: Path, began: float, log) -> list[dict]:
    """Every row of ``settings["rows"]`` (default :data:`ORDER`) that fits the budget, the table rewritten to
    ``settings["out"]`` after each."""
    from diffusers_ztsnr.testing.demo_data import make_demo_dataset

    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    state = {"data": str(make_demo_dataset(work / "data", num_images=settings["num_images"],
                                           size=settings["resolution"]))}
    rows: list[dict] = []
    for key in settings.get("rows") or ORDER:
        rows.append(_run_or_skip(key, settings, work, state, began, log))
        (out / "gpu_throughput.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
        (out / "gpu_throughput.md").write_text(report(rows, settings))
    return rows
