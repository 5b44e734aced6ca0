"""The config side of this package's schedulers: diffusers' keys, our settings, the stock counterpart.

Interop with diffusers' own classes (each of ours names its counterpart in ``stock_class``; tables and
rules in :mod:`diffusers_ztsnr.schedulers.stock`):

* Construction: every keyword argument of the counterpart's ``__init__`` is accepted. A value that does
  not change sampling here passes silently; one that would (``thresholding=True``, DDIM's
  ``clip_sample=True``) is a ``ValueError`` naming the key and the value that works, the same check
  ``from_config`` applies to the keys of any diffusers config.
* Saving: ``scheduler_config.json`` is a config of the counterpart: ``_class_name`` is the diffusers
  class, its keys hold values diffusers accepts (``timestep_spacing="logsnr"`` is written as
  ``"trailing"``, which also starts at the zero-SNR timestep), and what diffusers cannot hold
  (``logsnr``, ``epsilon_zero_snr_clamp``, the flow sampler's ``solver_order``) goes under the private key
  ``_ztsnr_config``, which diffusers ignores without a warning and keeps in ``config``. So the
  counterpart's ``from_pretrained`` samples the folder correctly without this package (ZTSNR,
  parameterization, trailing), and our ``from_pretrained`` / ``from_config`` (also of a diffusers
  scheduler's ``config`` loaded from the folder) restores our settings, unless the diffusers key was
  changed since. A prediction type the flow counterpart cannot hold stays a public key, so diffusers
  warns that it ignores it instead of sampling the model as a velocity.
* Pipeline folders: ``DiffusionPipeline.save_pretrained`` records the scheduler's own class in
  ``model_index.json`` (``["diffusers_ztsnr", "<our class>"]``); no scheduler can change that. Such a
  folder loads with our scheduler where ``diffusers_ztsnr`` is imported, and otherwise fails in
  ``from_pretrained`` with diffusers' message naming ``diffusers_ztsnr`` (the package to install and
  import), never with a silently different scheduler. To publish a pipeline that plain diffusers loads,
  set ``pipe.scheduler = pipe.scheduler.to_stock()`` before saving: the diffusers counterpart, configured
  as our folder would be, carrying ``_ztsnr_config`` for our classes to restore.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from typing import Any, ClassVar

from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .stock import check_foreign_keys, restore_own_settings, stock_keywords, to_stock_config


class StockInterop:
    """Mixin of :class:`~diffusers_ztsnr.schedulers.base.ZTSNRSchedulerBase` before diffusers' ``SchedulerMixin``
    and ``ConfigMixin``: construction, ``from_config`` and saving as the module docstring describes."""

    #: config keys that mean the config describes another kind of model (any value is an error)
    rejected_config_keys: ClassVar[tuple[str, ...]] = ()
    #: the diffusers class this one is a drop-in for: its keywords are accepted, its name is saved
    stock_class: ClassVar[type[SchedulerMixin]]
    #: what the stock class assumes without a config key (a different value of ours stays visible to it)
    stock_assumes: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _own_keys(cls) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, but a key of another scheduler's config that this class cannot
        honour is an error (a value that would change sampling) or a warning (an unknown key),
        never silently dropped; our settings saved under ``_ztsnr_config`` are restored."""
        own = cls._own_keys()
        config = restore_own_settings(cls._translated_config(dict(config or {})), own, kwargs)
        merged = {**config, **kwargs}
        foreign = {k: v for k, v in merged.items() if not k.startswith("_") and k not in own}
        unknown = check_foreign_keys(cls, foreign, stock_keywords(cls.stock_class))
        if unknown:
            warnings.warn(
                f"{cls.__name__} ignores the unknown config keys {sorted(unknown)}.", UserWarning, stacklevel=2
            )
        # keys judged above are not handed on: diffusers would drop or log them a second time
        kept = {k: v for k, v in config.items() if k.startswith("_") or k in own}
        kwargs = {k: v for k, v in kwargs.items() if k in own}
        return super().from_config(kept, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _translated_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Another class's config in this class's terms before it is judged (default: as it is)."""
        return config

    def _check_stock_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Accept the keywords of ``stock_class.__init__`` that this class has no parameter for, judged as
        ``from_config`` judges config keys; any other keyword is a ``TypeError``, as in diffusers."""
        stock = stock_keywords(self.stock_class)
        for key in kwargs:
            if key not in stock:
                raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {key!r}")
        check_foreign_keys(type(self), kwargs, stock)

    def to_json_string(self) -> str:
        """The ``scheduler_config.json`` text: a config of ``stock_class`` (see the module docstring)."""
        saved = json.loads(super().to_json_string())
        config = to_stock_config(saved, self.stock_class, self._own_keys(), self.stock_assumes)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def to_stock(self) -> SchedulerMixin:
        """The diffusers counterpart configured as this scheduler is saved: it samples the same model
        correctly without this package, and our classes' ``from_config`` of its ``config`` restore ours."""
        return self.stock_class.from_config(json.loads(self.to_json_string()))

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """The classes of ``_compatibles``, looked up in diffusers and in this package."""
        libraries = (importlib.import_module("diffusers"), importlib.import_module(__name__.split(".")[0]))
        names = dict.fromkeys([cls.__name__, *cls._compatibles])
        return [getattr(lib, name) for name in names for lib in libraries if hasattr(lib, name)]
