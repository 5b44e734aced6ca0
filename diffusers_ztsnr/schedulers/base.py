"""The diffusers scheduler protocol over this package's maths; subclasses only choose a grid and a rule.

A scheduler here holds a grid of ``n`` model timesteps and ``n + 1`` noise levels ``(alpha, sigma)``:
one per timestep, and the level the last step goes to (clean data unless a config key says
otherwise). ``step`` converts the model output to ``(x0, eps)`` with the one conversion function and
hands it to an update rule of :mod:`diffusers_ztsnr.solvers`. Latents are kept on the scheduler's
own path (``alpha * x0 + sigma * eps``), so ``scale_model_input`` is the identity and
``init_noise_sigma`` is 1: a zero-SNR start needs no infinite ``sigma_max``.

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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..parameterization import MODEL_PREDICTION_TYPES, linear_combination, solve_coefficients
from ..solvers import Level, Update
from .stock import check_foreign_keys, restore_own_settings, stock_keywords, to_stock_config


@dataclass
class ZTSNRSchedulerOutput(BaseOutput):
    """``prev_sample``: the latent at the next grid point; ``pred_original_sample``: the x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class ZTSNRSchedulerBase(SchedulerMixin, ConfigMixin):
    """Shared protocol code; see the module docstring. Not a scheduler by itself."""

    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0
    #: "vp" or "flow": the path the latents live on
    path: ClassVar[str] = "vp"
    #: config keys that mean the config describes another kind of model (any value is an error)
    rejected_config_keys: ClassVar[tuple[str, ...]] = ()
    #: the diffusers class this one is a drop-in for: its keywords are accepted, its name is saved
    stock_class: ClassVar[type[SchedulerMixin]]
    #: what the stock class assumes without a config key (a different value of ours stays visible to it)
    stock_assumes: ClassVar[dict[str, Any]] = {}

    # -- config: diffusers' keys, our settings, the stock counterpart ---------------------------

    @classmethod
    def _own_keys(cls) -> set[str]:
        return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, but a key of another scheduler's config that this class cannot
        honour is an error (a value that would change sampling) or a warning (an unknown key),
        never silently dropped; our settings saved under ``_ztsnr_config`` are restored."""
        own = cls._own_keys()
        config = restore_own_settings(config or {}, own, kwargs)
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

    @staticmethod
    def _check_choice(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}.")

    def _check_prediction_type(self, prediction_type: str) -> None:
        self._check_choice("prediction_type", prediction_type, MODEL_PREDICTION_TYPES)

    # -- grid ---------------------------------------------------------------------------------

    def _set_levels(self, timesteps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                    final_level: Level, device) -> None:
        """Install a grid from a path's levels at its ``timesteps`` and the level the last step goes to."""
        levels = torch.cat([torch.stack([alpha, sigma], 1), torch.tensor([final_level], dtype=torch.float64)])
        self._reset(timesteps, levels, device)

    def _reset(self, timesteps: torch.Tensor, levels: torch.Tensor, device) -> None:
        """Install a grid: ``timesteps`` (n model times), ``levels`` ((n+1) x 2 float64 alpha, sigma)."""
        if self.config.prediction_type == "epsilon" and float(levels[0, 0]) == 0.0:
            levels = self._epsilon_zero_snr_start(levels)
        self.timesteps = timesteps.to(device)
        self.num_inference_steps = len(timesteps)
        self._levels = levels.tolist()
        self._step_index = None
        self._previous: tuple[torch.Tensor, tuple[float, float]] | None = None

    def _epsilon_zero_snr_start(self, levels: torch.Tensor) -> torch.Tensor:
        clamp = self.config.epsilon_zero_snr_clamp
        if clamp is None:
            raise ValueError(
                "prediction_type='epsilon' cannot start from SNR 0 (this grid's first timestep is pure noise, "
                "where an epsilon prediction says nothing about the image). Fixes: sample a v_prediction "
                "(or sample / flow_prediction) model, e.g. one fine-tuned with this package's ZTSNR recipe; "
                "or start at SNR > 0 (rescale_betas_zero_snr=False, or a spacing that skips the last "
                "timestep); or opt in to a clamp with epsilon_zero_snr_clamp=2**-24 (diffusers' value), "
                "which treats the start as alphabar = clamp."
            )
        warnings.warn(
            f"epsilon_zero_snr_clamp={clamp}: the SNR-0 start is treated as alphabar={clamp}; an epsilon "
            "model there gives little information about the image (expect medium-brightness samples).",
            UserWarning,
            stacklevel=3,
        )
        levels = levels.clone()
        levels[0, 0], levels[0, 1] = clamp**0.5, (1 - clamp) ** 0.5
        return levels

    @staticmethod
    def _check_custom_grid_args(num_inference_steps, timesteps, sigmas) -> None:
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass either timesteps= or sigmas= to set_timesteps, not both.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("set_timesteps needs num_inference_steps, timesteps= or sigmas=.")

    # -- protocol -----------------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return getattr(self, "_begin_index", None)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Index of the first step to run (img2img pipelines set it before the loop)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {timestep} is not on this scheduler's grid; call set_timesteps first.")
        return int(matches[0])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: latents are kept on the scheduler's path, the form the model was trained on."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> ZTSNRSchedulerOutput | tuple:
        """Advance ``sample`` from ``timestep`` to the next grid point given the model's output in
        ``config.prediction_type``. Works internally in float32 (or float64) whatever the latent dtype."""
        self._check_grid_set()
        unsupported = {k: v for k, v in kwargs.items() if k not in ("variance_noise", "eta") and v}
        if unsupported:
            raise TypeError(f"{type(self).__name__}.step does not support {sorted(unsupported)}.")
        return self._advance(model_output, timestep, sample, generator, return_dict, kwargs.get("variance_noise"))

    def _check_grid_set(self) -> None:
        if not hasattr(self, "_levels"):
            raise RuntimeError("call set_timesteps before step.")

    def _advance(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None,
        return_dict: bool,
        variance_noise: torch.Tensor | None,
        **rule_parameters: Any,
    ) -> ZTSNRSchedulerOutput | tuple:
        """The step itself; ``rule_parameters`` (DDIM's ``eta``) are passed on to :meth:`_update_rule`."""
        self._check_grid_set()
        if self._step_index is None:
            begin = self.begin_index
            self._step_index = begin if begin is not None else self.index_for_timestep(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError("step called more times than the grid has steps; call set_timesteps again.")
        level, next_level = tuple(self._levels[i]), tuple(self._levels[i + 1])
        work = torch.promote_types(sample.dtype, torch.float32)
        x, y = sample.to(work), model_output.to(work)
        p, q, _, _ = solve_coefficients(self.config.prediction_type, level[0], level[1])  # x0 = p x + q y
        x0 = linear_combination((p, x), (q, y))
        previous_x0, previous_level = self._previous if self._previous else (None, None)
        u = self._update_rule(level, next_level, previous_level, **rule_parameters)
        terms = [(u.x + u.x0 * p, x), (u.x0 * q, y)]  # x0 folded in: as few kernels as the rule allows
        if u.previous_x0:
            terms.append((u.previous_x0, previous_x0))
        if u.noise:
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=work)
            terms.append((u.noise, noise.to(work)))
        prev = linear_combination(*terms)
        self._previous = (x0, level)
        self._step_index = i + 1
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return ZTSNRSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _update_rule(self, level: Level, next_level: Level, previous_level: Level | None,
                     **rule_parameters: Any) -> Update:
        """Coefficients of this scheduler's update (see :mod:`diffusers_ztsnr.solvers`); ``rule_parameters`` are
        the ones its ``step`` takes (none unless a subclass's ``step`` passes them to :meth:`_advance`)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.config.num_train_timesteps
