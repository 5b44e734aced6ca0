"""``diffusers-ztsnr`` command line: ``demo``, ``make-tiny``, ``checkpoint-settings``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def run_demo(output_dir: Path, steps: int, num_images: int, seed: int, train_steps: int = 300) -> dict[str, Path]:
    """Offline, end to end: a tiny epsilon SD1.5-style base model and a generated image + caption set, LoRA
    fine-tuning that converts it to v-prediction on the zero-terminal-SNR schedule, then a sample grid with
    our scheduler under the trained config."""
    from .demo_data import make_demo_dataset
    from .tiny import save_tiny_pipeline
    from .training.unet import main as train_main

    output_dir.mkdir(parents=True, exist_ok=True)
    base = save_tiny_pipeline("sd15", output_dir / "tiny-sd15", seed=seed)
    data = make_demo_dataset(output_dir / "data", num_images=32, size=64, seed=seed)
    result = train_main([
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--resolution", "64",
        "--center_crop", "--random_flip", "--train_batch_size", "4", "--max_train_steps", str(train_steps),
        "--learning_rate", "1e-3", "--rank", "8", "--prediction_type", "v_prediction", "--zero_terminal_snr",
        "--snr_gamma", "5.0", "--checkpointing_steps", str(max(1, train_steps // 2)), "--seed", str(seed),
        "--validation_prompt", "a red disc on a dark background", "--num_validation_images", str(num_images),
        "--validation_steps", str(train_steps), "--validation_inference_steps", str(steps),
        "--output_dir", str(output_dir / "lora"), "--overwrite_output_dir",
    ])
    if not all(math.isfinite(v) for v in result["losses"]):
        raise RuntimeError("the demo's training loss was not finite")
    return {"pipeline": base, "lora": result["lora"], "grid": result["grid"], "card": result["card"],
            "scheduler": result["scheduler"], "kohya": result["kohya"]}


def _step_list(text: str) -> tuple[int, ...]:
    """``--steps 5,10,25``: positive integers, comma-separated."""
    try:
        steps = tuple(int(n) for n in text.split(","))
    except ValueError:
        message = f"invalid value {text!r}: comma-separated integers >= 1, e.g. 5,10,25"
        raise argparse.ArgumentTypeError(message) from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: every step count must be >= 1")
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-ztsnr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline: LoRA-train a tiny model eps -> v + ZTSNR, sample a PNG grid")
    demo.add_argument("--output_dir", type=Path, default=Path("demo_output"))
    demo.add_argument("--train_steps", type=int, default=300)
    demo.add_argument("--steps", type=int, default=20, help="sampling steps")
    demo.add_argument("--num_images", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    tiny = sub.add_parser("make-tiny", help="save a tiny random-weight pipeline (sd15, sdxl, sd3, flux)")
    tiny.add_argument("kind")
    tiny.add_argument("output_dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    marks = sub.add_parser("checkpoint-settings", help="scheduler settings from a checkpoint's v_pred/ztsnr markers")
    marks.add_argument("checkpoint", type=Path)
    insp = sub.add_parser("inspect", help="terminal SNR, sigma_max, timestep grid and warnings of a scheduler config")
    insp.add_argument("path", type=Path, help="pipeline folder, scheduler folder or scheduler_config.json")
    insp.add_argument("--steps", type=int, default=20)
    insp.add_argument("--spacing", default=None, help="timestep spacing (default: the config's)")
    insp.add_argument("--lora", type=Path, default=None, help="a LoRA / checkpoint file to check its markers against")
    insp.add_argument("--plot", type=Path, default=None, help="write the log-SNR plot (PNG; needs matplotlib)")
    light = sub.add_parser("lighting", help="the uniform-lighting curse computed exactly: table and plot")
    light.add_argument("--output_dir", type=Path, default=Path("lighting_output"))
    light.add_argument("--steps", type=_step_list, default="5,10,25,50,100", help="comma-separated step counts")
    export = sub.add_parser("export-checkpoint", help="merge a LoRA into its base: one original-layout checkpoint with "
                            "v_pred/ztsnr markers (SD1.x/2.x/SDXL)")
    export.add_argument("lora_dir", type=Path, help="diffusers-format LoRA folder (pytorch_lora_weights.safetensors)")
    export.add_argument("out", type=Path, help="output .safetensors file")
    export.add_argument("--base", default=None, help="base pipeline (default: the LoRA's training_args.json)")
    export.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line naming the fix, not a traceback
        parser.error(f"{args.command}: {error}")
    return 2


def _export_checkpoint(args: argparse.Namespace) -> None:
    """``export-checkpoint``: merge, write, then print what each UI needs to sample the file as trained."""
    from .single_file import export_single_file

    result = export_single_file(args.lora_dir, args.out, base=args.base, dtype=args.dtype)
    print(f"checkpoint: {result['path']} ({result['family']}, {result['dtype']}; base {result['base']})")
    print(f"trained for: prediction_type={result['prediction_type']}, "
          f"rescale_betas_zero_snr={result['rescale_betas_zero_snr']}")
    print(f"marker keys: {', '.join(result['markers']) or 'none'}")
    print("tensors: " + ", ".join(f"{name} {count}" for name, count in result["keys"].items()))
    for line in result["instructions"]:
        print(line)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "demo":
        for flag in ("steps", "num_images", "train_steps"):
            if getattr(args, flag) < 1:
                parser.error(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
        paths = run_demo(args.output_dir, args.steps, args.num_images, args.seed, args.train_steps)
        print(f"base model (tiny, epsilon): {paths['pipeline']}")
        print(f"LoRA (diffusers format):    {paths['lora']}")
        print(f"LoRA (kohya/ComfyUI):       {paths['kohya']}")
        print(f"scheduler config:           {paths['scheduler']}/scheduler_config.json")
        print(f"model card:                 {paths['card']}")
        print(f"sample grid:                {paths['grid']}")
    elif args.command == "make-tiny":
        from .tiny import TINY_KINDS, save_tiny_pipeline

        if args.kind not in TINY_KINDS:
            parser.error(f"unknown kind {args.kind!r}; allowed: {', '.join(TINY_KINDS)}")
        print(save_tiny_pipeline(args.kind, args.output_dir, seed=args.seed))
    elif args.command == "inspect":
        from .checkpoints import scheduler_settings_from_checkpoint
        from .diagnose import inspect_scheduler_config, load_scheduler_config, plot_log_snr

        config = load_scheduler_config(args.path)
        lora = scheduler_settings_from_checkpoint(args.lora) if args.lora else None
        report = inspect_scheduler_config(config, args.steps, args.spacing, lora)
        print(report.text())
        if args.plot:
            reports = {"as configured": report}
            if report.schedule is not None and not report.is_zero_terminal_snr:
                rescaled = dict(config, rescale_betas_zero_snr=True, _class_name="ZTSNRDDIMScheduler")
                reports["ZTSNR-rescaled, logsnr spacing"] = inspect_scheduler_config(rescaled, args.steps, "logsnr")
            print(f"log-SNR plot: {plot_log_snr(reports, args.plot)}")
    elif args.command == "lighting":
        from .lighting import lighting_table, markdown, plot

        rows = lighting_table(args.steps)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        table = markdown(rows)
        (args.output_dir / "lighting.md").write_text(table + "\n", encoding="utf-8")
        plot(rows, args.output_dir / "lighting.png")
        print("generated / data brightness std (1 is right; exact Gaussian oracle, 64x64x4 latent):")
        print(table)
        print(f"table and plot in {args.output_dir}")
    elif args.command == "export-checkpoint":
        _export_checkpoint(args)
    elif args.command == "checkpoint-settings":
        from .checkpoints import scheduler_settings_from_checkpoint

        print(json.dumps(scheduler_settings_from_checkpoint(args.checkpoint)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
