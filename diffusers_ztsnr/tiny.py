"""Deprecated module path: the tiny offline pipelines are :mod:`diffusers_ztsnr.testing.tiny` and their tokenizers
:mod:`diffusers_ztsnr.testing.tokenizers`.

Every name of both stays importable from here for one release; each lookup emits a ``FutureWarning`` naming the
module that holds it now.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_NEW_MODULES = (
    "diffusers_ztsnr.testing.tiny",
    "diffusers_ztsnr.testing.tokenizers",
    "diffusers_ztsnr.testing.tiny_builders",
)

__all__ = [
    "TINY_KINDS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "load_tiny_pipeline",
    "make_tiny_pipeline",
    "save_tiny_pipeline",
    "tiny_pipeline_class",
]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # module protocol lookups (``__path__``, ``__wrapped__``...) are not moved names
        raise AttributeError(name)
    for new in _NEW_MODULES:
        module = importlib.import_module(new)
        if hasattr(module, name):
            warnings.warn(f"diffusers_ztsnr.tiny is deprecated; import {name} from {new}", FutureWarning,
                          stacklevel=2)
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
