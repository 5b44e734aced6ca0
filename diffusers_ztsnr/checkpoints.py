"""Deprecated module path: the v_pred / ztsnr markers, LoRA sampling metadata and the scheduler settings read back
from them are :mod:`diffusers_ztsnr.markers` (training state is :mod:`diffusers_ztsnr.training.checkpointing`).

Every name stays importable from here for one release; each lookup emits a ``FutureWarning`` naming the new module.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_NEW_MODULE = "diffusers_ztsnr.markers"
_PUBLIC_NAMES = (
    "ARCHITECTURES",
    "ARCHITECTURE_KEY",
    "FLOW_ARCHITECTURES",
    "LORA_WEIGHT_NAME",
    "PREDICTION_TYPE_KEY",
    "V_PRED_KEY",
    "ZTSNR_KEY",
    "add_marker_metadata",
    "check_lora_for_pipeline",
    "load_lora_weights",
    "marker_metadata",
    "scheduler_fix_line",
    "scheduler_settings_from_checkpoint",
    "with_markers",
)

__all__ = list(_PUBLIC_NAMES)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # module protocol lookups (``__path__``, ``__wrapped__``...) are not moved names
        raise AttributeError(name)
    module = importlib.import_module(_NEW_MODULE)
    if not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"diffusers_ztsnr.checkpoints is deprecated; import {name} from {_NEW_MODULE}", FutureWarning,
                  stacklevel=2)
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
