"""One model's rows: the cache-building run, then N1 and N2 steps of every row (``--repeats`` times), each a
forked child; steps/s by differencing the two."""

from __future__ import annotations

import statistics
from pathlib import Path

from .children import in_child
from .ours import run_ours
from .plain_family import run_plain_family
from .plain_flow import run_plain_flow, run_plain_flux
from .plain_unet import run_plain
from .trainer_settings import (
    FLUX_GUIDANCE,
    FLUX_LORA_TARGETS,
    FLUX_MAX_SEQUENCE_LENGTH,
    FLUX_WEIGHTING,
    ROW_CACHED,
    ROW_PLAIN,
    ROWS,
)

PLAIN = {"unet": run_plain, "flow": run_plain_flow, "flux": run_plain_flux, "family": run_plain_family}


def _summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per row: the medians over the repeats (steps/s, the N2 run's peak RSS and growth) and the steps/s range."""
    summary = {}
    for row in ROWS:
        summary[row] = {
            "steps_per_s": statistics.median(r["steps_per_s"] for r in runs[row]),
            "peak_rss_mib": statistics.median(r["n2"]["peak_rss_mib"] for r in runs[row]),
            "growth_mib": statistics.median(r["n2"]["growth_mib"] for r in runs[row]),
            "steps_per_s_min": min(r["steps_per_s"] for r in runs[row]),
            "steps_per_s_max": max(r["steps_per_s"] for r in runs[row]),
        }
    summary[ROW_PLAIN]["direct_steps_per_s"] = statistics.median(r["n2"]["direct_steps_per_s"]
                                                                 for r in runs[ROW_PLAIN])
    return summary


def bench_model(name: str, pipeline: str, data: str, resolution: int, args, work: Path, n1: int, n2: int,
                log, family: str = "unet", kind: str | None = None) -> dict:
    """Every row of ``name`` (``kind`` "unet", "flow" for SD3 or "flux"), with the cache's build and hit times."""
    threads = args.threads
    kind = kind or family
    ours = dict(family=family)
    if kind == "flux":  # the plain Flux loop's LoRA targets, time density / weighting, T5 length and guidance
        ours["extra_args"] = ("--lora_layers", ",".join(FLUX_LORA_TARGETS), "--weighting_scheme", FLUX_WEIGHTING,
                              "--max_sequence_length", str(FLUX_MAX_SEQUENCE_LENGTH),
                              "--guidance_scale", str(FLUX_GUIDANCE))
    cache_dir = work / f"cache-{name}"
    common = dict(pipeline=pipeline, data=data, resolution=resolution, batch_size=args.batch_size, rank=args.rank)
    counter = iter(range(10**6))

    def out_dir() -> str:
        return str(work / f"out-{name}-{next(counter)}")

    log(f"[{name}] building the encodings cache (1-step run, cache miss)")
    build = in_child(threads, work / "child.log", run_ours, **common, **ours, steps=1, output_dir=out_dir(),
                     cache_dir=str(cache_dir))
    if not build["cache"] or build["cache"]["misses"] == 0:
        raise RuntimeError(f"the cache-building run did not build anything: {build['cache']}")
    runs: dict[str, list[dict]] = {row: [] for row in ROWS}
    for repeat in range(args.repeats):
        pair: dict[str, dict[int, dict]] = {row: {} for row in ROWS}
        for n in (n1, n2):
            for row in ROWS:
                log(f"[{name}] repeat {repeat + 1}/{args.repeats}: {row}, {n} steps")
                if row == ROW_PLAIN:
                    rec = in_child(threads, work / "child.log", PLAIN[kind], **common, steps=n)
                else:
                    cached = row == ROW_CACHED
                    rec = in_child(threads, work / "child.log", run_ours, **common, **ours, steps=n,
                                   output_dir=out_dir(), cache_dir=str(cache_dir) if cached else None)
                    if cached and rec["cache"]["misses"]:
                        raise RuntimeError(f"the timed cached run missed the cache: {rec['cache']}")
                if rec["steps"] != n:
                    raise RuntimeError(f"{row} ran {rec['steps']} steps, not {n}")
                pair[row][n] = rec
        for row in ROWS:
            a, b = pair[row][n1], pair[row][n2]
            runs[row].append({"n1": a, "n2": b, "steps_per_s": (n2 - n1) / (b["seconds"] - a["seconds"])})
    summary = _summary(runs)
    hits = [r[k]["cache_seconds"] for r in runs[ROW_CACHED] for k in ("n1", "n2")]
    return {"model": name, "family": family, "kind": kind, "pipeline": pipeline, "resolution": resolution,
            "n1": n1, "n2": n2,
            "cache_build": {"seconds": build["cache_seconds"], "run_seconds": build["seconds"],
                            "peak_rss_mib": build["peak_rss_mib"], "growth_mib": build["growth_mib"],
                            "items": build["cache"]["misses"]},
            "cache_hit_seconds": statistics.median(hits), "summary": summary, "runs": runs}

