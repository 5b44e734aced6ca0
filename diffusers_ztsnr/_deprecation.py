"""Deprecated names kept for one release, each use warning with a ``FutureWarning`` that names the new one.

:func:`forward_to_new_modules` makes a moved module's old path a module-level ``__getattr__`` / ``__dir__``: a name
looked up there is served from the new module that exports it (lists it in ``__all__``), or else from the first new
module that has it. The new modules are imported on first lookup only, so importing the old path stays cheap.
:func:`renamed_function` keeps a renamed function under its former name.
"""

from __future__ import annotations

import functools
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any


def forward_to_new_modules(old: str, *new_modules: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the deprecated module ``old`` whose names moved to ``new_modules``.

    An old module that sets no ``__all__`` of its own gets every name the new modules export (read on first use, so
    the list is not written twice).
    """

    def exported(module_name: str) -> Sequence[str]:
        return getattr(importlib.import_module(module_name), "__all__", ())

    def exported_names() -> list[str]:
        return sorted({name for module_name in new_modules for name in exported(module_name)})

    def home(name: str) -> str | None:
        # the exporting module first: another one may hold the same object as an import of its own
        for module_name in (*(m for m in new_modules if name in exported(m)), *new_modules):
            if hasattr(importlib.import_module(module_name), name):
                return module_name
        return None

    def module_getattr(name: str) -> Any:
        if name == "__all__":
            return exported_names()
        if name.startswith("__"):  # module protocol lookups (``__path__``, ``__wrapped__``...) are not moved names
            raise AttributeError(name)
        module_name = home(name)
        if module_name is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old} is deprecated; import {name} from {module_name}", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(module_name), name)

    def module_dir() -> list[str]:
        return sorted(set(sys.modules[old].__all__) | set(vars(sys.modules[old])))

    return module_getattr, module_dir


def renamed_function(new: Callable, old_name: str, module: str) -> Callable:
    """``new`` under its former name ``old_name`` in ``module``: same arguments and result, plus a warning."""

    @functools.wraps(new)
    def alias(*args, **kwargs):
        warnings.warn(
            f"{module}.{old_name} is deprecated and will be removed in the next release; "
            f"use {module}.{new.__name__} (same arguments, same result).",
            FutureWarning,
            stacklevel=2,
        )
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated name of :func:`{new.__name__}`."
    return alias
