"""Deprecated module path: the generated image + caption set is :mod:`diffusers_ztsnr.testing.demo_data`.

Every name stays importable from here for one release; each lookup emits a ``FutureWarning`` naming the new module.
"""

from __future__ import annotations

from ._deprecation import forward_to_new_modules

__getattr__, __dir__ = forward_to_new_modules(__name__, "diffusers_ztsnr.testing.demo_data")
