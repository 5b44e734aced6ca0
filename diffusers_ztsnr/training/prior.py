"""DreamBooth prior preservation in the training loop: the class images generated before training, their dataset.

``--with_prior_preservation`` (diffusers' ``train_dreambooth_lora.py`` flags and meanings): ``--class_data_dir``
should hold ``--num_class_images`` images; the missing ones are generated first, on the main process, from
``--class_prompt`` by the base model (its adapters are still zero, so it samples as the base) with this package's
scheduler under the *base* model's configuration (:func:`base_sampling_scheduler`: the trained configuration,
e.g. v-prediction on a ZTSNR schedule for an epsilon base, would be the wrong sampler for the base). Each is written
atomically as ``<index>-<sha1 of its pixels>.png``. Every class image is captioned with ``--class_prompt``.
Each micro-batch then adds the class batch's loss: ``loss = loss_instance + prior_loss_weight * loss_prior``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .data.prior import class_image_dataset, class_image_files

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .data import ImageCaptionDataset
    from .task import ModelTask

logger = logging.getLogger(__name__)


def base_sampling_scheduler(task: ModelTask) -> Any:
    """This package's scheduler for the base model as it is: its own scheduler config (prediction type, schedule)
    on :class:`ZTSNRFlowMatchScheduler` for a flow-matching base, else :class:`ZTSNRDPMSolverMultistepScheduler`."""
    from ..schedulers import ZTSNRDPMSolverMultistepScheduler, ZTSNRFlowMatchScheduler

    config = task.scheduler_config
    flow = "FlowMatch" in str(config.get("_class_name", "")) or "shift" in config
    return (ZTSNRFlowMatchScheduler if flow else ZTSNRDPMSolverMultistepScheduler).from_config(config)


def _save_png(image: Any, folder: Path, index: int) -> Path:
    digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
    path = folder / f"{index:05d}-{digest}.png"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)  # a killed run never leaves a half-written class image
    return path


@torch.no_grad()
def generate_class_images(args: argparse.Namespace, task: ModelTask, count: int) -> list[Path]:
    """Sample ``count`` class images of ``--class_prompt`` at ``--resolution`` into ``--class_data_dir``, in batches
    of ``--sample_batch_size``, from a generator seeded with ``--seed`` (and the number already there)."""
    folder = Path(args.class_data_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    start = len(class_image_files(folder))
    pipe = task.pipeline_class(**task.pipe.components)
    pipe.scheduler = base_sampling_scheduler(task)
    pipe.set_progress_bar_config(disable=True)
    # the base model as it is: no guidance rescale meant for the trained ZTSNR model
    kwargs = {k: v for k, v in task.validation_kwargs(args).items() if k != "guidance_rescale"}
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + start)
    written = []
    for first in range(0, count, args.sample_batch_size):
        n = min(args.sample_batch_size, count - first)
        images = pipe(prompt=[args.class_prompt] * n, num_inference_steps=args.class_inference_steps,
                      height=args.resolution, width=args.resolution, generator=generator, **kwargs).images
        written += [_save_png(image, folder, start + first + j) for j, image in enumerate(images)]
    logger.info("generated %d class images of %r in %s with %s", len(written), args.class_prompt, folder,
                type(pipe.scheduler).__name__)
    return written


def load_class_set(args: argparse.Namespace, accelerator: Accelerator, task: ModelTask) -> ImageCaptionDataset | None:
    """Under ``--with_prior_preservation``: fill ``--class_data_dir`` up to ``--num_class_images`` (main process,
    the others wait) and return its first ``--num_class_images`` images as a dataset transformed like the instance
    images; else ``None``."""
    from .data import ImageCaptionDataset, make_buckets

    if not args.with_prior_preservation:
        return None
    folder = Path(args.class_data_dir).expanduser()
    with accelerator.main_process_first():
        missing = args.num_class_images - len(class_image_files(folder))
        if accelerator.is_main_process and missing > 0:
            accelerator.print(f"--with_prior_preservation: generating {missing} class images of "
                              f"{args.class_prompt!r} into {folder}")
            generate_class_images(args, task, missing)
    files = class_image_files(folder)[: args.num_class_images]
    buckets = make_buckets(args.resolution, step=64 if args.resolution >= 256 else 8) if args.bucketing else None
    return ImageCaptionDataset(class_image_dataset(files, args.class_prompt), resolution=args.resolution,
                               center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed,
                               buckets=buckets)


def with_class_items(train_set: Any, class_set: Any) -> Any:
    """``train_set`` with a class item beside each item (:class:`~.data.prior.PriorPreservationDataset`)."""
    from .data.prior import PriorPreservationDataset

    return PriorPreservationDataset(train_set, class_set)


def loss_parts_tags(parts: list[float], processes: int) -> dict[str, float]:
    """``{"loss_instance", "loss_prior"}`` from the per-process sums of the last micro-step's two losses."""
    return {"loss_instance": parts[0] / processes, "loss_prior": parts[1] / processes} if parts else {}


def merge_batches(instance: dict[str, Any], prior: dict[str, Any]) -> dict[str, Any]:
    """One batch of the instance items then the class items (for one forward pass, as diffusers stacks them):
    tensors concatenated, lists joined; a loss mask of the instance items gets an all-ones mask for the class
    items (class images are trained whole)."""
    merged: dict[str, Any] = {}
    for key, value in instance.items():
        if key == "prior":
            continue
        other = prior.get(key)
        if key == "loss_mask" and other is None:
            other = torch.ones_like(value[:1]).expand(len(prior["caption"]), *value.shape[1:])
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
            merged[key] = torch.cat([value, other.to(value.device, value.dtype)])
        elif isinstance(value, list) and isinstance(other, list):
            merged[key] = value + other
    return merged


def concat_cond(instance: dict[str, torch.Tensor], prior: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prompt encodings of the instance then the class items, concatenated along the batch."""
    return {key: torch.cat([value, prior[key].to(value.device, value.dtype)]) for key, value in instance.items()}
