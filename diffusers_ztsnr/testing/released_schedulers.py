"""The scheduler configs of released checkpoints, shipped as package data (one JSON file per model).

Each file is the checkpoint's ``scheduler/scheduler_config.json``, verbatim:

    sd15.json   runwayml/stable-diffusion-v1-5                 PNDMScheduler, scaled_linear, epsilon
    sd21.json   stabilityai/stable-diffusion-2-1               DDIMScheduler, scaled_linear, v_prediction
    sdxl.json   stabilityai/stable-diffusion-xl-base-1.0       EulerDiscreteScheduler, leading spacing
    sd3.json    stabilityai/stable-diffusion-3-medium-diffusers FlowMatchEulerDiscreteScheduler, shift 3
    flux.json   black-forest-labs/FLUX.1-dev                   FlowMatchEulerDiscreteScheduler, dynamic shift

The tiny pipelines (:mod:`diffusers_ztsnr.testing.tiny`) build their schedulers from these files, so
timestep spacing, offsets and shifts match the full-size models; the tests read the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["RELEASED_SCHEDULER_NAMES", "SCHEDULER_CONFIGS_DIR", "released_scheduler_config"]

SCHEDULER_CONFIGS_DIR: Path = Path(__file__).resolve().parent / "scheduler_configs"
"""The folder holding ``<name>.json`` for every name of :data:`RELEASED_SCHEDULER_NAMES`."""

RELEASED_SCHEDULER_NAMES: tuple[str, ...] = ("sd15", "sd21", "sdxl", "sd3", "flux")


def released_scheduler_config(name: str) -> dict:
    """The released checkpoint's scheduler config as a fresh dict, without diffusers' ``_diffusers_version``.

    ``_diffusers_version`` records which diffusers wrote the file; left in, ``from_config`` would carry that
    old version into the scheduler's config. Keys the scheduler class does not take (e.g. PNDM's
    ``clip_sample``) stay, as when loading the real checkpoint.

    Raises:
        ValueError: if ``name`` is not one of :data:`RELEASED_SCHEDULER_NAMES`.
    """
    if name not in RELEASED_SCHEDULER_NAMES:
        raise ValueError(f"unknown released scheduler {name!r}; allowed: {', '.join(RELEASED_SCHEDULER_NAMES)}")
    config = json.loads((SCHEDULER_CONFIGS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    config.pop("_diffusers_version", None)
    return config
