"""The printed report: the rows' table, the encodings cache table and a note per model."""

from __future__ import annotations

from _common import markdown_table

from .trainer_settings import (
    DENOISER,
    ENCODERS,
    FLUX_GUIDANCE,
    FLUX_MAX_SEQUENCE_LENGTH,
    FLUX_WEIGHTING,
    ROW_CACHED,
    ROW_PLAIN,
    ROW_UNCACHED,
    ROWS,
    TARGET_SPEEDUP,
)


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def speed_cell(summary: dict, repeats: int) -> str:
    if repeats == 1:
        return fmt(summary["steps_per_s"])
    return f"{fmt(summary['steps_per_s'])} ({fmt(summary['steps_per_s_min'])}-{fmt(summary['steps_per_s_max'])})"


def _kind(result: dict) -> str:
    """"unet", "flow" (SD3) or "flux"."""
    return result.get("kind", result.get("family", "unet"))


def _method_lines(results: list[dict], args) -> list[str]:
    """What every row shares: mode, threads, batch, LoRA targets, the plain loops, how steps/s and RSS are read."""
    kinds = [k for k in DENOISER if any(_kind(r) == k for r in results)]
    targets = {"unet": "to_q/to_k/to_v/to_out.0 (UNet rows)",
               "flow": "attn.to_q/k/v/out.0 + attn.add_q/k/v_proj/to_add_out (SD3 rows)",
               "flux": "attn.to_q/k/v/out.0 (Flux rows)"}
    plains = {"unet": "the plain loop is diffusers' train_text_to_image_lora.py (UNet rows)",
              "flow": "train_dreambooth_lora_sd3.py with per-image captions (SD3 rows)",
              "flux": f"train_dreambooth_lora_flux.py with per-image captions, weighting '{FLUX_WEIGHTING}', T5 "
                      f"length {FLUX_MAX_SEQUENCE_LENGTH}, guidance {FLUX_GUIDANCE} (Flux rows)"}
    return [f"mode: {'quick' if args.quick else 'full'}, family {args.family}; torch threads {args.threads} in every "
            f"row; batch {args.batch_size}, LoRA rank {args.rank} on {' / '.join(targets[k] for k in kinds)}, "
            f"fp32, {args.num_images} images; {'; '.join(plains[k] for k in kinds)}; "
            f"steps/s = (N2 - N1) / (t(N2) - t(N1)) over whole runs (setup cancels), median of "
            f"{args.repeats} repeat(s); peak RSS = ru_maxrss of the N2 run's forked child; growth = peak minus "
            "the child's RSS at start.", ""]


def _rows_table(results: list[dict], args, params: dict) -> str:
    table = []
    for res in results:
        s = res["summary"]
        plain = s[ROW_PLAIN]
        label = f"{res['model']} ({params[res['model']] / 1e6:.2f}M-param {DENOISER[_kind(res)]})"
        for row in ROWS:
            r = s[row]
            table.append([
                label, f"{res['resolution']} px", f"{res['n1']}/{res['n2']}", row, speed_cell(r, args.repeats),
                fmt(1 / r["steps_per_s"], 3), f"{r['peak_rss_mib']:.0f}", f"{r['growth_mib']:.0f}",
                f"x{r['steps_per_s'] / plain['steps_per_s']:.2f}", f"x{r['peak_rss_mib'] / plain['peak_rss_mib']:.3f}",
            ])
    speed_header = "steps/s" if args.repeats == 1 else "steps/s (min-max)"
    return markdown_table(["model", "res", "N1/N2", "trainer", speed_header, "s/step", "peak RSS MiB",
                           "growth MiB", "steps/s vs plain", "peak RSS vs plain"], table)


def _cache_table(results: list[dict]) -> str:
    cache_rows = []
    for res in results:
        c = res["cache_build"]
        cache_rows.append([res["model"], f"{res['resolution']} px", str(c["items"]), fmt(c["seconds"], 2),
                           fmt(res["cache_hit_seconds"], 2), fmt(c["run_seconds"], 1), f"{c['peak_rss_mib']:.0f}"])
    return markdown_table(["model", "res", "items", "build s (miss)", "load+verify s (hit)",
                           "build run total s", "build run peak RSS MiB"], cache_rows)


def _model_notes(res: dict, repeats: int) -> list[str]:
    """Ours cached against plain (the targets), and cached against uncached: the encoders' share of our step."""
    s = res["summary"]
    speed = s[ROW_CACHED]["steps_per_s"] / s[ROW_PLAIN]["steps_per_s"]
    memory = s[ROW_CACHED]["peak_rss_mib"] / s[ROW_PLAIN]["peak_rss_mib"]
    uncached_step, cached_step = 1 / s[ROW_UNCACHED]["steps_per_s"], 1 / s[ROW_CACHED]["steps_per_s"]
    share = (uncached_step - cached_step) / uncached_step
    spread = max((s[row]["steps_per_s_max"] - s[row]["steps_per_s_min"]) / s[row]["steps_per_s"]
                 for row in (ROW_CACHED, ROW_UNCACHED))
    resolved = (f"below the {spread:.0%} run-to-run spread of those rows, so not resolved by this run"
                if repeats > 1 and abs(share) < spread else "that share caps what caching can give here")
    return [
        f"- {res['model']} @ {res['resolution']} px, ours cached / plain: steps/s x{speed:.2f} (target >= "
        f"x{TARGET_SPEEDUP}: {'met' if speed >= TARGET_SPEEDUP else 'NOT met'}), peak RSS x{memory:.3f} "
        f"(target <= x1.000: {'met' if memory <= 1.0 else 'NOT met'}); plain loop's step loop timed directly: "
        f"{s[ROW_PLAIN]['direct_steps_per_s']:.2f} steps/s (vs {s[ROW_PLAIN]['steps_per_s']:.2f} by "
        "differencing).",
        f"  ours cached / ours no cache: steps/s x{uncached_step / cached_step:.2f}, i.e. the "
        f"{ENCODERS[_kind(res)]} encoding was {share:.0%} of our uncached step: {resolved}.",
    ]


def report(results: list[dict], args, params: dict, header: str, elapsed: float) -> str:
    """The whole printed report (markdown)."""
    lines = ["# Training throughput: our LoRA trainers (latent cache on / off) vs plain diffusers-example loops", "",
             header, "", *_method_lines(results, args), _rows_table(results, args, params)]
    lines += ["", "Encodings cache (not in steps/s):", "", _cache_table(results), ""]
    for res in results:
        lines += _model_notes(res, args.repeats)
    lines.append(f"- total benchmark wall time {elapsed:.0f} s.")
    return "\n".join(lines)
