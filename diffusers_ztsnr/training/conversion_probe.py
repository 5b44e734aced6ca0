"""The conversion probe at the end of a zero-terminal-SNR run: did the epsilon -> v + ZTSNR conversion take?

``--conversion_probe auto`` (default) runs :func:`diffusers_ztsnr.probe.probe_conversion` after the LoRA and its
``scheduler/`` are written, when ``--zero_terminal_snr`` is set and the base is an SD 1.x / 2.x pipeline: the base
as it was against the base with the files just written loaded into it (what a user loads), at the training
resolution; the training folder's brightness range when the data is a local folder. The numbers and the verdict
go to ``conversion_probe.json`` and to the model card; the run's outcome does not depend on them. ``off`` skips
it (it samples 3 prompts x 2 images x 20 steps twice: seconds on a GPU, minutes on a CPU at 512 px).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from ..probe import ConversionReport, probe_conversion
from .task import ModelTask

logger = logging.getLogger(__name__)

PROBE_CHOICES = ("auto", "off")
PROBE_FILE = "conversion_probe.json"
#: the families :mod:`diffusers_ztsnr.probe` reads (one CLIP text encoder, a UNet)
PROBED_FAMILIES = ("sd1", "sd2")
#: one image per prompt in 10 steps of the shipped sampler: the brightness of a dark / mid / bright scene, at a
#: quarter of ``probe-conversion``'s default cost (2 images, 20 steps)
PROBE_STEPS, PROBE_IMAGES = 10, 1


def add_conversion_probe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--conversion_probe", choices=PROBE_CHOICES, default="auto",
        help="auto: with --zero_terminal_snr on an SD 1.x / 2.x base, probe the written LoRA at the end (x0 at "
             "the first step, brightness range; numbers and verdict in conversion_probe.json and the model card); "
             "off: skip it.")


def skip_reason(args: argparse.Namespace, family: str) -> str | None:
    """Why the probe does not run for this run (``None``: it runs)."""
    if getattr(args, "conversion_probe", "auto") == "off" or not getattr(args, "zero_terminal_snr", False):
        return "off"
    if family not in PROBED_FAMILIES:
        return f"the probe reads SD 1.x / 2.x pipelines, not {family}"
    if getattr(args, "full_finetune", False):
        return "the probe loads a LoRA; this run wrote a whole pipeline"
    if getattr(args, "adapter", "lora") not in ("lora", "dora"):
        return f"diffusers cannot load --adapter {args.adapter} files"
    return None


def run_conversion_probe(args: argparse.Namespace, task: ModelTask, output_dir: Path,
                         device: torch.device) -> ConversionReport | None:
    """Probe the files in ``output_dir`` on a fresh copy of the base pipeline; ``None`` when skipped."""
    from .inputs import load_base_pipeline, looks_local

    reason = skip_reason(args, task.family)
    if reason is not None:
        if reason != "off":
            logger.info("conversion probe skipped: %s", reason)
        return None
    pipe = load_base_pipeline(args, task.pipeline_class.__name__)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    data = args.train_data_dir if args.train_data_dir and looks_local(args.train_data_dir) else None
    report = probe_conversion(pipe, output_dir, data, resolution=args.resolution, seed=args.seed or 0,
                              steps=PROBE_STEPS, images=PROBE_IMAGES)
    (output_dir / PROBE_FILE).write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    for line in report.lines():
        logger.info("conversion probe: %s", line)
    return report


def card_section(report: ConversionReport | None) -> str:
    """The model card's "Conversion probe" section ("" without a report)."""
    if report is None:
        return ""
    verdict = "**converted**" if report.converted_ok else "**not converted**"
    items = "\n".join(f"- {line}" for line in report.lines()[:-1])
    return (f"\n## Conversion probe\n\nMeasured at the end of training ({verdict}; `diffusers-ztsnr "
            f"probe-conversion` repeats it with more images, numbers in `{PROBE_FILE}`):\n\n{items}\n")
