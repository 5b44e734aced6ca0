"""Deprecated module path: the tiny offline pipelines are :mod:`diffusers_ztsnr.testing.tiny` and their tokenizers
:mod:`diffusers_ztsnr.testing.tokenizers`.

Every name stays importable from here for one release; each lookup emits a ``FutureWarning`` naming the module
that holds it now.
"""

from __future__ import annotations

from ._deprecation import forward_to_new_modules

# the public names of this path before the move (the tokenizer constants and the builders were importable, unlisted)
_PUBLIC_NAMES = (
    "TINY_KINDS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "load_tiny_pipeline",
    "make_tiny_pipeline",
    "save_tiny_pipeline",
    "tiny_pipeline_class",
)
__all__ = list(_PUBLIC_NAMES)

__getattr__, __dir__ = forward_to_new_modules(
    __name__,
    "diffusers_ztsnr.testing.tiny",
    "diffusers_ztsnr.testing.tokenizers",
    "diffusers_ztsnr.testing.tiny_builders",
)
