"""``diffusers-ztsnr``: the offline demo and the tools around the package.

commands: demo, inspect, lighting, grade, audit-weights, probe-conversion, export-checkpoint, checkpoint-settings,
make-tiny
(``diffusers-ztsnr <command> --help`` for each)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def idle_cpus(seconds: float = 0.25) -> float | None:
    """How many of this machine's CPUs were idle over the last ``seconds`` (from ``/proc/stat``; ``None`` where
    it cannot be read). Unlike the load average, which trails by a minute, this sees the machine as it is now."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields[3:5]), sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def demo_threads(requested: int | None) -> int:
    """Torch's CPU thread count for the demo: ``requested``, else the CPUs idle right now (:func:`idle_cpus`, or
    the CPUs this process may use minus the one-minute load average where ``/proc/stat`` is missing), at least 1,
    at most 4 and at most the CPUs this process may use. Oversubscribing a busy machine costs far more than it
    gains: two threads on two busy cores ran the demo's kind of small convolutions 10x slower than one."""
    if requested is not None:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cpus()
    if idle is None:
        idle = cpus - (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    return max(1, min(4, cpus, round(idle)))


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


def build_parser() -> argparse.ArgumentParser:
    parser = _parser(prog="diffusers-ztsnr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_demo(sub)
    insp = _subparser(sub, "inspect", "terminal SNR, sigma_max, timestep grid and warnings of a scheduler config")
    insp.add_argument("path", type=Path, help="pipeline folder, scheduler folder or scheduler_config.json")
    insp.add_argument("--steps", type=int, default=20, help="number of inference steps to lay out")
    insp.add_argument("--spacing", default=None, help="timestep spacing to inspect (default: the config's own)")
    insp.add_argument("--lora", type=Path, default=None, help="a LoRA / checkpoint file to check its markers against")
    insp.add_argument("--plot", type=Path, default=None, help="also write the log-SNR plot to this PNG")
    light = _subparser(sub, "lighting", "the uniform-lighting curse computed exactly: table and plot")
    light.add_argument("--output_dir", type=Path, default=Path("lighting_output"), help="where lighting.md/png go")
    light.add_argument("--steps", type=_step_list, default="5,10,25,50,100", help="comma-separated step counts")
    _add_grade(sub)
    export = _subparser(sub, "export-checkpoint", "merge a LoRA into its base: one original-layout checkpoint with "
                        "v_pred/ztsnr markers (SD1.x/2.x/SDXL)")
    export.add_argument("lora_dir", type=Path, help="diffusers-format LoRA folder (pytorch_lora_weights.safetensors)")
    export.add_argument("out", type=Path, help="output .safetensors file")
    export.add_argument("--base", default=None, help="base pipeline (default: the LoRA's training_args.json)")
    export.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="weight dtype of the file")
    audit = _subparser(sub, "audit-weights", "the effective loss weight in x0 space per log-SNR of a run's training "
                       "flags (target x weighting x time density x shift), with warnings")
    audit.add_argument("--plot", type=Path, default=None, help="also write a bar chart to this PNG")
    audit.add_argument("flags", nargs=argparse.REMAINDER, help="the training script's flags, after --")
    _add_probe(sub)
    marks = _subparser(sub, "checkpoint-settings", "scheduler settings from a checkpoint's v_pred/ztsnr markers")
    marks.add_argument("checkpoint", type=Path, help="a .safetensors LoRA or checkpoint")
    tiny = _subparser(sub, "make-tiny", "save a tiny random-weight pipeline, for tests and experiments")
    tiny.add_argument("kind", metavar="kind", help="one of: sd15, sdxl, sd3, flux")
    tiny.add_argument("output_dir", type=Path, help="folder to save_pretrained into")
    tiny.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    return parser


def _parser(**kwargs) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)


def _subparser(sub, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, allow_abbrev=False,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _add_probe(sub) -> None:
    probe = _subparser(sub, "probe-conversion", "did an epsilon -> v + ZTSNR conversion take? x0 at the first step "
                       "and the brightness range, base against base + LoRA (SD 1.x / 2.x)")
    probe.add_argument("base", help="the base pipeline (folder or Hub id)")
    probe.add_argument("lora", type=Path, help="the LoRA output folder (pytorch_lora_weights.safetensors, scheduler/)")
    probe.add_argument("--data", type=Path, default=None, help="the training images, for the brightness range")
    probe.add_argument("--prompts", default=None, help="prompts for dark | mid | bright scenes, separated by |")
    probe.add_argument("--resolution", type=int, default=512, help="image size in pixels")
    probe.add_argument("--steps", type=int, default=20, help="sampling steps of the generated images")
    probe.add_argument("--draws", type=int, default=8, help="noise draws per prompt at the first step")
    probe.add_argument("--images", type=int, default=2, help="generated images per prompt")
    probe.add_argument("--guidance_scale", type=float, default=5.0, help="classifier-free guidance of the images")


def _probe(args: argparse.Namespace) -> None:
    from diffusers import DiffusionPipeline

    from .probe import DEFAULT_PROMPTS, probe_conversion

    prompts = tuple(p.strip() for p in args.prompts.split("|")) if args.prompts else DEFAULT_PROMPTS
    pipe = DiffusionPipeline.from_pretrained(args.base, safety_checker=None, requires_safety_checker=False)
    report = probe_conversion(pipe, args.lora, args.data, prompts, args.guidance_scale, draws=args.draws,
                              resolution=args.resolution, steps=args.steps, images=args.images)
    print("\n".join(report.lines()))


def _sigma_list(text: str) -> list[float]:
    """``--sigmas 14.6,9.7,...,0``: comma-separated numbers (``inf`` allowed)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: comma-separated numbers, e.g. inf,14.6,3.2,0")\
            from None


def _add_grade(sub) -> None:
    from .grade import SAMPLERS, SCHEDULER_NAMES

    grade = _subparser(sub, "grade", "measure a sampling schedule: the per-band error and the brightness it leaves "
                       "on an exact image-like Gaussian oracle")
    which = grade.add_mutually_exclusive_group(required=True)
    which.add_argument("--sigmas", type=_sigma_list, help="noise levels, decreasing: sigma/alpha on the VP path "
                       "(k-diffusion / ComfyUI sigmas, inf = SNR 0), flow time s in (0, 1] on the flow path")
    which.add_argument("--scheduler", choices=SCHEDULER_NAMES,
                       help="a ComfyUI scheduler, or ours (logsnr; logsnr_warped, UniPC's)")
    grade.add_argument("--steps", type=int, default=20, help="model evaluations, with --scheduler")
    grade.add_argument("--path", choices=("vp", "flow"), default="vp",
                       help="vp: SD's schedule, v-prediction; flow: a flow-matching model")
    grade.add_argument("--no_zero_terminal_snr", action="store_true",
                       help="VP: SD's schedule as released (terminal SNR 0.0047) instead of its ZTSNR rescale")
    grade.add_argument("--shift", type=float, default=3.0, help="flow: the shift of --scheduler's levels")
    grade.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m", help="the sampler that walks the list")


def _grade(args: argparse.Namespace) -> None:
    from .analytic import image_like_band_stds
    from .grade import grade, named_sigmas

    ztsnr = not args.no_zero_terminal_snr
    sigmas = args.sigmas or named_sigmas(args.scheduler, args.steps, args.path, ztsnr, args.shift)
    log_gain = grade(sigmas, args.path, ztsnr, args.sampler)
    print("sigmas: " + ", ".join(f"{v:.4g}" for v in sigmas))
    print("band | data std | output std / data std | log gain")
    for k, (std, g) in enumerate(zip(image_like_band_stds(len(log_gain)).tolist(), log_gain.tolist(), strict=True)):
        name = " (brightness)" if k == 0 else " (finest detail)" if k == len(log_gain) - 1 else ""
        print(f"b{k}{name} | {std:.3g} | {math.exp(g):.4f} | {g:+.4f}")
    worst = int(log_gain.abs().argmax())
    print(f"worst band: b{worst}, |log gain| {abs(float(log_gain[worst])):.4f}; "
          f"brightness kept: {math.exp(float(log_gain[0])):.1%}")


def _add_demo(sub) -> None:
    from .demo.run import DemoSettings

    d = DemoSettings()
    demo = _subparser(sub, "demo", "offline, under 3 minutes on 2 idle CPU cores: train a tiny epsilon model on SD's "
                      "schedule, convert it to v-prediction + zero terminal SNR with a LoRA, and draw the same "
                      "prompts before and after (before_after.png) with the measured brightness spreads")
    demo.add_argument("--output_dir", type=Path, default=Path("demo_output"), help="where everything is written")
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of the data, the training runs and the figure")
    demo.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads (default: the CPUs idle right now, 1 to 4)")
    demo.add_argument("--vae_steps", type=int, default=d.vae_steps, help="training steps of the base model's VAE")
    demo.add_argument("--base_steps", type=int, default=d.unet_steps,
                      help="training steps of the base model's epsilon UNet")
    demo.add_argument("--train_steps", type=int, default=d.convert_steps,
                      help="LoRA steps of the epsilon -> v + ZTSNR conversion")
    demo.add_argument("--steps", type=int, default=d.sampling_steps, help="sampling steps of the figure")
    demo.add_argument("--num_images", type=int, default=d.images_per_prompt,
                      help="images (seeds) per prompt in the figure")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line naming the fix, not a traceback
        parser.error(f"{args.command}: {error}")
    return 2


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    from .demo.run import DemoSettings, run_demo

    for flag in ("vae_steps", "base_steps", "train_steps", "steps", "num_images", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be >= 1 (got {value})")
    torch.set_num_threads(demo_threads(args.threads))
    settings = DemoSettings(seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.base_steps,
                            convert_steps=args.train_steps, sampling_steps=args.steps,
                            images_per_prompt=args.num_images)
    print(f"diffusers-ztsnr demo: offline, {torch.get_num_threads()} torch thread(s), output in {args.output_dir}")
    result = run_demo(args.output_dir, settings)
    spread, ratio = result.spread, result.ratio
    print(f"brightness spread (std of per-image mean brightness): data {spread['data']:.3f}, "
          f"before {spread['before']:.3f} ({ratio['before']:.0%} of the data's), "
          f"after {spread['after']:.3f} ({ratio['after']:.0%})")
    apart = result.separation
    print(f"bright-prompt minus dark-prompt brightness, as a share of the data's: before {apart['before']:.0%}, "
          f"after {apart['after']:.0%}")
    print(f"figure (before | after):    {result.paths['figure']}")
    print(f"base model (epsilon):       {result.paths['base']}")
    print(f"LoRA (diffusers format):    {result.paths['lora']}")
    print(f"LoRA (kohya / ComfyUI):     {result.paths['kohya']}")
    print(f"scheduler config:           {result.paths['scheduler']}/scheduler_config.json")
    print(f"model card:                 {result.paths['card']}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))
    print(f"next: diffusers-ztsnr inspect {result.paths['base']}   (why the base never starts at SNR 0)")


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


def _audit_weights(args: argparse.Namespace) -> None:
    from .training.objectives.audit import audit_plot
    from .training.weight_audit import audit_for_flags

    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    audit, _, script = audit_for_flags(flags)
    print(f"{script}: effective loss weight in x0 space per log-SNR bin")
    print(audit.table())
    if args.plot:
        audit_plot(audit, args.plot)
        print(f"plot: {args.plot}")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "demo":
        _demo(parser, args)
    elif args.command == "make-tiny":
        from .testing.tiny import TINY_KINDS, save_tiny_pipeline

        if args.kind not in TINY_KINDS:
            parser.error(f"unknown kind {args.kind!r}; allowed: {', '.join(TINY_KINDS)}")
        print(save_tiny_pipeline(args.kind, args.output_dir, seed=args.seed))
    elif args.command == "inspect":
        from .diagnose import inspect_scheduler_config, load_scheduler_config, plot_log_snr
        from .markers import scheduler_settings_from_checkpoint

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
    elif args.command == "grade":
        _grade(args)
    elif args.command == "probe-conversion":
        _probe(args)
    elif args.command == "audit-weights":
        _audit_weights(args)
    elif args.command == "export-checkpoint":
        _export_checkpoint(args)
    elif args.command == "checkpoint-settings":
        from .markers import scheduler_settings_from_checkpoint

        print(json.dumps(scheduler_settings_from_checkpoint(args.checkpoint)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
