"""The inputs a run names -- base model, training data, checkpoint to resume -- checked before anything is written.

``--pretrained_model_name_or_path`` is read as a local folder when it looks like one (absolute, starting with
``.`` or ``~``, holding a backslash or more than the one ``/`` of ``owner/name``, or existing on disk): such a
path that is missing, or is no diffusers pipeline folder (no ``model_index.json``), is a one-line error at once,
never a Hub lookup (whose retries take half a minute before failing with a long traceback). Anything else is a Hub
repo id; a Hub that cannot be reached (offline, unknown or gated repo) is a one-line error naming the fix.

Every check here runs before the ``--output_dir`` lock is taken, so a run refused here leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import InputError, UsageError

_MAX_DETAIL = 200  # characters of a library's error message quoted in ours


def looks_local(name: str) -> bool:
    """Whether ``name`` must be a local path rather than a Hub repo id (``owner/name`` or a bare ``name``)."""
    if name.startswith((".", "~", "/")) or "\\" in name or os.path.isabs(name) or name.count("/") > 1:
        return True
    return Path(name).expanduser().exists()


def check_device_precision(args: argparse.Namespace) -> None:
    """Before the accelerator exists (it would fall back silently): fp16 needs a GPU; a ``--base_quantization``
    needs its backend (and nf4 a GPU)."""
    from accelerate import PartialState

    from .quantization import quantization_problem

    if args.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        raise UsageError("error: --mixed_precision fp16 needs a GPU: on the CPU torch has no fp16 autocast or "
                         "gradient scaler. Use --mixed_precision bf16 (or no) on the CPU.")
    # no PartialState here: created before the launcher's process group it would make every process rank 0
    on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    problem = quantization_problem(getattr(args, "base_quantization", "none"),
                                   torch.device("cuda" if on_gpu else "cpu"))
    if problem:
        raise UsageError(f"error: {problem}")


def check_input_paths(args: argparse.Namespace) -> None:
    """``--train_data_dir`` and a local ``--pretrained_model_name_or_path`` exist and are what they should be."""
    problems = []
    if args.train_data_dir is not None and not Path(args.train_data_dir).expanduser().is_dir():
        problems.append(f"--train_data_dir {args.train_data_dir}: no such folder")
    model = args.pretrained_model_name_or_path
    if model and looks_local(model):
        folder = Path(model).expanduser()
        if not folder.exists():
            problems.append(f"--pretrained_model_name_or_path {model}: no such folder (a local path, so the Hub was "
                            "not asked; a Hub repo id is owner/name, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
        elif not (folder / "model_index.json").is_file():
            what = "a file" if folder.is_file() else "a folder without model_index.json"
            problems.append(f"--pretrained_model_name_or_path {model} is {what}, not a diffusers pipeline folder "
                            "(save one with DiffusionPipeline.save_pretrained, or load a single-file checkpoint with "
                            "from_single_file and save that)")
    if problems:
        raise UsageError("error: " + "; ".join(problems) + ".")


def hub_failure(name: str, error: BaseException) -> UsageError:
    """One line for a Hub repo id that could not be read: what failed, and the fix."""
    from huggingface_hub import constants

    detail = " ".join(str(error).split())[:_MAX_DETAIL]
    if constants.HF_HUB_OFFLINE:
        fix = (f"HF_HUB_OFFLINE is set and {name} is not in the local Hub cache: download it once online "
               f"(hf download {name}), or pass a local pipeline folder")
    else:
        fix = ("check the repo id (owner/name) and the network; for a gated model (SD3, FLUX.1-dev) accept its "
               "license on huggingface.co and log in (hf auth login, or HF_TOKEN); or pass a local pipeline folder")
    return UsageError(f"error: --pretrained_model_name_or_path {name}: could not read it from the Hugging Face Hub "
                      f"({type(error).__name__}: {detail}); {fix}.")


def read_model_index(args: argparse.Namespace) -> dict[str, Any]:
    """The base pipeline's ``model_index.json`` (from the folder, or the Hub: the only network access here)."""
    name = args.pretrained_model_name_or_path
    if looks_local(name):
        return json.loads((Path(name).expanduser() / "model_index.json").read_text(encoding="utf-8"))
    import diffusers

    try:
        return dict(diffusers.DiffusionPipeline.load_config(name, revision=args.revision))
    except (OSError, ValueError) as error:  # connection, unknown / gated repo, offline cache miss, invalid id
        raise hub_failure(name, error) from error


def check_pipeline_class(args: argparse.Namespace, allowed: tuple[str, ...], script: str, hint: str) -> str:
    """The base pipeline's class name, if ``script`` trains it (else an :class:`InputError` ending in ``hint``)."""
    class_name = read_model_index(args).get("_class_name")
    if class_name not in allowed:
        raise InputError(f"{args.pretrained_model_name_or_path} is a {class_name}; {script} trains "
                         f"{', '.join(allowed)} models. {hint}")
    return class_name


def check_inputs(args: argparse.Namespace, task_class: type) -> None:
    """Everything about the named inputs that can be known without loading weights: paths, the base model's
    pipeline class (``task_class.pipelines``), and a resume from a folder that does not exist yet."""
    check_input_paths(args)
    pipelines = getattr(task_class, "pipelines", ())
    if pipelines:
        check_pipeline_class(args, pipelines, task_class.script, task_class.other_script_hint)
    if args.resume_from_checkpoint == "latest" and not Path(args.output_dir).is_dir():
        from .checkpointing import resolve_resume_checkpoint

        resolve_resume_checkpoint(Path(args.output_dir), "latest")  # raises: no checkpoint in a missing folder


def load_base_pipeline(args: argparse.Namespace, class_name: str) -> Any:
    """``from_pretrained`` of the base pipeline; a Hub download that fails is the one line of :func:`hub_failure`."""
    import diffusers

    path = args.pretrained_model_name_or_path
    extra = {}
    if class_name == "StableDiffusionPipeline":  # training never runs the safety checker
        extra = {"safety_checker": None, "requires_safety_checker": False}
    pipeline_class = getattr(diffusers, class_name)
    try:
        return pipeline_class.from_pretrained(os.path.expanduser(path), revision=args.revision,
                                              variant=args.variant, **extra)
    except OSError as error:
        if looks_local(path):
            raise
        raise hub_failure(path, error) from error
