"""LoRA fine-tuning of flow transformers: SD3 / SD3.5, FLUX.1, FLUX.1 Kontext, Chroma, Qwen-Image, Z-Image, FLUX.2
Klein (the base model's pipeline class picks the family, see docs/training-flow.md).

Flow-matching conventions (diffusers'): ``x_s = (1 - s) * x0 + s * eps`` with ``s = 1`` pure noise, model time
``1000 * s`` (Flux's transformer takes ``s`` itself and multiplies by 1000 inside), target the velocity
``eps - x0``. The rectified-flow papers write the reverse (``t = 0`` noise, ``u = x1 - eps``): there ``t = 1 - s``
and ``u = -(eps - x0)``; :func:`diffusers_ztsnr.schedule.flow_sigma_from_rectified_flow_time` and
:func:`~diffusers_ztsnr.schedule.flow_velocity_from_rectified_flow_velocity` convert.

Per step (:class:`~diffusers_ztsnr.training.objectives.FlowMatchingObjective`): ``s`` from
:func:`~diffusers_ztsnr.training.objectives.sample_flow_sigmas` (``--weighting_scheme``
logit_normal / mode / uniform, then ``--timestep_shift``: the base scheduler's static shift or Flux's
resolution-dependent ``mu``), the loss from :func:`~diffusers_ztsnr.training.objectives.flow_matching_loss`
(``--precondition_outputs`` regresses ``x0`` instead), weighted by ``--weighting_scheme`` sigma_sqrt / cosmap.
The model family's task is picked from the base model's pipeline class by
:mod:`diffusers_ztsnr.training.families.registry`, the flags
:mod:`diffusers_ztsnr.training.config`, the loop (data, caching, checkpoints, DDP, EMA, output)
:mod:`diffusers_ztsnr.training.loop`.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from . import config
from .config import DEFAULT_FLUX_GUIDANCE as DEFAULT_GUIDANCE  # noqa: F401  (re-exported)
from .families.flow_transformers import DEFAULT_LORA_LAYERS, PIPELINES, FlowTask  # noqa: F401  (re-exported)
from .families.registry import make_flow_task
from .loop import train as run_training


def build_parser() -> argparse.ArgumentParser:
    return config.flow_parser(__doc__.split("\n\n")[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = config.parse_with_config(parser, argv)
    config.check_flow_args(args)
    return args


def parse_shift(value: str) -> float | str:
    """Deprecated: ``--timestep_shift`` is parsed by :func:`diffusers_ztsnr.training.config.parse_timestep_shift`."""
    warnings.warn("diffusers_ztsnr.training.flow.parse_shift is deprecated; use "
                  "diffusers_ztsnr.training.config.parse_timestep_shift(value, flow_model=True)", FutureWarning,
                  stacklevel=2)
    shift, problem = config.parse_timestep_shift(value, flow_model=True)
    if problem:
        raise config.UsageError(f"error: {problem}.")
    return shift


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by ``args`` (see :func:`parse_args`); returns paths and final numbers."""
    return run_training(args, make_flow_task)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))
