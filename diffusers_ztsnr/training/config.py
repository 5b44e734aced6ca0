"""All the training scripts' flags and all their checks, in one place.

Flag names follow diffusers' example training scripts where the option exists there
(``--pretrained_model_name_or_path``, ``--train_data_dir``, ``--snr_gamma``, ...); ours are added
beside them (``--zero_terminal_snr``, ``--timestep_shift``, ``--cache_latents``, ...). A ``--config``
YAML or JSON file holds the same names as keys; flags given on the command line win over the file
(:mod:`diffusers_ztsnr.training.arguments`: the parser, config files and one-line errors).

Every check of every flag runs before anything is loaded or written, and all problems are reported at once.
"""

from __future__ import annotations

import argparse
import math

from .arguments import (  # noqa: F401  (re-exported: the scripts' parser and errors, where they always were)
    LAUNCH_EPILOG,
    USAGE,
    USAGE_EXIT_CODE,
    DefaultsHelpFormatter,
    InputError,
    TrainingArgumentParser,
    UsageError,
    closest_option,
    config_tokens,
    did_you_mean,
    is_first_rank,
    load_config_file,
    make_parser,
    parse_with_config,
    run_script,
)
from .data_flags import add_data_flags, data_flag_problems, flow_dataset_problems
from .full import full_finetune_problems
from .lycoris import lycoris_problems
from .quantization import QUANTIZATIONS
from .reference_images import add_reference_arguments, reference_problems
from .speed import COMPILE_MODES

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
MIXED_PRECISION = ("no", "fp16", "bf16")
# AdamW moves every weight by up to the learning rate per step: above 1 a LoRA diverges within steps
MAX_LEARNING_RATE = 1.0
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: ``--adapter``: plain LoRA, DoRA (peft's ``use_dora``), LyCORIS' LoKr and LoHa (:mod:`.lycoris`)
ADAPTERS = ("lora", "dora", "lokr", "loha")
REPORT_TO = ("tensorboard", "none")
OBJECTIVES = ("diffusion", "flow")
FLOW_OBJECTIVE_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")
DEFAULT_FLUX_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance, diffusers' Flux script default


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every training script takes (diffusers' names where diffusers' scripts have the option)."""
    add_model_and_data_arguments(parser)
    add_optimization_arguments(parser)
    add_output_arguments(parser)


def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The base model, the data and its loading."""
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
    a("--caption_dropout", type=float, default=0.0,
      help="probability of training a sample on the empty prompt instead of its caption, so classifier-free "
           "guidance keeps working after the fine-tune (0.1 is usual; 0: off).")
    a("--bucketing", action="store_true", help="aspect-ratio bucketing instead of square crops.")
    a("--cache_latents", action="store_true", help="encode images and captions once, cache them on disk.")
    a("--cache_latents_dir", type=str, default=None,
      help="where --cache_latents keeps encodings (default: <--cache_dir or ~/.cache/diffusers-ztsnr>/encodings).")
    a("--dataloader_num_workers", type=int, default=None,
      help="data loading worker processes (0: the main process; default 0 on the CPU, up to 4 on a GPU).")
    a("--follow_symlinks", action="store_true",
      help="follow symlinks in --train_data_dir that point outside it (refused by default).")
    add_data_flags(parser)


def add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    """Steps, batch, optimizer, precision, LoRA."""
    a = parser.add_argument
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
    a("--base_quantization", type=str, default="none", choices=QUANTIZATIONS,
      help="store the frozen denoiser's linear weights in int8 or fp8 (torchao) or nf4 (bitsandbytes, GPU); the "
           "LoRA trains in fp32 on top and loads on the unquantized model.")
    a("--torch_compile", type=str, nargs="?", const="regional", default="none", choices=COMPILE_MODES,
      help="torch.compile the denoiser: regional (the flag alone) compiles its repeated blocks (short compile), "
           "full the whole model; the first steps then include the compile.")
    a("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION,
      help="autocast dtype (default: accelerate's configuration, else no); fp16 needs a GPU.")
    a("--rank", type=int, default=4, help="LoRA rank.")
    a("--full_finetune", action="store_true",
      help="train every weight of the denoiser instead of an adapter; --output_dir becomes a pipeline folder "
           "(from_pretrained loads it) and --export_checkpoint writes it as one file.")
    a("--adapter", type=str, default="lora", choices=ADAPTERS,
      help="lora; dora (weight-decomposed LoRA: diffusers loads it, no kohya file); lokr / loha (LyCORIS' "
           "Kronecker / Hadamard adapters, SD-style UNets: written as lycoris.safetensors for ComfyUI and A1111 / "
           "Forge; diffusers cannot load them).")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    a("--train_text_encoder", action="store_true", help="also train LoRA on the text encoder(s).")
    a("--use_ema", action="store_true", help="keep an exponential moving average of the LoRA weights; save it.")
    a("--ema_decay", type=float, default=0.9999, help="decay of --use_ema's average.")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Checkpoints, logging, validation images, publishing."""
    a = parser.add_argument
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
    sources = (args.datasets, args.train_data_shards)
    if sources == (None, None) and (args.train_data_dir is None) == (args.dataset_name is None):
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
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    problems += check_optimizer_args(args)
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        problems.append(f"--lora_alpha must be > 0 (got {args.lora_alpha})")
    if args.resolution % 8:
        problems.append(f"--resolution must be a multiple of 8 (the VAE factor), got {args.resolution}")
    problems += full_finetune_problems(args)
    if getattr(args, "adapter", "lora") == "dora" and args.train_text_encoder:
        # measured with diffusers 0.42 / transformers 5: the text encoders' magnitudes are not loaded (left at ||W||)
        problems.append("--adapter dora with --train_text_encoder: diffusers' loader drops a text encoder's DoRA "
                        "magnitudes, so it would not load as trained; use --adapter lora to train the text encoder")
    if args.cache_latents and args.train_text_encoder:
        problems.append("--cache_latents caches the text embeddings too, so it cannot train the text encoder: "
                        "drop --train_text_encoder or --cache_latents")
    if args.cache_latents and not args.center_crop:  # buckets crop randomly too, unless --center_crop
        problems.append("--cache_latents freezes the random crop: add --center_crop (or drop --cache_latents)")
    problems += data_flag_problems(args)
    if not 0 <= args.caption_dropout <= 1:
        problems.append(f"--caption_dropout is a probability: it must lie in [0, 1] (got {args.caption_dropout})")
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


def check_flow_objective_arguments(args: argparse.Namespace) -> list[str]:
    """Problems with the flow-matching flags (returned, like :func:`check_common_args`)."""
    from .objectives import check_flow_weighting

    try:
        check_flow_weighting(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    except ValueError as error:
        return [str(error).rstrip(".")]
    return []


def add_timestep_shift_argument(parser: argparse.ArgumentParser, default: float | str, flow_model: bool) -> None:
    """``--timestep_shift``, one flag for both scripts, converted by :func:`parse_timestep_shift` as it is parsed (a
    value it refuses stays text, for the flag checks to report with the others)."""
    parser.add_argument(
        "--timestep_shift", type=lambda value: parse_timestep_shift(value, flow_model)[0], default=default,
        help="shift of the training times toward noise (SD3's shift k: u -> k u / (1 + (k - 1) u); > 1 noisier, "
             "1 none): a number > 0; 'auto' (what the base scheduler does at sampling: SD3's static shift, Flux's "
             "resolution-dependent mu; 1 for UNets); 'dynamic' (flow transformers: Flux's mu from each batch's "
             "token count).")


def parse_timestep_shift(value: float | str, flow_model: bool) -> tuple[float | str, str | None]:
    """``(converted value, problem)``: ``'auto'``, ``'dynamic'`` (flow transformers only) or a finite number > 0.
    A UNet's ``'auto'`` is 1 (VP schedulers do not shift)."""
    if value == "auto":
        return ("auto" if flow_model else 1.0), None
    if value == "dynamic":
        if flow_model:
            return value, None
        return value, ("--timestep_shift dynamic is the resolution-dependent shift of flow transformers; a UNet "
                       "takes a number > 0 (or auto)")
    try:
        shift = float(value)
    except ValueError:
        shift = float("nan")
    if shift > 0 and shift != math.inf:
        return shift, None
    allowed = "'auto', 'dynamic' or a number > 0" if flow_model else "'auto' or a number > 0"
    return value, f"--timestep_shift must be {allowed} (got {str(value)!r})"


def unet_parser(description: str) -> TrainingArgumentParser:
    """``train_lora_unet.py``'s flags: the common ones, the VP objective's, ``--objective flow``'s."""
    from .lora import DEFAULT_UNET_TARGETS

    parser = make_parser(description)
    add_common_arguments(parser)
    add_vp_objective_arguments(parser)
    add_timestep_shift_argument(parser, 1.0, flow_model=False)
    a = parser.add_argument
    a("--objective", type=str, default="diffusion", choices=OBJECTIVES,
      help="diffusion: the VP loss of --prediction_type; flow: rectified-flow matching through the equal-SNR mapping "
           "(needs --zero_terminal_snr).")
    add_flow_objective_arguments(parser)
    a("--lora_layers", type=str, default=None,
      help="comma-separated module names (or dotted name suffixes) to put LoRA on; Linear and Conv2d layers "
           f"(default: {','.join(DEFAULT_UNET_TARGETS)}, diffusers' LoRA example).")
    a("--export_checkpoint", type=str, default=None,
      help="also write the LoRA merged into the base as one single-file checkpoint in the original layout, with the "
           "v_pred / ztsnr keys ComfyUI and A1111 read (a path; relative ones lie in --output_dir), e.g. "
           "merged.safetensors.")
    a("--export_dtype", type=str, default="fp16", choices=("fp16", "bf16", "fp32"),
      help="dtype of --export_checkpoint.")
    return parser


def flow_parser(description: str) -> TrainingArgumentParser:
    """``train_lora_flow.py``'s flags: the common ones and the flow-matching objective's."""
    parser = make_parser(description)
    add_common_arguments(parser)
    add_flow_objective_arguments(parser)
    add_timestep_shift_argument(parser, "auto", flow_model=True)
    a = parser.add_argument
    a("--guidance_scale", type=float, default=None,
      help=f"guidance value fed to a guidance-distilled transformer (FLUX.1 / FLUX.2 dev) while training and "
           f"validating (default {DEFAULT_FLUX_GUIDANCE}; FLUX.2 dev: 4.0, its pipeline's); an error for models "
           "without a guidance embedding.")
    a("--lora_layers", type=str, default=None,
      help="comma-separated module names to put LoRA on, or a preset: attn, attn+ff, all-linear (default: the "
           "family's choice in diffusers' training example; see docs/training-flow.md).")
    a("--max_sequence_length", type=int, default=None,
      help="T5 prompt length in tokens (default: 77 for SD3, 512 for Flux, as diffusers' scripts).")
    add_reference_arguments(parser)
    return parser


def check_unet_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check of ``train_lora_unet.py``'s flags; converts ``--timestep_shift``. Raises :class:`UsageError`
    listing all problems."""
    problems = check_common_args(args) + lycoris_problems(args, flow=False)
    args.timestep_shift, problem = parse_timestep_shift(args.timestep_shift, flow_model=False)
    problems += [problem] if problem else []
    if args.objective == "flow":
        problems += check_flow_objective_arguments(args)
        if not args.zero_terminal_snr:
            problems.append("--objective flow starts its paths at pure noise (s = 1), which only a zero-terminal-SNR "
                            "schedule reaches: add --zero_terminal_snr")
        if args.snr_gamma or args.debiased_estimation:
            problems.append("--snr_gamma / --debiased_estimation weight the diffusion objective; with --objective flow "
                            "use --weighting_scheme (none, sigma_sqrt, cosmap, logit_normal, mode)")
    else:
        changed = [f"--{k}" for k in FLOW_OBJECTIVE_FLAGS if getattr(args, k) != parser.get_default(k)]
        if changed:
            problems.append(f"{', '.join(changed)} apply to the flow-matching objective: add --objective flow, or drop "
                            "them")
    raise_problems(problems)


def check_flow_args(args: argparse.Namespace) -> None:
    """Every check of ``train_lora_flow.py``'s flags; converts ``--timestep_shift``. Raises :class:`UsageError`
    listing all problems."""
    problems = check_common_args(args)
    args.timestep_shift, problem = parse_timestep_shift(args.timestep_shift, flow_model=True)
    problems += [problem] if problem else []
    if args.resolution % 16:
        problems.append(f"--resolution must be a multiple of 16 for flow transformers (VAE factor 8 x patch 2), got "
                        f"{args.resolution}")
    problems += check_flow_objective_arguments(args) + lycoris_problems(args, flow=True) + flow_dataset_problems(args)
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        problems.append(f"--max_sequence_length must be >= 1 (got {args.max_sequence_length})")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        problems.append(f"--guidance_scale must be >= 0 (got {args.guidance_scale})")
    raise_problems(problems + reference_problems(args))
