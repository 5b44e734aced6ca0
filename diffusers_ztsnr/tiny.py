"""Deprecated module path: the tiny offline pipelines are :mod:`diffusers_ztsnr.testing.tiny` and their tokenizers
:mod:`diffusers_ztsnr.testing.tokenizers`.

Every name stays importable from here for one release; each lookup emits a ``FutureWarning`` naming the module
that holds it now.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_PIPELINES = "diffusers_ztsnr.testing.tiny"
_TOKENIZERS = "diffusers_ztsnr.testing.tokenizers"
# public name -> its module now; other names are looked up in these modules in turn
_MOVED: dict[str, str] = {
    "TINY_KINDS": _PIPELINES,
    "build_clip_tokenizer": _TOKENIZERS,
    "build_t5_tokenizer": _TOKENIZERS,
    "load_tiny_pipeline": _PIPELINES,
    "make_tiny_pipeline": _PIPELINES,
    "save_tiny_pipeline": _PIPELINES,
    "tiny_pipeline_class": _PIPELINES,
}
_SEARCHED = (_PIPELINES, _TOKENIZERS, "diffusers_ztsnr.testing.tiny_builders")

__all__ = sorted(_MOVED)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # module protocol lookups (``__path__``, ``__wrapped__``...) are not moved names
        raise AttributeError(name)
    for new in (_MOVED[name],) if name in _MOVED else _SEARCHED:
        module = importlib.import_module(new)
        if hasattr(module, name):
            warnings.warn(f"diffusers_ztsnr.tiny is deprecated; import {name} from {new}", FutureWarning,
                          stacklevel=2)
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
