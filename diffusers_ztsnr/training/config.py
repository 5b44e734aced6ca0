"""Command-line flags shared by the training scripts, and ``--config`` files with the same keys.

Flag names follow diffusers' example training scripts where the option exists there
(``--pretrained_model_name_or_path``, ``--train_data_dir``, ``--snr_gamma``, ...); ours are added
beside them (``--zero_terminal_snr``, ``--timestep_shift``, ``--cache_latents``, ...). A ``--config``
YAML or JSON file holds the same names as keys; flags given on the command line win over the file.

Flags are never abbreviated (``--learning_rat`` is an error naming ``--learning_rate``, not a silent match), and a
config file's keys and values go through the same parser as the command line: an unknown key, a value of the wrong
type or outside a flag's choices is a one-line error naming the file.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MIXED_PRECISION = ("no", "fp16", "bf16")
# AdamW moves every weight by up to the learning rate per step: above 1 a LoRA diverges within steps
MAX_LEARNING_RATE = 1.0
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
REPORT_TO = ("tensorboard", "none")
USAGE_EXIT_CODE = 2  # argparse's status for a bad command line; ours is the same for bad flags and inputs

LAUNCH_EPILOG = """\
--config FILE (.yaml, .yml or .json) holds flags as keys, named without the leading --; flags on the command
line win over the file. Examples: examples/configs/.

Errors: a bad flag, config key or input path stops the script before it writes anything, with one line on
stderr and exit status 2. Under `accelerate launch` (single process), accelerate re-raises a failed script as a
Python traceback ending in subprocess.CalledProcessError, printed after our line; `accelerate launch -q ...`
(--quiet) leaves our line last and exits with status 1. With several processes, torchrun prints its
ChildFailedError report after our line, with or without -q.
"""


class UsageError(SystemExit):
    """A bad flag, config key or input: one line, ``error: ...``, raised before anything is written.

    In-process it is a ``SystemExit`` carrying the message (like argparse's own errors); the scripts print the line
    and exit with status 2 (:func:`run_script`)."""

    def __init__(self, message: str):
        super().__init__(message if message.startswith("error: ") else f"error: {message}")


class InputError(ValueError):
    """An input the run cannot use (an output folder holding another run, no checkpoint to resume, a model of the
    other script's family); the message says what to change. The scripts print it as one line (status 2)."""


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each flag's default unless its help already says what the default is; an unset (``None``)
    or off (``False``) default is left unsaid, the help text says what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unsaid = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or "default" in text or unsaid:
            return text
        return f"{text} (default: %(default)s)"


class TrainingArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: no abbreviated flags, defaults and the launch notes in ``--help``, and an unknown flag
    named together with the closest real one."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        kwargs.setdefault("epilog", LAUNCH_EPILOG)
        super().__init__(**kwargs)
        self.source: str | None = None  # where the arguments being parsed come from, for error messages

    def option_names(self) -> list[str]:
        return [a.dest for a in self._actions if a.option_strings and a.dest != "help"]

    def parse_args(self, args: Sequence[str] | None = None,
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [e.split("=", 1)[0] for e in extras if e.startswith("--")]
            hint = did_you_mean(flags, self.option_names(), "--")
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def error(self, message: str) -> NoReturn:
        if not is_first_rank():  # under torchrun every rank parses the same flags: one copy of the error
            self.exit(USAGE_EXIT_CODE)
        super().error(f"{message} (in {self.source})" if self.source else message)


def did_you_mean(names: list[str], options: Iterable[str], prefix: str) -> str:
    """`` (did you mean --x?)`` for the closest option of each of ``names`` (empty when none is close)."""
    options = list(options)
    pairs = [(name, f"{prefix}{c}") for name in names if (c := closest_option(name, options))]
    if not pairs:
        return ""
    if len(names) == 1:
        return f" (did you mean {pairs[0][1]}?)"
    return f" (did you mean {', '.join(f'{c} for {name}' for name, c in pairs)}?)"


def closest_option(name: str, options: Iterable[str]) -> str | None:
    """The option a misspelt or shortened ``name`` most likely meant (``None``: nothing close)."""
    options = list(options)
    key = name.lstrip("-").replace("-", "_")
    starting = [o for o in options if o.startswith(key)]
    if len(starting) == 1:
        return starting[0]
    close = difflib.get_close_matches(key, starting or options, n=1, cutoff=0.6)
    return close[0] if close else None


USAGE = ("%(prog)s [-h] [--config FILE] --pretrained_model_name_or_path MODEL (--train_data_dir DIR | "
         "--dataset_name NAME) [--output_dir DIR] [flags; see --help]")


def make_parser(description: str) -> TrainingArgumentParser:
    # the short usage: argparse prints it above every error, where the full list of flags would bury the error
    return TrainingArgumentParser(description=description, usage=USAGE)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", type=str, default=None, help="YAML or JSON file whose keys are these flags' names.")
    # model and data (diffusers names)
    a("--pretrained_model_name_or_path", type=str, required=False, default=None,
      help="Hub repo id (owner/name) or local folder of the base diffusers pipeline (the folder holding "
           "model_index.json). Required.")
    a("--revision", type=str, default=None, help="Hub branch, tag or commit of the base model (default: main).")
    a("--variant", type=str, default=None,
      help="weight file variant of the base model, e.g. fp16 (default: the full-precision files).")
    a("--train_data_dir", type=str, default=None,
      help="imagefolder with metadata.jsonl captions (this or --dataset_name).")
    a("--dataset_name", type=str, default=None,
      help="a datasets Hub name (or a local dataset folder) (this or --train_data_dir).")
    a("--dataset_config_name", type=str, default=None, help="the --dataset_name configuration, if it has several.")
    a("--image_column", type=str, default="image", help="dataset column holding the images.")
    a("--caption_column", type=str, default="text", help="dataset column holding the captions.")
    a("--max_train_samples", type=int, default=None, help="train on the first N examples only (default: all).")
    a("--cache_dir", type=str, default=None,
      help="download cache for --dataset_name (default: the datasets cache); also the parent of the default "
           "--cache_latents_dir.")
    a("--resolution", type=int, default=512, help="training image size in pixels (square side, or bucket area).")
    a("--center_crop", action="store_true", help="center crop (default: random crop).")
    a("--random_flip", action="store_true", help="flip half the images horizontally.")
    a("--bucketing", action="store_true", help="aspect-ratio bucketing instead of square crops.")
    a("--cache_latents", action="store_true", help="encode images and captions once, cache them on disk.")
    a("--cache_latents_dir", type=str, default=None,
      help="where --cache_latents keeps encodings (default: <--cache_dir or ~/.cache/diffusers-ztsnr>/encodings).")
    a("--dataloader_num_workers", type=int, default=0, help="data loading worker processes (0: the main process).")
    a("--follow_symlinks", action="store_true",
      help="follow symlinks in --train_data_dir that point outside it (refused by default).")
    # optimisation (diffusers names)
    a("--output_dir", type=str, default="lora-output",
      help="where checkpoints, the LoRA files, the scheduler config and the model card are written.")
    a("--overwrite_output_dir", action="store_true",
      help="start a new run in an output_dir that holds another one: its checkpoints and run records are deleted.")
    a("--seed", type=int, default=0, help="seed of the data order, noise and timesteps (resume-exact).")
    a("--train_batch_size", type=int, default=1, help="images per process and micro-step.")
    a("--num_train_epochs", type=int, default=100, help="epochs to train when --max_train_steps is not given.")
    a("--max_train_steps", type=int, default=None,
      help="optimizer steps to train (default: --num_train_epochs epochs); a resumed run counts from step 0.")
    a("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step.")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass (less "
      "memory, slower).")
    a("--learning_rate", type=float, default=1e-4, help="AdamW learning rate.")
    a("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS, help="learning-rate schedule.")
    a("--lr_warmup_steps", type=int, default=0, help="optimizer steps of linear learning-rate warm-up.")
    a("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (pip install bitsandbytes).")
    a("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    a("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    a("--adam_weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay.")
    a("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    a("--max_grad_norm", type=float, default=1.0, help="gradient norm clipping threshold.")
    a("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION,
      help="autocast dtype (default: accelerate's configuration, else no); fp16 needs a GPU.")
    a("--rank", type=int, default=4, help="LoRA rank.")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    a("--train_text_encoder", action="store_true", help="also train LoRA on the text encoder(s).")
    a("--use_ema", action="store_true", help="keep an exponential moving average of the LoRA weights; save it.")
    a("--ema_decay", type=float, default=0.9999, help="decay of --use_ema's average.")
    # checkpoints, logging, validation, publishing (diffusers names)
    a("--checkpointing_steps", type=int, default=500,
      help="write a resumable checkpoint every N optimizer steps (and at the last step).")
    a("--checkpoints_total_limit", type=int, default=None,
      help="keep only the N newest checkpoints (default: keep all).")
    a("--resume_from_checkpoint", type=str, default=None, help='a checkpoint folder, or "latest".')
    a("--resume_despite_changes", action="store_true",
      help="resume although the flags, base model or data differ from the run's record (the changes are recorded).")
    a("--logging_dir", type=str, default="logs", help="tensorboard folder, relative to --output_dir.")
    a("--report_to", type=str, default="tensorboard", choices=REPORT_TO, help="where losses are logged.")
    a("--validation_prompt", type=str, default=None,
      help="prompt sampled every --validation_steps and at the end (default: no validation images).")
    a("--num_validation_images", type=int, default=4, help="images per validation.")
    a("--validation_steps", type=int, default=100, help="sample validation images every N steps.")
    a("--validation_inference_steps", type=int, default=20, help="sampler steps per validation image.")
    a("--max_consecutive_bad_losses", type=int, default=5,
      help="a NaN/Inf loss skips its optimizer step; this many in a row stop the run with a diagnosis.")
    a("--push_to_hub", action="store_true", help="upload the output folder's LoRA files and card to the Hub.")
    a("--hub_model_id", type=str, default=None, help="Hub repository for --push_to_hub (default: the --output_dir "
      "folder's name under your account).")
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
    if args.cache_latents and not args.center_crop:  # buckets crop randomly too, unless --center_crop
        problems.append("--cache_latents freezes the random crop: add --center_crop (or drop --cache_latents)")
    if not 0 < args.ema_decay < 1:
        problems.append(f"--ema_decay must lie in (0, 1) (got {args.ema_decay})")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        problems.append("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would resume: pass "
                        "one of them")
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
        raise UsageError("error: " + "; ".join(problems) + ".")


def add_vp_objective_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
      help="training target; default: the base model's. epsilon -> v_prediction is the ZTSNR recipe.")
    a("--zero_terminal_snr", action="store_true", help="train on the ZTSNR rescale of the base schedule.")
    a("--snr_gamma", type=float, default=None,
      help="min-SNR-gamma loss weighting (5.0 is the paper's; default: unweighted).")
    a("--debiased_estimation", action="store_true", help="debiased-estimation loss weighting.")
    a("--timestep_shift", type=float, default=1.0, help="> 1 samples noisier training timesteps.")
    a("--noise_offset", type=float, default=0.0, help="add this much per-channel constant noise (0: off).")
    a("--input_perturbation", type=float, default=0.0,
      help="perturb the noise fed to the model by this scale, not the target's (0: off).")


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


# --- --config files ---------------------------------------------------------------------------------------


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; values from ``--config`` fill every flag not given on the command line.

    The file's entries become flags placed before the command line's (``key: value`` -> ``--key=value``,
    ``key: true`` -> ``--key``), so they are converted and checked exactly like typed flags, and a flag typed
    again later wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if not pre.config:
        return parser.parse_args(argv)
    tokens = config_tokens(parser, load_config_file(pre.config), pre.config)
    source = getattr(parser, "source", None)
    parser.source = f"--config {pre.config}"
    try:
        parser.parse_args(tokens)  # the file alone first: its errors name the file
    finally:
        parser.source = source
    return parser.parse_args([*tokens, *argv])


def config_tokens(parser: argparse.ArgumentParser, values: dict[str, Any], path: str | Path) -> list[str]:
    """The command-line spelling of a config file's entries; unknown keys are a :class:`UsageError` naming the
    closest flag."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = [str(k) for k in values if k not in actions]
    if unknown:
        hint = did_you_mean(unknown, actions, "")
        raise UsageError(f"error: --config {path} has unknown keys {sorted(unknown)}{hint}; keys are the flags' "
                         "names without the leading --.")
    tokens = []
    for key, value in values.items():
        flag = f"--{key}"
        if actions[key].nargs == 0:  # on/off flags
            if not isinstance(value, bool):
                raise UsageError(f"error: --config {path}: {key} is an on/off flag, give true or false (got "
                                 f"{value!r}).")
            tokens += [flag] if value else []
        elif isinstance(value, (dict, list)):
            raise UsageError(f"error: --config {path}: {key} takes one value (got {value!r}).")
        elif value is not None:
            tokens.append(f"{flag}={value}")  # '=' keeps a value such as -1 from reading as a flag
    return tokens


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"error: --config {path} does not exist.")
    values = _parse_config_text(path, path.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise UsageError(f"error: --config {path} must hold a mapping of flag names to values.")
    return values


def _parse_config_text(path: Path, text: str) -> Any:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except (yaml.YAMLError, ValueError) as error:
            raise UsageError(f"error: --config {path} is not valid YAML ({' '.join(str(error).split())}).") from error
    try:
        return json.loads(text)
    except ValueError as error:
        raise UsageError(f"error: --config {path} is not valid JSON ({error}).") from error


# --- the scripts' entry point -----------------------------------------------------------------------------


def run_script(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` as a command: a :class:`UsageError` or :class:`InputError` becomes one line on stderr
    (``<script>: error: ...``) and exit status 2, with no traceback; anything else propagates as usual."""
    prog = Path(sys.argv[0]).name or "train"
    try:
        main(sys.argv[1:] if argv is None else list(argv))
    except (UsageError, InputError) as error:
        message = str(error.code) if isinstance(error, UsageError) else f"error: {error}"
        sys.stdout.flush()  # whatever was printed before comes before the error line
        if is_first_rank():  # under torchrun every rank fails alike: print one copy
            print(f"{prog}: {' '.join(message.split())}", file=sys.stderr, flush=True)
        return USAGE_EXIT_CODE
    return 0


def is_first_rank() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a process started on its own (no ``RANK``)."""
    return os.environ.get("RANK", "0") == "0"
