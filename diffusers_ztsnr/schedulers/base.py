"""The diffusers scheduler protocol over this package's maths; subclasses only choose a grid and a rule.

A scheduler here holds a grid of ``n`` model timesteps and ``n + 1`` noise levels ``(alpha, sigma)``:
one per timestep, and the level the last step goes to (clean data unless a config key says
otherwise). ``step`` converts the model output to ``(x0, eps)`` with the one conversion function and
hands it to an update rule of :mod:`diffusers_ztsnr.solvers`. Latents are kept on the scheduler's
own path (``alpha * x0 + sigma * eps``), so ``scale_model_input`` is the identity and
``init_noise_sigma`` is 1: a zero-SNR start needs no infinite ``sigma_max``.

The config side (diffusers' keys, our settings, the stock counterpart) is :mod:`diffusers_ztsnr.schedulers.interop`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..combination import Combination, plan_combination
from ..parameterization import MODEL_PREDICTION_TYPES, solve_coefficients
from ..solvers import Level, Update, final_anchor_index
from .interop import StockInterop

#: a step whose coefficients are all at most this in magnitude runs in a float16 latent's own dtype
NATIVE_COEFFICIENT_BOUND = 2.0
#: plans kept per scheduler across ``set_timesteps`` calls (a few grids' worth)
MAX_PLANS = 4096


@dataclass(frozen=True)
class StepPlan:
    """One grid step, planned: ``x0 = p x + q y`` (``y`` the model output) and the update's sample
    ``u.x x + u.x0 x0 + u.noise noise + u.previous_x0 x0_prev + sum(u.earlier_x0 * earlier x0s)`` with ``x0``
    folded in, as fused kernels over ``(x, y)`` and ``(x, y, noise, x0_prev, *earlier x0s)``.

    ``in_latent_dtype``: every coefficient is at most :data:`NATIVE_COEFFICIENT_BOUND` in magnitude, so float16
    latents are combined in their own dtype (each pass computes in float32 and rounds once, to within a unit in the
    last place of the latent's largest term: its own storage precision) instead of being upcast, which costs a cast
    pass per tensor. Steps that amplify (an epsilon model's ``1 / alpha`` near SNR 0) run in float32, and so does
    every bfloat16 step: with 8 mantissa bits, a second rounding per step adds up over long runs (3.6x the error
    of diffusers' DPM-Solver at 500 steps)."""

    level: Level
    update: Update
    x0: Combination
    sample: Combination
    in_latent_dtype: bool

    @classmethod
    def build(cls, level: Level, p: float, q: float, u: Update) -> StepPlan:
        coefficients = (u.x + u.x0 * p, u.x0 * q, u.noise, u.previous_x0, *u.earlier_x0)
        bounded = max(abs(c) for c in (p, q, *coefficients)) <= NATIVE_COEFFICIENT_BOUND
        return cls(level, u, plan_combination((p, q)), plan_combination(coefficients), bounded)


@dataclass
class ZTSNRSchedulerOutput(BaseOutput):
    """``prev_sample``: the latent at the next grid point; ``pred_original_sample``: the x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # BaseOutput's (the non-None fields become the dict's keys) without its generic walk over dataclass
        # fields, which costs as much as a sampling step's other Python
        for name in ("prev_sample", "pred_original_sample"):
            value = self.__dict__[name]
            if value is not None:
                OrderedDict.__setitem__(self, name, value)


class ZTSNRSchedulerBase(StockInterop, SchedulerMixin, ConfigMixin):
    """Shared protocol code; see the module docstring. Not a scheduler by itself."""

    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0
    #: "vp" or "flow": the path the latents live on
    path: ClassVar[str] = "vp"
    #: x0 predictions of earlier grid points the update uses: 1 (the previous one), or more (its
    #: :meth:`_update_rule` then also takes ``earlier_levels``, those before the previous one, most recent first)
    history_length: int = 1

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
        self._levels: list[Level] = [tuple(level) for level in levels.tolist()]
        self._step_index = None
        self._begin_index = None  # as diffusers: an img2img start set for one run does not carry into the next
        # x0 predictions of the last grid points and their levels, latest first
        self._history: list[torch.Tensor] = []
        self._history_levels: tuple[Level, ...] = ()
        # the earlier x0 an extrapolated last step uses, kept when the loop passes its grid point
        self._anchor_index, self._anchor = final_anchor_index(self._levels), None
        # plans depend on the levels and the config only, so they outlive the grid: a pipeline that samples again
        # with the same step count plans nothing; a changed config starts afresh (read as attributes, as the rules
        # read it: diffusers' FrozenDict takes attribute writes, which leave its items as they were)
        config = {key: getattr(self.config, key, value) for key, value in self.config.items()}
        if getattr(self, "_plans_config", None) != config or len(self._plans) > MAX_PLANS:
            self._plans: dict[tuple, StepPlan] = {}
            self._plans_config = config

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
        ``config.prediction_type``. Returns latents in ``sample``'s dtype; float16 latents are combined in their own
        dtype where the step's coefficients are bounded (see :class:`StepPlan`), others in float32."""
        if kwargs:
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
        history, levels = self._earlier_predictions(i)
        steps = self._step_plan(i, levels, rule_parameters)
        x, y = sample, model_output
        native = x.dtype in (torch.float32, torch.float64) or (x.dtype == torch.float16 and steps.in_latent_dtype)
        if x.dtype != y.dtype or not native:
            work = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
            x, y = x.to(work), y.to(work)
        x0 = steps.x0((x, y))
        noise = None
        if steps.update.noise:
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = noise.to(x.dtype)
        if history and history[0].dtype != x.dtype:
            history = [h.to(x.dtype) for h in history]
        prev = steps.sample((x, y, noise, *history))  # x0 folded in: as few passes as the rule allows
        keep = self.history_length - 1
        self._history = [x0, *self._history[:keep]]
        self._history_levels = (steps.level, *self._history_levels[:keep])
        if i == self._anchor_index:
            self._anchor = (x0, steps.level)
        self._step_index = i + 1
        if prev.dtype != sample.dtype:
            prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return ZTSNRSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _earlier_predictions(self, i: int) -> tuple[list[torch.Tensor], tuple[Level, ...]]:
        """The x0 predictions (and levels) of earlier grid points the step from ``i`` uses, latest first. The last
        step to clean data takes the anchor (:func:`~diffusers_ztsnr.solvers.final_anchor_index`) in place of the
        previous point, so that its extrapolation never multiplies a short interval's difference by more than
        :data:`~diffusers_ztsnr.solvers.FINAL_ANCHOR_RATIO`; a run begun after the anchor steps there first order.
        """
        history, levels = self._history, self._history_levels
        anchor = self._anchor
        last = i == self.num_inference_steps - 1 and bool(levels)
        if last and anchor is None and self._anchor_index is not None and self._extrapolates_last_step():
            # the run began after the anchor (img2img's begin index): every earlier prediction it has is nearer than
            # FINAL_ANCHOR_RATIO, so the last step is first order (an extrapolated last step has no corrector to lose)
            return [], ()
        if anchor is not None and last and levels[0] != anchor[1]:
            return [anchor[0], *history[1:]], (anchor[1], *levels[1:])
        return history, levels

    def _extrapolates_last_step(self) -> bool:
        return getattr(self.config, "final_step", None) == "extrapolate"

    def _step_plan(self, i: int, levels: tuple[Level, ...], rule_parameters: dict[str, Any]) -> StepPlan:
        """The step from grid point ``i`` to ``i + 1`` after the points of ``levels`` (latest first), planned once
        per levels, rule parameters and config."""
        level, next_level = self._levels[i], self._levels[i + 1]
        previous_level = levels[0] if levels else None
        if len(levels) > 1:
            rule_parameters = {**rule_parameters, "earlier_levels": levels[1:]}
        key = (level, next_level, previous_level, *rule_parameters.items())
        plan = self._plans.get(key)
        if plan is None:
            p, q, _, _ = solve_coefficients(self.config.prediction_type, level[0], level[1])
            plan = StepPlan.build(level, p, q, self._update_rule(level, next_level, previous_level, **rule_parameters))
            self._plans[key] = plan
        return plan

    def _update_rule(self, level: Level, next_level: Level, previous_level: Level | None,
                     **rule_parameters: Any) -> Update:
        """Coefficients of this scheduler's update (see :mod:`diffusers_ztsnr.solvers`); ``rule_parameters`` are
        the ones its ``step`` takes (none unless a subclass's ``step`` passes them to :meth:`_advance`)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.config.num_train_timesteps
