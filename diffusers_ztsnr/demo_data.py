"""Deprecated module path: the generated image + caption set is :mod:`diffusers_ztsnr.testing.demo_data`.

Every name stays importable from here for one release; each lookup emits a ``FutureWarning`` naming the new module.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_NEW_MODULE = "diffusers_ztsnr.testing.demo_data"
_PUBLIC_NAMES = ("COLORS", "SHAPES", "demo_image", "make_demo_dataset", "shape_mask")

__all__ = list(_PUBLIC_NAMES)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # module protocol lookups (``__path__``, ``__wrapped__``...) are not moved names
        raise AttributeError(name)
    module = importlib.import_module(_NEW_MODULE)
    if not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"diffusers_ztsnr.demo_data is deprecated; import {name} from {_NEW_MODULE}", FutureWarning,
                  stacklevel=2)
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
