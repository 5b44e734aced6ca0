"""LoRA fine-tuning of SD-style UNets (SD 1.x, SD 2.x, SDXL) with accelerate, peft and datasets.

The headline recipe is converting an epsilon base model into a v-prediction model on the zero-terminal-SNR
rescale of its schedule (Lin et al. 2023): ``--prediction_type v_prediction --zero_terminal_snr``. Targets,
weights and timesteps come from :mod:`diffusers_ztsnr.training.objectives` on the schedule actually
trained; validation images are sampled with this package's scheduler under that schedule.

``--objective flow`` trains the same UNet as a rectified flow: flow times ``s`` are drawn as in SD3
(``--weighting_scheme``), mapped to the VP timestep of equal SNR, and the UNet's output (in ``--prediction_type``)
is converted to the velocity ``eps - x0`` through
:meth:`diffusers_ztsnr.adapters.PathTransformedModel.vp_as_flow`, the same wrapper that lets a flow sampler drive
it afterwards. The UNet keeps its VP timestep conditioning.

The model family is :mod:`diffusers_ztsnr.training.families.sd`, the objectives
:mod:`diffusers_ztsnr.training.objectives`, the flags :mod:`diffusers_ztsnr.training.config`, and the loop (data,
caching, checkpoints, DDP, EMA, output) :mod:`diffusers_ztsnr.training.loop`.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import config
from .config import OBJECTIVES  # noqa: F401  (re-exported)
from .conversion_probe import add_conversion_probe_argument
from .families.sd import UNetTask, sdxl_time_ids  # noqa: F401  (re-exported: the task, where it always was)
from .loop import train as run_training


def build_parser() -> argparse.ArgumentParser:
    parser = config.unet_parser(__doc__.split("\n\n")[0])
    add_conversion_probe_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = config.parse_with_config(parser, argv)
    config.check_unet_args(args, parser)
    return args


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by ``args`` (see :func:`parse_args`); returns paths and final numbers."""
    return run_training(args, UNetTask)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))
