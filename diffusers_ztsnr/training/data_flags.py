"""The training-data flags beyond the basic ones: loss masks (masked training) and DreamBooth prior preservation.

Registered by :func:`diffusers_ztsnr.training.config.add_model_and_data_arguments` and checked by
:func:`diffusers_ztsnr.training.config.check_common_args` (both scripts). Prior preservation takes diffusers'
``train_dreambooth_lora.py`` flag names and meanings.
"""

from __future__ import annotations

import argparse

from .data.masks import MASK_SUFFIX


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """``--masked_loss`` / ``--mask_column``."""
    a = parser.add_argument
    a("--masked_loss", action="store_true",
      help=f"weigh the loss by a mask per image, the file <stem>{MASK_SUFFIX} beside it (OneTrainer's naming; white "
           "= trained, black = ignored, gray = partly); see also --mask_column.")
    a("--mask_column", type=str, default=None,
      help="dataset column of loss-mask images (in metadata.jsonl: the key <column>_file_name); implies "
           "--masked_loss.")


def data_flag_problems(args: argparse.Namespace) -> list[str]:
    """Problems with :func:`add_data_flags`' flags (returned, like ``check_common_args``)."""
    problems = []
    if args.mask_column is not None and not args.mask_column.strip():
        problems.append("--mask_column is empty: name the dataset column of the mask images")
    return problems


def uses_masks(args: argparse.Namespace) -> bool:
    """Masked training: ``--masked_loss`` or ``--mask_column``."""
    return bool(getattr(args, "masked_loss", False) or getattr(args, "mask_column", None))
