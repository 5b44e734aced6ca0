"""Training throughput of the newer flow families on tiny models: ours (cache hit, no cache) vs a plain loop.

Run: ``python benchmarks/train_throughput_families.py`` (``--families sd35 kontext ...`` for a subset, ``--steps
N1 N2``, ``--json PATH``; about 5 minutes for all six on a 2-core machine). CPU, Linux (forked runs).

Families: SD3.5 (RMS-normed q/k, dual attention), FLUX.1 Kontext (text-to-image rows, no reference image), Chroma,
Qwen-Image, Z-Image, FLUX.2 Klein and FLUX.2 dev, each the tiny offline model of ``diffusers_ztsnr.testing``
(random weights, local tokenizers) at 32 px, batch 4, rank 4, fp32, one torch thread. Rows, per family, on the same
data and LoRA targets (the family's default, diffusers' example's):

* **ours, --cache_latents (cache hit)** and **ours, no cache**: ``train_lora_flow.py``'s ``main`` with its defaults;
* **plain diffusers-example loop**: :mod:`throughput.plain_family` (every batch's prompts through the pipeline's
  encoder and its images through the VAE, as the examples do with per-image captions).

Steps/s is measured as in ``train_throughput.py``: each row is run with N1 and N2 steps in forked children and
(N2 - N1) / (t(N2) - t(N1)) cancels loading, caching and saving. What the cache removes is the encoders' share of a
step, which on these tiny models is set by their tiny encoders; the ratios say what our loop costs around the same
model calls, not what a real model gains. No speed is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import machine_header, markdown_table  # noqa: E402
from throughput.bench import bench_model  # noqa: E402
from throughput.children import preimport  # noqa: E402
from throughput.trainer_settings import ROW_CACHED, ROW_PLAIN, ROW_UNCACHED, ROWS  # noqa: E402

FAMILIES = ("sd35", "kontext", "chroma", "qwen-image", "z-image", "flux2-klein", "flux2")
RESOLUTION = 32


def build_pipelines(root: Path, families: list[str]) -> dict[str, str]:
    from diffusers_ztsnr.testing import tiny_flow_builders as builders
    from diffusers_ztsnr.testing.tiny_flux2_builders import build_flux2

    make = {"sd35": builders.build_sd35, "kontext": builders.build_flux_kontext, "chroma": builders.build_chroma,
            "qwen-image": builders.build_qwen_image, "z-image": builders.build_z_image,
            "flux2-klein": builders.build_flux2_klein, "flux2": build_flux2}
    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in families:
            folders[name] = str(root / name)
            make[name](0).save_pretrained(folders[name])
    return folders


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--steps", type=int, nargs=2, metavar=("N1", "N2"), default=(4, 64))
    p.add_argument("--repeats", type=int, default=1, help="N1/N2 pairs per row; the median is reported")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--num_images", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="PATH", default=None)
    args = p.parse_args(argv)
    if not 1 <= args.steps[0] < args.steps[1]:
        p.error(f"need 1 <= N1 < N2, got {args.steps}")
    return args


def table(results: list[dict]) -> str:
    rows = []
    for res in results:
        s = res["summary"]
        plain = s[ROW_PLAIN]["steps_per_s"]
        rows.append([res["model"], *(f"{s[row]['steps_per_s']:.2f}" for row in ROWS),
                     f"{s[ROW_CACHED]['steps_per_s'] / plain:.2f}x", f"{s[ROW_UNCACHED]['steps_per_s'] / plain:.2f}x",
                     f"{s[ROW_CACHED]['peak_rss_mib']:.0f} / {s[ROW_PLAIN]['peak_rss_mib']:.0f}"])
    header = ["family", "ours cached steps/s", "ours uncached steps/s", "plain steps/s", "cached / plain",
              "uncached / plain", "peak RSS MiB (cached / plain)"]
    return markdown_table(header, rows)


def main(argv=None) -> None:
    from diffusers_ztsnr.testing.demo_data import make_demo_dataset

    args = parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("this benchmark forks one child per run and reads /proc: Linux only")
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="family-throughput-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")

    def log(message: str) -> None:
        print(f"  {time.perf_counter() - began:6.1f} s  {message}", file=sys.stderr, flush=True)

    try:
        preimport()
        header = machine_header()
        data = str(make_demo_dataset(work / "data", num_images=args.num_images, size=RESOLUTION))
        pipelines = build_pipelines(work, args.families)
        n1, n2 = args.steps
        results = [bench_model(name, pipelines[name], data, RESOLUTION, args, work, n1, n2, log, family="flow",
                               kind="family") for name in args.families]
        print(f"# Training throughput: newer flow families (tiny models)\n\n{header}\n")
        print(f"{RESOLUTION} px, batch {args.batch_size}, rank {args.rank}, fp32, steps {n1} -> {n2}, "
              f"repeats {args.repeats}\n")
        print(table(results))
        if args.json:
            Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
