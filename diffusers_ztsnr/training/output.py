"""What a training run leaves behind: validation grids, the output folder, and its Hub upload.

Guarantees: the exported LoRA holds finite weights only (:class:`NonFiniteWeightsError` otherwise, nothing written);
no secret reaches a file (flags are recorded through :func:`identity.recorded_args`); a Hub upload sends exactly the
files this run exported (LoRA files, ``scheduler/``, the model card, the sample grid), to a repository created
private unless ``--hub_public`` is given, and prints what it sent.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..imaging import image_grid
from .conversion_probe import card_section, run_conversion_probe
from .full import export_pipeline_checkpoint, save_pipeline
from .inputs import load_base_pipeline

if TYPE_CHECKING:
    from .task import ModelTask


class NonFiniteWeightsError(RuntimeError):
    """Trainable weights became NaN/Inf; they are never checkpointed or exported."""


def nonfinite_weights(params: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the parameters' device: ``True`` if any value is NaN/Inf (no host sync).

    The largest magnitude is finite exactly when every value is; unlike a sum of squares it cannot overflow.
    """
    if not params:
        return torch.tensor(False)
    norms = torch._foreach_norm([p.detach() for p in params], float("inf"))
    return ~torch.isfinite(torch.stack([n.float() for n in norms])).all()


def check_finite_states(states: dict[str, dict[str, torch.Tensor]], where: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first non-finite tensor of ``states``."""
    for component, state in states.items():
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteWeightsError(f"{where}: {component}.{name} holds NaN/Inf values; nothing was written.")


def save_grid(images: list, path: Path) -> Path:
    arrays = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    image_grid(arrays, columns=min(4, len(images))).save(path)
    return path


@torch.no_grad()
def validate(args, accelerator, task: ModelTask, step: int) -> Path | None:
    """Sample validation images with our scheduler under the trained config; save a PNG grid, log it."""
    if not accelerator.is_main_process:
        return None
    pipe = task.pipeline_class(**{**task.pipe.components,
                                  task.denoiser_name: accelerator.unwrap_model(task.denoiser)})
    pipe.scheduler = task.sampling_scheduler()
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(prompt=[args.validation_prompt] * args.num_validation_images,  # Kontext's first is image
                  num_inference_steps=args.validation_inference_steps, height=args.resolution,
                  width=args.resolution, generator=generator, **task.validation_kwargs(args)).images
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(exist_ok=True)
    path = save_grid(images, folder / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(im) for im in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
    return path


def finish(args, accelerator, task: ModelTask, step: int, states: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Write the output folder: LoRA (diffusers + kohya), scheduler config, samples, the conversion probe's numbers,
    model card (+ upload)."""
    full = getattr(args, "full_finetune", False)
    check_finite_states(states, "export of the fine-tuned model" if full else "export of the trained LoRA")
    output_dir = Path(args.output_dir)
    if full:  # the whole pipeline, its scheduler the trained configuration as the stock class
        paths: dict[str, Any] = save_pipeline(args, task, task.denoiser, output_dir, load_base_pipeline)
    else:
        paths = task.save_lora(output_dir, states, args)
        task.sampling_scheduler().save_pretrained(output_dir / "scheduler")
        paths["scheduler"] = output_dir / "scheduler"
    grid = None
    if args.validation_prompt:
        grid = validate(args, accelerator, task, step)
        if grid is not None:
            shutil.copy(grid, output_dir / "samples.png")
            grid = output_dir / "samples.png"
            paths["grid"] = grid
    probed = None if full else run_conversion_probe(args, task, output_dir, accelerator.device)
    if probed is not None:
        paths["conversion_probe"] = output_dir / "conversion_probe.json"
    card = task.model_card(args, step, grid.name if grid else None) + card_section(probed)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    paths["card"] = output_dir / "README.md"
    if getattr(args, "export_checkpoint", None):
        export = export_pipeline_checkpoint if full else export_merged_checkpoint
        paths["checkpoint"] = export(args, output_dir)
    if args.push_to_hub:
        paths["hub_url"] = push_to_hub(args, output_dir, upload_list(output_dir, paths))
    return paths


def export_merged_checkpoint(args: argparse.Namespace, output_dir: Path) -> Path:
    """``--export_checkpoint``: the LoRA merged into its base as one single-file checkpoint (see
    :mod:`diffusers_ztsnr.single_file`); prints where each UI needs a setting the file cannot carry."""
    from ..single_file import export_single_file

    target = Path(args.export_checkpoint)
    target = target if target.is_absolute() else output_dir / target
    info = export_single_file(output_dir, target, base=args.pretrained_model_name_or_path, dtype=args.export_dtype)
    print(f"merged checkpoint: {info['path']}")
    for line in info["instructions"]:
        print(line)
    return Path(info["path"])


def upload_list(output_dir: Path, paths: dict[str, Path]) -> list[str]:
    """The exported files inside ``output_dir``, relative to it (folders expanded): all that a Hub upload may
    send."""
    files: set[str] = set()
    root = output_dir.resolve()
    for path in paths.values():
        path = Path(path)
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files.update(p.resolve().relative_to(root).as_posix() for p in found if p.resolve().is_relative_to(root))
    return sorted(files)


def push_to_hub(args: argparse.Namespace, output_dir: Path, files: list[str]) -> str:
    """Upload exactly ``files`` (relative to ``output_dir``) to ``--hub_model_id`` (default: the folder's name).

    The token comes from ``--hub_token`` if given, else huggingface_hub's own resolution (``HF_TOKEN``,
    ``huggingface-cli login``). The repository is created private unless ``--hub_public``.
    """
    import huggingface_hub

    token = args.hub_token or None
    repo_id = args.hub_model_id or output_dir.name
    repo_id = huggingface_hub.create_repo(repo_id, exist_ok=True, token=token,
                                          private=not args.hub_public).repo_id
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=token,
                                  commit_message="LoRA trained with diffusers-ztsnr", allow_patterns=files)
    visibility = "public" if args.hub_public else "private"
    print(f"uploaded to https://huggingface.co/{repo_id} ({visibility}): {', '.join(files)}")
    return f"https://huggingface.co/{repo_id}"
