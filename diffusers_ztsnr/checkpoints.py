"""Deprecated module path: the v_pred / ztsnr markers, LoRA sampling metadata and the scheduler settings read back
from them are :mod:`diffusers_ztsnr.markers` (training state is :mod:`diffusers_ztsnr.training.checkpointing`).

Every name stays importable from here for one release; each lookup emits a ``FutureWarning`` naming the new module.
"""

from __future__ import annotations

from ._deprecation import forward_to_new_modules

__getattr__, __dir__ = forward_to_new_modules(__name__, "diffusers_ztsnr.markers")
