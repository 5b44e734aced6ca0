"""``diffusers-ztsnr audit-weights``: the effective-weight audit (:mod:`.objectives.audit`) of a run's flags, before
training (every run prints the same table at its start: :func:`.objectives.audit.report_weight_audit`).

Only the base model's scheduler config is read (no weights): the audit of a Hub model costs one small download.
"""

from __future__ import annotations

import argparse

from .objectives.audit import VAE_FACTOR, WeightAudit, audit_objective

FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def _flag(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def audit_for_flags(argv: list[str]) -> tuple[WeightAudit, argparse.Namespace, str]:
    """Parse ``argv`` as the training script of the base model's family would, build its objective from the base
    scheduler config, and audit it. Returns the audit, the parsed flags and the script's name."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    model = _flag(argv, "--pretrained_model_name_or_path")
    if model is None:
        raise SystemExit("audit-weights: pass the training flags, --pretrained_model_name_or_path included")
    class_name = DiffusionPipeline.load_config(model).get("_class_name")
    if _flag(argv, "--train_data_dir") is None and _flag(argv, "--dataset_name") is None:
        argv = [*argv, "--train_data_dir", "."]  # the data plays no part in the weights
    scheduler_config = dict(DDPMScheduler.load_config(model, subfolder="scheduler"))  # any class reads the file
    if class_name in FLOW_PIPELINES:
        from .families.flow_transformers import flow_objective
        from .flow import parse_args

        args = parse_args(argv)
        objective, script = flow_objective(args, scheduler_config), "train_lora_flow.py"
    else:
        from .families.sd import unet_objective
        from .unet import parse_args

        args = parse_args(argv)
        objective, script = unet_objective(args, scheduler_config), "train_lora_unet.py"
    return audit_objective(objective, resolution_latents=args.resolution // VAE_FACTOR), args, script
