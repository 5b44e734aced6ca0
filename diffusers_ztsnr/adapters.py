"""Run a model on the other path's samplers: a VP model under a flow sampler, a flow model under VP samplers.

Both adapters map time at equal SNR and rescale the input (``schedule.vp_to_flow`` / ``schedule.flow_to_vp``):

* flow time ``s`` <-> VP levels ``(alpha, sigma) = ((1 - s), s) / r``, ``r = sqrt((1 - s)**2 + s**2)``, i.e.
  ``s = sigma / (alpha + sigma)``;
* ``x_flow = x_vp / (alpha + sigma)``, ``x_vp = x_flow / r``;
* the VP timestep is the fractional ``t`` at which the model's schedule has that ``alpha``
  (``VPSchedule.timestep_from_alpha``), the flow model time is ``flow_time_scale * s``;
* the output is converted with the one conversion of :mod:`diffusers_ztsnr.parameterization`.

Both wrap any module called as ``model(sample, timestep, *args, **kwargs)`` (UNet) or
``model(hidden_states=..., timestep=..., ...)`` (SD3 / Flux transformers; ``input_name="hidden_states"``), return
what the wrapped module returns (a tensor, a tuple, or an output object with ``.sample``) with the prediction
replaced, and forward every other attribute (``config``, ``dtype``, ``device``, ...) to the wrapped module, so
they can replace ``pipe.unet`` / ``pipe.transformer`` in a pipeline::

    pipe.unet = VPModelAsFlow.from_scheduler_config(pipe.unet, pipe.scheduler.config)   # a ZTSNR v model
    pipe.scheduler = ZTSNRFlowMatchScheduler(shift=1.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .parameterization import MODEL_PREDICTION_TYPES, from_x0_eps, to_x0_eps
from .schedule import VPSchedule, flow_to_vp, vp_to_flow

FLOW_TIME_SCALE = 1000.0  # diffusers' flow model time: t = 1000 * s (FluxPipeline divides it by 1000 again)


def _check_type(name: str, value: str) -> None:
    if value not in MODEL_PREDICTION_TYPES:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(MODEL_PREDICTION_TYPES)}.")


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    # model time in float32 (what UNets and transformers embed), float64 when the sample is float64
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Wrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, schedule: VPSchedule, prediction_type: str, output_type: str,
                 input_name: str, flow_time_scale: float):
        super().__init__()
        _check_type("prediction_type", prediction_type)
        _check_type("output_type", output_type)
        self.model, self.input_name = model, input_name
        self.schedule, self.prediction_type, self.output_type = schedule, prediction_type, output_type
        self.flow_time_scale = float(flow_time_scale)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)  # config, dtype, device, add_embedding, ...

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


class VPModelAsFlow(_Wrapper):
    """A VP model (epsilon / v / sample / flow output, ZTSNR or not) presented as a flow model.

    Called with the flow sample ``x_s`` and the flow model time ``flow_time_scale * s`` (diffusers' convention:
    ``s = 1`` pure noise), it evaluates the VP model at the equal-SNR timestep on ``x_vp = x_s / r`` and returns
    ``output_type`` (default ``flow_prediction``, the velocity ``eps - x0``) at the flow levels ``(1 - s, s)``.

    A schedule without zero terminal SNR reaches only ``s <= max_flow_sigma`` (< 1): a flow sampler must start
    there (pass ``sigmas`` starting at it), and asking for more raises. An epsilon model cannot give the
    velocity at ``s = 1`` (it carries no information about ``x0`` at SNR 0) and raises there. Below the
    schedule's cleanest level (``s`` under ``sigma_0 / (alpha_0 + sigma_0)``, ~0.03 for SD) the model is evaluated
    at its timestep 0, the nearest level it was trained at.
    """

    def __init__(self, model: torch.nn.Module, schedule: VPSchedule, prediction_type: str,
                 output_type: str = "flow_prediction", input_name: str = "sample",
                 flow_time_scale: float = FLOW_TIME_SCALE):
        super().__init__(model, schedule, prediction_type, output_type, input_name, flow_time_scale)

    @classmethod
    def from_scheduler_config(cls, model: torch.nn.Module, config: Mapping[str, Any], **kwargs) -> VPModelAsFlow:
        """From the model's VP scheduler config (its betas, ``rescale_betas_zero_snr``, ``prediction_type``)."""
        kwargs.setdefault("prediction_type", config.get("prediction_type", "epsilon"))
        return cls(model, VPSchedule.from_scheduler_config(config), **kwargs)

    @property
    def max_flow_sigma(self) -> float:
        """The noisiest flow time this model was trained at (1.0 on a zero-terminal-SNR schedule)."""
        alpha, sigma = self.schedule.alpha_sigma(self.schedule.num_train_timesteps - 1)
        return float(sigma / (alpha + sigma))

    def vp_levels(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, sigma, input scale, VP timestep)`` at flow times ``s`` (float64)."""
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

    def forward(self, *args, **kwargs):
        x_flow, timestep, args, kwargs = self._split(args, kwargs)
        s = self._per_sample(timestep.double().cpu() / self.flow_time_scale, len(x_flow))
        alpha, sigma, scale, t = self.vp_levels(s)
        view = (-1, *([1] * (x_flow.ndim - 1)))
        x_vp = x_flow * scale.reshape(view).to(x_flow.device, x_flow.dtype)
        t_model = t.to(x_flow.device, _time_dtype(x_flow))
        output, rebuild = self._call(x_vp, t_model, args, kwargs)
        # x0 and eps are the same vectors on both paths: solve at the VP levels, express at the flow levels
        x0, eps = to_x0_eps(output, x_vp, alpha, sigma, self.prediction_type)
        result = from_x0_eps(x0, eps, 1 - s, s, self.output_type)
        return rebuild(result.to(output.dtype))


class FlowModelAsVP(_Wrapper):
    """A flow model (output ``eps - x0``, or another ``prediction_type``) presented as a VP model.

    Called with the VP sample ``x_t`` and a (fractional) VP timestep on ``schedule``, it evaluates the flow model
    at the equal-SNR flow time ``s = sigma / (alpha + sigma)`` on ``x_s = x_t / (alpha + sigma)`` (model time
    ``flow_time_scale * s``) and returns ``output_type`` at the VP levels (default ``v_prediction``, which every
    VP sampler reads, at SNR 0 too). Use the schedule of the VP scheduler that drives it
    (:meth:`from_scheduler_config`); ZTSNR lets that sampler start at the flow model's pure-noise end ``s = 1``.
    """

    def __init__(self, model: torch.nn.Module, schedule: VPSchedule, output_type: str = "v_prediction",
                 prediction_type: str = "flow_prediction", input_name: str = "hidden_states",
                 flow_time_scale: float = FLOW_TIME_SCALE):
        super().__init__(model, schedule, prediction_type, output_type, input_name, flow_time_scale)

    @classmethod
    def from_scheduler_config(cls, model: torch.nn.Module, config: Mapping[str, Any], **kwargs) -> FlowModelAsVP:
        """For the VP scheduler with this config: its schedule, and its ``prediction_type`` as the output."""
        kwargs.setdefault("output_type", config.get("prediction_type", "v_prediction"))
        return cls(model, VPSchedule.from_scheduler_config(config), **kwargs)

    def forward(self, *args, **kwargs):
        x_vp, timestep, args, kwargs = self._split(args, kwargs)
        t = self._per_sample(timestep.double().cpu(), len(x_vp))
        alpha, sigma = self.schedule.alpha_sigma(t)
        s, scale = vp_to_flow(alpha, sigma)
        view = (-1, *([1] * (x_vp.ndim - 1)))
        x_flow = x_vp * scale.reshape(view).to(x_vp.device, x_vp.dtype)
        time = (s * self.flow_time_scale).to(x_vp.device, _time_dtype(x_vp))
        output, rebuild = self._call(x_flow, time, args, kwargs)
        x0, eps = to_x0_eps(output, x_flow, 1 - s, s, self.prediction_type)
        result = from_x0_eps(x0, eps, alpha, sigma, self.output_type)
        return rebuild(result.to(output.dtype))
