"""Command-line flags shared by the training scripts, and ``--config`` files with the same keys.

Flag names follow diffusers' example training scripts where the option exists there
(``--pretrained_model_name_or_path``, ``--train_data_dir``, ``--snr_gamma``, ...); ours are added
beside them (``--zero_terminal_snr``, ``--timestep_shift``, ``--cache_latents``, ...). A ``--config``
YAML or JSON file holds the same names as keys; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MIXED_PRECISION = ("no", "fp16", "bf16")
# AdamW moves every weight by up to the learning rate per step: above 1 a LoRA diverges within steps
MAX_LEARNING_RATE = 1.0
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", type=str, default=None, help="YAML or JSON file whose keys are these flags' names.")
    # model and data (diffusers names)
    a("--pretrained_model_name_or_path", type=str, required=False, default=None,
      help="Hub repo id or local folder of the base diffusers pipeline.")
    a("--revision", type=str, default=None)
    a("--variant", type=str, default=None)
    a("--train_data_dir", type=str, default=None, help="imagefolder with metadata.jsonl captions.")
    a("--dataset_name", type=str, default=None, help="a datasets Hub name (or a local dataset folder).")
    a("--dataset_config_name", type=str, default=None)
    a("--image_column", type=str, default="image")
    a("--caption_column", type=str, default="text")
    a("--max_train_samples", type=int, default=None)
    a("--cache_dir", type=str, default=None)
    a("--resolution", type=int, default=512)
    a("--center_crop", action="store_true", help="center crop (default: random crop).")
    a("--random_flip", action="store_true")
    a("--bucketing", action="store_true", help="aspect-ratio bucketing instead of square crops.")
    a("--cache_latents", action="store_true", help="encode images and captions once, cache them on disk.")
    a("--cache_latents_dir", type=str, default=None,
      help="where --cache_latents keeps encodings (default: <--cache_dir or ~/.cache/diffusers-ztsnr>/encodings).")
    a("--dataloader_num_workers", type=int, default=0)
    a("--follow_symlinks", action="store_true",
      help="follow symlinks in --train_data_dir that point outside it (refused by default).")
    # optimisation (diffusers names)
    a("--output_dir", type=str, default="lora-output")
    a("--overwrite_output_dir", action="store_true",
      help="start a new run in an output_dir that holds another one: its checkpoints and run records are deleted.")
    a("--seed", type=int, default=0)
    a("--train_batch_size", type=int, default=1)
    a("--num_train_epochs", type=int, default=100)
    a("--max_train_steps", type=int, default=None)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=1e-4)
    a("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    a("--lr_warmup_steps", type=int, default=0)
    a("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (pip install bitsandbytes).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION)
    a("--rank", type=int, default=4, help="LoRA rank.")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    a("--train_text_encoder", action="store_true", help="also train LoRA on the text encoder(s).")
    a("--use_ema", action="store_true", help="keep an exponential moving average of the LoRA weights; save it.")
    a("--ema_decay", type=float, default=0.9999)
    # checkpoints, logging, validation, publishing (diffusers names)
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", type=str, default=None, help='a checkpoint folder, or "latest".')
    a("--resume_despite_changes", action="store_true",
      help="resume although the flags, base model or data differ from the run's record (the changes are recorded).")
    a("--logging_dir", type=str, default="logs")
    a("--report_to", type=str, default="tensorboard", help='"tensorboard" or "none".')
    a("--validation_prompt", type=str, default=None)
    a("--num_validation_images", type=int, default=4)
    a("--validation_steps", type=int, default=100, help="sample validation images every N steps.")
    a("--validation_inference_steps", type=int, default=20)
    a("--max_consecutive_bad_losses", type=int, default=5,
      help="a NaN/Inf loss skips its optimizer step; this many in a row stop the run with a diagnosis.")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", type=str, default=None)
    a("--hub_token", type=str, default=None,
      help="Hub token for --push_to_hub (never written anywhere); default: HF_TOKEN or `hf auth login`.")
    a("--hub_public", action="store_true", help="create the Hub repository public (default: private).")
    a("--license", type=str, default=None,
      help="license id for the model card (e.g. creativeml-openrail-m, apache-2.0); default: the base model's.")


def check_common_args(args: argparse.Namespace) -> list[str]:
    """Problems with the flags every script shares (returned, so a script can add its own)."""
    problems = []
    if not args.pretrained_model_name_or_path:
        problems.append("--pretrained_model_name_or_path is required")
    if (args.train_data_dir is None) == (args.dataset_name is None):
        problems.append("pass exactly one of --train_data_dir and --dataset_name")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "resolution", "checkpointing_steps",
                 "validation_steps", "num_train_epochs", "validation_inference_steps", "rank",
                 "num_validation_images", "max_consecutive_bad_losses"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    for flag in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag} must be >= 1 (got {value})")
    for flag in ("lr_warmup_steps", "dataloader_num_workers"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    problems += check_optimizer_args(args)
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        problems.append(f"--lora_alpha must be > 0 (got {args.lora_alpha})")
    if args.resolution % 8:
        problems.append(f"--resolution must be a multiple of 8 (the VAE factor), got {args.resolution}")
    if args.cache_latents and args.train_text_encoder:
        problems.append("--cache_latents caches the text embeddings too, so it cannot train the text encoder: "
                        "drop --train_text_encoder or --cache_latents")
    if args.cache_latents and not args.center_crop and not args.bucketing:
        problems.append("--cache_latents freezes the random crop: add --center_crop (or drop --cache_latents)")
    if not 0 < args.ema_decay < 1:
        problems.append(f"--ema_decay must lie in (0, 1) (got {args.ema_decay})")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        problems.append("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would resume: pass "
                        "one of them")
    if args.report_to not in ("tensorboard", "none"):
        problems.append(f"--report_to must be 'tensorboard' or 'none' (got {args.report_to!r})")
    return problems


def check_optimizer_args(args: argparse.Namespace) -> list[str]:
    """Learning rate and AdamW settings outside any range that trains (they overflow or divide by zero)."""
    problems = []
    lr = args.learning_rate
    if not (math.isfinite(lr) and 0 < lr <= MAX_LEARNING_RATE):
        problems.append(f"--learning_rate must lie in (0, {MAX_LEARNING_RATE:g}] (got {lr:g}; LoRA fine-tuning "
                        "usually takes 1e-5 to 1e-3)")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            problems.append(f"--{flag} must lie in [0, 1) (got {getattr(args, flag)})")
    if not (math.isfinite(args.adam_epsilon) and 0 < args.adam_epsilon <= 1):
        problems.append(f"--adam_epsilon must lie in (0, 1] (got {args.adam_epsilon:g}; 1e-8 is usual, 0 divides "
                        "by zero where a gradient is 0)")
    if not (math.isfinite(args.adam_weight_decay) and 0 <= args.adam_weight_decay * lr < 1):
        problems.append(f"--adam_weight_decay must be >= 0 with --learning_rate x --adam_weight_decay < 1 (got "
                        f"{args.adam_weight_decay:g}; 1e-2 is usual)")
    if not (math.isfinite(args.max_grad_norm) and args.max_grad_norm > 0):
        problems.append(f"--max_grad_norm must be a finite number > 0 (got {args.max_grad_norm})")
    return problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise SystemExit("error: " + "; ".join(problems) + ".")


def add_vp_objective_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
      help="training target; default: the base model's. epsilon -> v_prediction is the ZTSNR recipe.")
    a("--zero_terminal_snr", action="store_true", help="train on the ZTSNR rescale of the base schedule.")
    a("--snr_gamma", type=float, default=None, help="min-SNR-gamma loss weighting (5.0 is the paper's).")
    a("--debiased_estimation", action="store_true", help="debiased-estimation loss weighting.")
    a("--timestep_shift", type=float, default=1.0, help="> 1 samples noisier training timesteps.")
    a("--noise_offset", type=float, default=0.0)
    a("--input_perturbation", type=float, default=0.0)


def add_flow_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """Flow-matching flags, named as in diffusers' SD3 / Flux DreamBooth-LoRA scripts."""
    from .objectives import FLOW_WEIGHTING_SCHEMES

    a = parser.add_argument
    a("--weighting_scheme", type=str, default="logit_normal", choices=FLOW_WEIGHTING_SCHEMES,
      help="logit_normal / mode: density of the training time s; none / sigma_sqrt / cosmap: uniform s and that "
           "loss weight (Esser et al. 2024, section 3.1).")
    a("--logit_mean", type=float, default=0.0, help="mean of the logit-normal time density.")
    a("--logit_std", type=float, default=1.0, help="std of the logit-normal time density.")
    a("--mode_scale", type=float, default=1.29, help="scale of the mode time density.")
    a("--precondition_outputs", type=int, default=0, choices=(0, 1),
      help="1: turn the output into x0 = x_s - s * u and regress x0 (EDM-style preconditioning), 0: regress the "
           "velocity eps - x0.")


FLOW_OBJECTIVE_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")


def check_flow_objective_arguments(args: argparse.Namespace) -> list[str]:
    """Problems with the flow-matching flags (returned, like :func:`check_common_args`)."""
    from .objectives import check_flow_weighting

    try:
        check_flow_weighting(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    except ValueError as error:
        return [str(error).rstrip(".")]
    return []


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; values from ``--config`` fill every flag not given on the command line."""
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = load_config_file(pre.config)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"error: --config {pre.config} has unknown keys {unknown}; keys are the flag names.")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --config {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of flag names to values.")
    return values
