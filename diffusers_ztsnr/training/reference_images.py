"""Reference-image conditioning of image-editing flow models (FLUX.1 Kontext): the flags, their checks, and the
validation image.

``--cond_image_column`` names the dataset column that holds each row's reference (input) image, as in diffusers'
``train_dreambooth_lora_flux_kontext.py``: an image column of a Hub dataset, or in a ``--train_data_dir``
imagefolder either a ``<name>_file_name`` metadata key (which ``datasets`` loads as the image column ``<name>``)
or a plain string column holding a path relative to the folder. The reference goes through the target image's
resize, crop, flip and bucket (:class:`~diffusers_ztsnr.training.data.reference.ReferenceImageDataset`).
``--validation_image`` is the reference the validation images are sampled from, center-cropped to
``--resolution`` as the training references are.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cond_image_column`` and ``--validation_image`` (diffusers' Kontext script's names)."""
    a = parser.add_argument
    a("--cond_image_column", type=str, default=None,
      help="dataset column holding each row's reference image (FLUX.1 Kontext image-to-image training; default: "
           "text-to-image). In a --train_data_dir metadata.jsonl: a path relative to the folder, or a "
           "<column>_file_name key.")
    a("--validation_image", type=str, default=None,
      help="reference image the validation images are sampled from (FLUX.1 Kontext; needs --validation_prompt).")


def reference_problems(args: argparse.Namespace) -> list[str]:
    """Problems with the reference-image flags (returned, like the other flag checks)."""
    problems = []
    if args.cond_image_column is not None:
        if getattr(args, "datasets", None) is not None:
            problems.append("--cond_image_column with a --config datasets: list: the list's datasets take no "
                            "reference column yet; train on one --train_data_dir / --dataset_name")
        if args.validation_prompt and args.validation_image is None:
            problems.append("--cond_image_column with --validation_prompt: validation samples an edit, so name the "
                            "image to edit with --validation_image")
        if getattr(args, "with_prior_preservation", False):
            problems.append("--cond_image_column with --with_prior_preservation: the class images have no reference "
                            "image; drop --with_prior_preservation")
    if args.validation_image is not None:
        if not args.validation_prompt:
            problems.append("--validation_image needs --validation_prompt (the edit instruction to sample)")
        problem = _image_problem(Path(args.validation_image).expanduser())
        if problem:
            problems.append(f"--validation_image {args.validation_image}: {problem}")
    return problems


def _image_problem(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "no such file"
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError) as error:
        return f"not a readable image ({type(error).__name__})"
    return None


def validation_reference(args: argparse.Namespace) -> Any:
    """``--validation_image`` as a PIL image, EXIF-rotated, resized and center-cropped to ``--resolution``."""
    from PIL import Image, ImageOps

    from .data.transforms import resize_and_crop, to_rgb

    with Image.open(Path(args.validation_image).expanduser()) as image:
        image = to_rgb(ImageOps.exif_transpose(image))
    return resize_and_crop(image, (args.resolution, args.resolution), center_crop=True)[0]
