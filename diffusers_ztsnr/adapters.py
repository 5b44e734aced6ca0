"""Run a model on the other path's samplers: a VP model under a flow sampler, a flow model under VP samplers.

One wrapper, :class:`PathTransformedModel`, with a named constructor per direction
(:meth:`~PathTransformedModel.vp_as_flow`, :meth:`~PathTransformedModel.flow_as_vp`). It maps time at equal
SNR and rescales the input (``schedule.vp_to_flow`` / ``schedule.flow_to_vp``):

* flow time ``s`` <-> VP levels ``(alpha, sigma) = ((1 - s), s) / r``, ``r = sqrt((1 - s)**2 + s**2)``, i.e.
  ``s = sigma / (alpha + sigma)``;
* ``x_flow = x_vp / (alpha + sigma)``, ``x_vp = x_flow / r``;
* the VP timestep is the fractional ``t`` at which the model's schedule has that ``alpha``
  (``VPSchedule.timestep_from_alpha``), the flow model time is ``flow_time_scale * s``;
* the output is converted with the one conversion of :mod:`diffusers_ztsnr.parameterization`.

It wraps any module called as ``model(sample, timestep, *args, **kwargs)`` (UNet) or
``model(hidden_states=..., timestep=..., ...)`` (SD3 / Flux transformers; ``input_name="hidden_states"``), returns
what the wrapped module returns (a tensor, a tuple, or an output object with ``.sample``) with the prediction
replaced, and forwards every other attribute (``config``, ``dtype``, ``device``, ...) to the wrapped module, so it
can replace ``pipe.unet`` / ``pipe.transformer`` in a pipeline::

    # a ZTSNR v-prediction UNet on the flow sampler
    pipe.unet = PathTransformedModel.vp_as_flow_from_scheduler_config(pipe.unet, pipe.scheduler.config)
    pipe.scheduler = ZTSNRFlowMatchScheduler(shift=1.0)

``VPModelAsFlow`` and ``FlowModelAsVP``, the former names of the two directions, still work for one release and emit
a ``FutureWarning``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .parameterization import MODEL_PREDICTION_TYPES, from_x0_eps, to_x0_eps
from .schedule import FlowPath, NoisePath, VPSchedule, flow_to_vp, vp_to_flow

FLOW_TIME_SCALE = 1000.0  # diffusers' flow model time: t = 1000 * s (FluxPipeline divides it by 1000 again)


def _check_type(name: str, value: str) -> None:
    if value not in MODEL_PREDICTION_TYPES:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(MODEL_PREDICTION_TYPES)}.")


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    # model time in float32 (what UNets and transformers embed), float64 when the sample is float64
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class PathTransformedModel(torch.nn.Module):
    """A model trained on one noise path, presented as a model of the other path (VP <-> flow) at equal SNR.

    ``model_path`` is the path the wrapped model was trained on and ``sampler_path`` the path of its caller (a
    sampler); one is the VP ``schedule`` (time: the fractional timestep in ``[0, T-1]``, ``T-1`` noisiest), the
    other the plain :class:`~diffusers_ztsnr.schedule.FlowPath` (time: ``s`` in ``[0, 1]``, ``s = 1`` pure noise,
    model time ``flow_time_scale * s``). Called as the wrapped model with a sample and model time of the sampler's
    path, it evaluates the wrapped model at the equal-SNR time of its own path on the rescaled input, and returns
    ``output_type`` at the sampler path's levels. Build it with :meth:`vp_as_flow` or :meth:`flow_as_vp`.
    """

    def __init__(self, model: torch.nn.Module, model_path: NoisePath, sampler_path: NoisePath,
                 prediction_type: str, output_type: str, input_name: str = "sample",
                 flow_time_scale: float = FLOW_TIME_SCALE):
        super().__init__()
        _check_type("prediction_type", prediction_type)
        _check_type("output_type", output_type)
        paths = (model_path, sampler_path)
        schedules = [p for p in paths if isinstance(p, VPSchedule)]
        flows = [p for p in paths if isinstance(p, FlowPath) and not p.warps]
        if len(schedules) != 1 or len(flows) != 1:
            raise ValueError("one path must be a VPSchedule and the other FlowPath() (unshifted: a flow sampler "
                             "passes its shifted flow time as the model time).")
        self.model, self.input_name = model, input_name
        self.model_path, self.sampler_path, self.schedule = model_path, sampler_path, schedules[0]
        self.prediction_type, self.output_type = prediction_type, output_type
        self.flow_time_scale = float(flow_time_scale)

    @classmethod
    def vp_as_flow(cls, model: torch.nn.Module, schedule: VPSchedule, prediction_type: str,
                   output_type: str = "flow_prediction", input_name: str = "sample",
                   flow_time_scale: float = FLOW_TIME_SCALE) -> PathTransformedModel:
        """A VP model (epsilon / v / sample / flow output, ZTSNR or not) presented as a flow model.

        Called with the flow sample ``x_s`` and the flow model time ``flow_time_scale * s``, it evaluates the VP
        model at the equal-SNR timestep on ``x_vp = x_s / r`` and returns ``output_type`` (default
        ``flow_prediction``, the velocity ``eps - x0``) at the flow levels ``(1 - s, s)``.

        A schedule without zero terminal SNR reaches only ``s <= max_flow_sigma`` (< 1): a flow sampler must start
        there (pass ``sigmas`` starting at it), and asking for more raises. An epsilon model cannot give the
        velocity at ``s = 1`` (it carries no information about ``x0`` at SNR 0) and raises there. Below the
        schedule's cleanest level (``s`` under ``sigma_0 / (alpha_0 + sigma_0)``, ~0.03 for SD) the model is
        evaluated at its timestep 0, the nearest level it was trained at.
        """
        return cls(model, schedule, FlowPath(), prediction_type, output_type, input_name,
                                    flow_time_scale)

    @classmethod
    def flow_as_vp(cls, model: torch.nn.Module, schedule: VPSchedule, output_type: str = "v_prediction",
                   prediction_type: str = "flow_prediction", input_name: str = "hidden_states",
                   flow_time_scale: float = FLOW_TIME_SCALE) -> PathTransformedModel:
        """A flow model (output ``eps - x0``, or another ``prediction_type``) presented as a VP model.

        Called with the VP sample ``x_t`` and a (fractional) VP timestep on ``schedule``, it evaluates the flow
        model at the equal-SNR flow time ``s = sigma / (alpha + sigma)`` on ``x_s = x_t / (alpha + sigma)`` (model
        time ``flow_time_scale * s``) and returns ``output_type`` at the VP levels (default ``v_prediction``, which
        every VP sampler reads, at SNR 0 too). Use the schedule of the VP scheduler that drives it
        (:meth:`flow_as_vp_from_scheduler_config`); ZTSNR lets that sampler start at the flow model's pure-noise
        end ``s = 1``.
        """
        return cls(model, FlowPath(), schedule, prediction_type, output_type, input_name,
                                    flow_time_scale)

    @classmethod
    def vp_as_flow_from_scheduler_config(cls, model: torch.nn.Module, config: Mapping[str, Any],
                                         **kwargs: Any) -> PathTransformedModel:
        """:meth:`vp_as_flow` from the model's VP scheduler config (its betas, ``rescale_betas_zero_snr``,
        ``prediction_type``); ``kwargs`` are those of :meth:`vp_as_flow`."""
        schedule, kwargs = _vp_model_arguments(config, kwargs)
        return cls.vp_as_flow(model, schedule, **kwargs)

    @classmethod
    def flow_as_vp_from_scheduler_config(cls, model: torch.nn.Module, config: Mapping[str, Any],
                                         **kwargs: Any) -> PathTransformedModel:
        """:meth:`flow_as_vp` for the VP scheduler with this config: its schedule, and its ``prediction_type`` as
        the output; ``kwargs`` are those of :meth:`flow_as_vp`."""
        schedule, kwargs = _vp_sampler_arguments(config, kwargs)
        return cls.flow_as_vp(model, schedule, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)  # config, dtype, device, add_embedding, ...

    @property
    def max_flow_sigma(self) -> float:
        """The noisiest flow time at equal SNR with the schedule's noisiest timestep (1.0 on a zero-terminal-SNR
        schedule): the noisiest flow time a VP model can be evaluated at."""
        alpha, sigma = self.schedule.alpha_sigma(self.schedule.num_train_timesteps - 1)
        return float(sigma / (alpha + sigma))

    def vp_levels(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, sigma, scale, VP timestep)`` at flow times ``s`` (float64), ``x_vp = x_flow * scale``."""
        s = torch.as_tensor(s, dtype=torch.float64)
        if bool(((s < 0) | (s > 1)).any()):
            raise ValueError(f"flow times must lie in [0, 1], got {s.tolist()}.")
        limit = self.max_flow_sigma
        if bool((s > limit + 1e-9).any()):
            raise ValueError(
                f"flow time s={float(s.max()):.6g} is noisier than this VP model's schedule reaches (its terminal "
                f"SNR is not 0; the largest equal-SNR flow time is {limit:.6g}). Start the flow sampler there, e.g. "
                f"pass sigmas=numpy.linspace({limit:.6g}, 0, n, endpoint=False), or use a zero-terminal-SNR model."
            )
        alpha, sigma, scale = flow_to_vp(s)
        alpha_min = float(self.schedule.alpha(self.schedule.num_train_timesteps - 1))
        alpha_max = float(self.schedule.alpha(0))
        # below the first training timestep (s -> 0) the model's cleanest timestep 0 is the nearest it knows
        t = self.schedule.timestep_from_alpha(alpha.clamp(alpha_min, alpha_max))
        return alpha, sigma, scale, t

    def _model_levels(self, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` of the model's path, the input scale and the model time (float64) at the equal-SNR
        point of the sampler path's ``time``."""
        if self.model_path is self.schedule:  # VP model, flow sampler: ``time`` is the flow time s
            return self.vp_levels(time)
        alpha, sigma = self.schedule.alpha_sigma(time)  # flow model, VP sampler: ``time`` is the VP timestep
        s, scale = vp_to_flow(alpha, sigma)
        return (*self.model_path.alpha_sigma(s), scale, s * self.flow_time_scale)

    def forward(self, *args, **kwargs):
        x, timestep, args, kwargs = self._split(args, kwargs)
        sampler_is_flow = self.sampler_path is not self.schedule
        time_scale = self.flow_time_scale if sampler_is_flow else 1.0  # model time -> path time
        time = self._per_sample(timestep.double().cpu() / time_scale, len(x))
        model_alpha, model_sigma, scale, model_time = self._model_levels(time)
        view = (-1, *([1] * (x.ndim - 1)))
        x_model = x * scale.reshape(view).to(x.device, x.dtype)
        output, rebuild = self._call(x_model, model_time.to(x.device, _time_dtype(x)), args, kwargs)
        # x0 and eps are the same vectors on both paths: solve at the model's levels, express at the sampler's
        x0, eps = to_x0_eps(output, x_model, model_alpha, model_sigma, self.prediction_type)
        alpha, sigma = self.sampler_path.alpha_sigma(time)
        result = from_x0_eps(x0, eps, alpha, sigma, self.output_type)
        return rebuild(result.to(output.dtype))

    def _split(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        sample = kwargs.pop(self.input_name) if self.input_name in kwargs else args.pop(0)
        timestep = kwargs.pop("timestep") if "timestep" in kwargs else args.pop(0)
        return sample, torch.as_tensor(timestep), tuple(args), kwargs

    def _call(self, sample: torch.Tensor, timestep: torch.Tensor, args: tuple, kwargs: dict):
        out = self.model(*args, **{self.input_name: sample, "timestep": timestep, **kwargs})
        if isinstance(out, torch.Tensor):
            return out, lambda new: new
        if isinstance(out, tuple):
            return out[0], lambda new: (new, *out[1:])
        return out.sample, lambda new: type(out)(**{**out, "sample": new})

    @staticmethod
    def _per_sample(level: torch.Tensor, batch: int) -> torch.Tensor:
        return level.reshape(-1).expand(batch) if level.numel() == 1 else level.reshape(-1)


def _vp_model_arguments(config: Mapping[str, Any], kwargs: dict[str, Any]) -> tuple[VPSchedule, dict[str, Any]]:
    """The schedule of a VP model's scheduler config, and its ``prediction_type`` unless ``kwargs`` names one."""
    return VPSchedule.from_scheduler_config(config), {"prediction_type": config.get("prediction_type", "epsilon"),
                                                      **kwargs}


def _vp_sampler_arguments(config: Mapping[str, Any], kwargs: dict[str, Any]) -> tuple[VPSchedule, dict[str, Any]]:
    """The schedule of a VP sampler's config, and its ``prediction_type`` as the output unless ``kwargs`` names one."""
    return VPSchedule.from_scheduler_config(config), {"output_type": config.get("prediction_type", "v_prediction"),
                                                      **kwargs}


def _warn_deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"diffusers_ztsnr.adapters.{old} is deprecated and will be removed in the next release; use "
        f"diffusers_ztsnr.adapters.PathTransformedModel.{new} (same arguments, same behaviour).",
        FutureWarning,
        stacklevel=3,
    )


class VPModelAsFlow(PathTransformedModel):
    """Deprecated name of :meth:`PathTransformedModel.vp_as_flow` (same arguments and behaviour)."""

    def __init__(self, model: torch.nn.Module, schedule: VPSchedule, prediction_type: str,
                 output_type: str = "flow_prediction", input_name: str = "sample",
                 flow_time_scale: float = FLOW_TIME_SCALE):
        _warn_deprecated("VPModelAsFlow", "vp_as_flow")
        super().__init__(model, schedule, FlowPath(), prediction_type, output_type, input_name, flow_time_scale)

    @classmethod
    def from_scheduler_config(cls, model: torch.nn.Module, config: Mapping[str, Any], **kwargs) -> VPModelAsFlow:
        """Deprecated name of :meth:`PathTransformedModel.vp_as_flow_from_scheduler_config`."""
        schedule, kwargs = _vp_model_arguments(config, kwargs)
        return cls(model, schedule, **kwargs)


class FlowModelAsVP(PathTransformedModel):
    """Deprecated name of :meth:`PathTransformedModel.flow_as_vp` (same arguments and behaviour)."""

    def __init__(self, model: torch.nn.Module, schedule: VPSchedule, output_type: str = "v_prediction",
                 prediction_type: str = "flow_prediction", input_name: str = "hidden_states",
                 flow_time_scale: float = FLOW_TIME_SCALE):
        _warn_deprecated("FlowModelAsVP", "flow_as_vp")
        super().__init__(model, FlowPath(), schedule, prediction_type, output_type, input_name, flow_time_scale)

    @classmethod
    def from_scheduler_config(cls, model: torch.nn.Module, config: Mapping[str, Any], **kwargs) -> FlowModelAsVP:
        """Deprecated name of :meth:`PathTransformedModel.flow_as_vp_from_scheduler_config`."""
        schedule, kwargs = _vp_sampler_arguments(config, kwargs)
        return cls(model, schedule, **kwargs)
