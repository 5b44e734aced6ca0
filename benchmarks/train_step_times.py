"""Per-step training time on the CPU: the plain example loop against ours cached, eager and compiled.

Run: ``python benchmarks/train_step_times.py`` (about 5 minutes on a 2-core machine; ``--rows plain,eager`` for
fewer). The tiny SD1.5-style pipeline of :func:`diffusers_ztsnr.testing.tiny.save_tiny_pipeline` at 64 px, batch 4,
LoRA rank 4, fp32, ``--threads`` torch threads (default 1), 16 demo images; every row runs in this one process.

s/step is the median step time after the first 10 steps (which hold the compile): our loop is timed where it
finishes each step (``throughput.gpu.StepClock``), the plain loop (``throughput.plain_unet``, diffusers'
``train_text_to_image_lora.py`` reduced to one CPU process) by its own step clock over every step after the first.
The ratio to the plain loop is printed; no speed is asserted. ``train_throughput.py`` measures the same rows by
differencing two run lengths instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput.*
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's diffusers_ztsnr

import torch  # noqa: E402

FLAGS = {"eager": [], "regional": ["--torch_compile", "regional"], "full": ["--torch_compile", "full"]}
SKIP = 10


def ours(pipeline: Path, data: Path, work: Path, name: str, steps: int) -> float:
    from throughput.gpu import StepClock, steady

    from diffusers_ztsnr.training.unet import main

    clock = StepClock()
    argv = ["--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(data), "--resolution", "64",
            "--train_batch_size", "4", "--max_train_steps", str(steps), "--center_crop", "--cache_latents",
            "--cache_latents_dir", str(work / "cache"), "--output_dir", str(work / f"out-{name}"), "--rank", "4",
            "--report_to", "none", "--checkpointing_steps", str(10**9), *FLAGS[name]]
    with clock:
        main(argv)
    return steady(clock.times, SKIP)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="plain,eager,regional,full", help="comma-separated: plain, eager, "
                        "regional, full")
    parser.add_argument("--steps", type=int, default=60, help="steps per row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from throughput.plain_unet import run_plain

    from diffusers_ztsnr.testing.demo_data import make_demo_dataset
    from diffusers_ztsnr.testing.tiny import save_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="step-times-"))
    pipeline = save_tiny_pipeline("sd15", work / "sd15")
    data = make_demo_dataset(work / "data", num_images=16, size=64)
    seconds = {}
    for row in args.rows.split(","):
        torch._dynamo.reset()
        if row == "plain":
            seconds[row] = 1 / run_plain(str(pipeline), str(data), 64, 4, 4, args.steps)["direct_steps_per_s"]
        else:
            seconds[row] = ours(pipeline, data, work, row, args.steps)
        print(f"{row}: {seconds[row]:.4f} s/step", flush=True)
    if "plain" in seconds:
        for row, value in seconds.items():
            print(f"{row}: {seconds['plain'] / value:.2f}x the plain loop")


if __name__ == "__main__":
    main()
