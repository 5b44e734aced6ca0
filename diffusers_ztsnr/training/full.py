"""``--full_finetune``: every weight of the denoiser trained, no adapter; the output folder is a whole pipeline.

What a run trains is read and written here for both kinds of run: LoRA adapters (:mod:`.lora`'s peft states, in
checkpoint files ``lora_{i}.safetensors``) or the whole denoiser (its ``state_dict``, in ``model_0.safetensors``).

A full fine-tune keeps the trained weights in fp32 (AdamW's update is far below bf16's resolution for most
weights), trains with the same objectives, EMA (``--use_ema``), 8-bit AdamW (``--use_8bit_adam``), checkpoints and
resume as a LoRA run, and writes ``--output_dir`` as a diffusers pipeline folder: the base pipeline's other
components as the base holds them (reloaded from it, not the training copies, which may have been cast to bf16),
the fine-tuned denoiser, and the trained sampling configuration as the stock diffusers scheduler (``to_stock``), so
``DiffusionPipeline.from_pretrained(output_dir)`` samples it as trained without this package.
``--export_checkpoint`` writes the same model as one original-layout file with the ``v_pred`` / ``ztsnr`` keys.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: the folders and files of a pipeline folder (what a Hub upload of a full fine-tune sends)
PIPELINE_INDEX = "model_index.json"


def checkpoint_file(index: int, full: bool) -> str:
    """The checkpoint file of trained module ``index`` (the denoiser is 0)."""
    return f"{'model' if full else 'lora'}_{index}.safetensors"


def trained_state(module: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """The trained weights of ``module``, detached, contiguous, on the CPU: its whole state dict under a full
    fine-tune, else its LoRA adapter."""
    if not full:
        from .lora import lora_state_dict

        return lora_state_dict(module)
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def load_trained_state(module: torch.nn.Module, state: dict[str, torch.Tensor], full: bool) -> None:
    """Inverse of :func:`trained_state` (every key must match)."""
    if full:
        module.load_state_dict(state, strict=True)
    else:
        from .lora import load_lora_state_dict

        load_lora_state_dict(module, state)


def save_pipeline(args: argparse.Namespace, task, denoiser: torch.nn.Module, output_dir: Path,
                  load_base: Callable[[argparse.Namespace, str], Any]) -> dict[str, Path]:
    """Write ``output_dir`` as a pipeline folder (see the module docstring), the other components from
    ``load_base(args, pipeline class name)``; returns ``{component or file: path}`` of what was written (the upload
    list)."""
    base = load_base(args, task.pipeline_class.__name__)
    base.scheduler = task.sampling_scheduler().to_stock()
    setattr(base, task.denoiser_name, denoiser)
    base.register_modules(**{task.denoiser_name: denoiser})
    base.save_pretrained(output_dir, safe_serialization=True)
    written: dict[str, Path] = {"pipeline": output_dir / PIPELINE_INDEX}
    for name, component in base.components.items():
        if component is not None and (output_dir / name).is_dir():
            written[name] = output_dir / name
    return written


def export_pipeline_checkpoint(args: argparse.Namespace, output_dir: Path) -> Path:
    """``--export_checkpoint`` of a full fine-tune: the pipeline folder as one original-layout file with the
    sampling markers of its scheduler."""
    from ..single_file import export_pipeline_single_file

    target = Path(args.export_checkpoint)
    target = target if target.is_absolute() else output_dir / target
    info = export_pipeline_single_file(output_dir, target, dtype=args.export_dtype)
    print(f"single-file checkpoint: {info['path']}")
    for line in info["instructions"]:
        print(line)
    return Path(info["path"])


def full_finetune_problems(args: argparse.Namespace) -> list[str]:
    """Flags a full fine-tune cannot honour, each a one-line error naming both."""
    if not getattr(args, "full_finetune", False):
        return []
    adapter = getattr(args, "adapter", "lora")
    refused: dict[str, Any] = {
        f"--adapter {adapter}": adapter != "lora",
        "--train_text_encoder": args.train_text_encoder,
        f"--base_quantization {getattr(args, 'base_quantization', 'none')}":
            getattr(args, "base_quantization", "none") != "none",
    }
    return [f"--full_finetune trains the whole denoiser without an adapter: drop {flag}"
            for flag, given in refused.items() if given]
