"""``diffusers-ztsnr`` command line: ``demo``, ``make-tiny``, ``checkpoint-settings``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, columns: int):
    """``[N, H, W, 3]`` floats in [0, 1] -> one PIL image, ``columns`` wide."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * h, columns * w, 3), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return Image.fromarray((canvas.clip(0, 1) * 255).round().astype(np.uint8))


def run_demo(output_dir: Path, steps: int, num_images: int, seed: int) -> dict[str, Path]:
    """Offline: build a tiny SD1.5-style pipeline, save it, load it back, sample with our ZTSNR scheduler."""
    import torch
    from diffusers import StableDiffusionPipeline

    from .schedulers import ZTSNRDPMSolverMultistepScheduler
    from .tiny import save_tiny_pipeline

    output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_pipeline("sd15", output_dir / "tiny-sd15", seed=seed)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    # the one-line swap: v-prediction + zero terminal SNR with our spacing and solver (the spacing is
    # explicit because a config saved by diffusers spells out its class default, "leading")
    pipe.scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="logsnr"
    )
    result = pipe(
        ["a red square", "a blue circle"] * ((num_images + 1) // 2),
        num_inference_steps=steps,
        height=64,
        width=64,
        guidance_scale=5.0,
        guidance_rescale=0.7,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images[:num_images]
    if not np.isfinite(result).all():
        raise RuntimeError("the demo produced non-finite pixels")
    grid_path = output_dir / "samples.png"
    image_grid(result, columns=min(4, num_images)).save(grid_path)
    scheduler_dir = output_dir / "scheduler"
    pipe.scheduler.save_pretrained(scheduler_dir)
    return {"pipeline": model_dir, "grid": grid_path, "scheduler": scheduler_dir}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-ztsnr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline sampling demo on a tiny local pipeline; writes a PNG grid")
    demo.add_argument("--output_dir", type=Path, default=Path("demo_output"))
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--num_images", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    tiny = sub.add_parser("make-tiny", help="save a tiny random-weight pipeline (sd15, sdxl, sd3, flux)")
    tiny.add_argument("kind")
    tiny.add_argument("output_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    marks = sub.add_parser("checkpoint-settings", help="scheduler settings from a checkpoint's v_pred/ztsnr markers")
    marks.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.steps < 1 or args.num_images < 1:
            parser.error("--steps and --num_images must be >= 1")
        paths = run_demo(args.output_dir, args.steps, args.num_images, args.seed)
        print(f"tiny pipeline:    {paths['pipeline']}")
        print(f"scheduler config: {paths['scheduler']}/scheduler_config.json")
        print(f"sample grid:      {paths['grid']}")
    elif args.command == "make-tiny":
        from .tiny import TINY_KINDS, save_tiny_pipeline

        if args.kind not in TINY_KINDS:
            parser.error(f"unknown kind {args.kind!r}; allowed: {', '.join(TINY_KINDS)}")
        print(save_tiny_pipeline(args.kind, args.output_dir, seed=args.seed))
    elif args.command == "checkpoint-settings":
        from .checkpoints import scheduler_settings_from_checkpoint

        print(json.dumps(scheduler_settings_from_checkpoint(args.checkpoint)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
