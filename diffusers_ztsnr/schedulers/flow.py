"""Flow-matching sampler (SD3, Flux): Euler or second-order multistep on ``x_s = (1-s) x0 + s eps``."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config

from ..schedule import FlowPath
from ..solvers import FINAL_STEPS, ddim_update, dpmpp_2m_update
from ..spacing import check_num_inference_steps, flow_logsnr_grid
from .base import ZTSNRSchedulerBase

#: ``timestep_spacing`` values of the flow scheduler
FLOW_SPACINGS = ("logsnr", "linspace")


class ZTSNRFlowMatchScheduler(ZTSNRSchedulerBase):
    """Drop-in for ``diffusers.FlowMatchEulerDiscreteScheduler`` (same keys, same shift and ``mu``
    handling), sampling models of any parameterization on the flow path.

    Time convention: diffusers' ``s`` in ``[0, 1]``, ``s = 1`` pure noise (SNR 0, exact), model time
    ``t = num_train_timesteps * s``. ``prediction_type`` defaults to ``flow_prediction``
    (``eps - x0``); ``solver_order=1`` is Euler, ``2`` is DPM-Solver++(2M) written on the flow path,
    which needs no extra model evaluations.

    Grids: ``timestep_spacing="logsnr"`` (default) is ``s = 1`` then uniform in log-SNR over the shifted
    training range (:func:`diffusers_ztsnr.spacing.flow_logsnr_grid`); ``"linspace"`` is diffusers' grid,
    uniform in the unshifted time, with which ``solver_order=1`` is diffusers' sampler. Sigmas a pipeline
    passes (``FluxPipeline`` and others pass ``sigmas=`` of their own) are sampled as given while
    ``use_pipeline_sigmas=True`` (default: the drop-in rule); with ``False`` only their count is used and
    the grid is this scheduler's. ``final_step`` as in
    :class:`~diffusers_ztsnr.schedulers.multistep.ZTSNRDPMSolverMultistepScheduler` (order 2 only).
    """

    path = "flow"
    rejected_config_keys = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    stock_class = FlowMatchEulerDiscreteScheduler
    stock_assumes = {"prediction_type": "flow_prediction"}
    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
        prediction_type: str = "flow_prediction",
        solver_order: int = 2,
        epsilon_zero_snr_clamp: float | None = None,
        timestep_spacing: str = "logsnr",
        use_pipeline_sigmas: bool = True,
        final_step: str = "first_order",
        **kwargs: Any,
    ):
        self._check_stock_kwargs(kwargs)
        self._check_prediction_type(prediction_type)
        self._check_choice("solver_order", solver_order, (1, 2))
        self._check_choice("timestep_spacing", timestep_spacing, FLOW_SPACINGS)
        self._check_choice("use_pipeline_sigmas", use_pipeline_sigmas, (True, False))
        self._check_choice("final_step", final_step, FINAL_STEPS)
        self._check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        if shift <= 0:
            raise ValueError(f"shift={shift} must be > 0.")
        if shift_terminal is not None and not 0 < shift_terminal < 1:
            raise ValueError(f"shift_terminal={shift_terminal} must lie in (0, 1), or be None.")
        if epsilon_zero_snr_clamp is not None and not 0 < epsilon_zero_snr_clamp < 1:
            raise ValueError(f"epsilon_zero_snr_clamp={epsilon_zero_snr_clamp} must lie in (0, 1), or be None.")
        T = num_train_timesteps
        # the dynamic shift depends on the image size, known only at set_timesteps: none until then
        training_path = FlowPath() if use_dynamic_shifting else FlowPath().shifted(shift)
        # diffusers' default grid runs from the (shifted) training sigma_max to sigma_min
        self.sigma_min = float(training_path.sigma(torch.tensor(1.0 / T, dtype=torch.float64)))
        self.sigma_max = 1.0
        # as in diffusers: the (shifted) training grid, noisiest first, until set_timesteps
        self.timesteps = (training_path.sigma(torch.arange(T, 0, -1, dtype=torch.float64) / T) * T).float()
        self.num_inference_steps = None

    @classmethod
    def _translated_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A VP multistep config that samples a flow model (diffusers' ``use_flow_sigmas=True``, as Sana's
        DPM-Solver++ ships): its ``flow_shift`` is our ``shift``, and its beta schedule and VP spacing describe
        nothing a flow grid uses (diffusers ignores them too under ``use_flow_sigmas``)."""
        if not config.get("use_flow_sigmas"):
            return config
        vp_only = {"use_flow_sigmas", "flow_shift", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                   "rescale_betas_zero_snr", "timestep_spacing", "steps_offset"}
        return {**{k: v for k, v in config.items() if k not in vp_only}, "shift": config.get("flow_shift") or 1.0}

    @property
    def shift(self) -> float:
        return self.config.shift

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Build the grid: ``sigmas`` (unshifted flow times, decreasing in ``(0, 1]``; only their count when
        ``use_pipeline_sigmas=False``) or ``timesteps`` (model times) as diffusers does, else
        ``num_inference_steps`` points of ``timestep_spacing``. Times pass through the static shift, or the
        dynamic shift with ``mu`` (which FluxPipeline computes from the image size, see
        :func:`diffusers_ztsnr.schedule.flow_mu`), then ``shift_terminal``. The last step goes to s = 0."""
        self._check_custom_grid_args(num_inference_steps, timesteps, sigmas)
        cfg = self.config
        T = cfg.num_train_timesteps
        if sigmas is not None and not cfg.use_pipeline_sigmas:
            num_inference_steps, sigmas = len(sigmas), None
        if sigmas is None and timesteps is None:
            check_num_inference_steps(num_inference_steps, T)
            if cfg.timestep_spacing == "logsnr":
                s = flow_logsnr_grid(self.sampling_path(mu), num_inference_steps, T)
                self._set_levels((s * T).float(), 1 - s, s, (1.0, 0.0), device)
                return
        if sigmas is not None:
            u = torch.as_tensor(sigmas, dtype=torch.float64)
        elif timesteps is not None:
            u = torch.as_tensor(timesteps, dtype=torch.float64) / T
        else:
            u = torch.linspace(self.sigma_max, self.sigma_min, num_inference_steps, dtype=torch.float64)
        if u.ndim != 1 or len(u) == 0 or bool((u.diff() >= 0).any()) or bool(((u <= 0) | (u > 1)).any()):
            raise ValueError("flow sigmas must be strictly decreasing values in (0, 1] (the final 0 is added).")
        alpha, s = self.sampling_path(mu).alpha_sigma(u)  # u: unshifted flow times, s: the grid's
        model_timesteps = torch.as_tensor(timesteps, dtype=torch.float32) if timesteps is not None else (s * T).float()
        self._set_levels(model_timesteps, alpha, s, (1.0, 0.0), device)

    def sampling_path(self, mu: float | None = None) -> FlowPath:
        """The flow path ``set_timesteps`` samples: the static shift, or the dynamic shift with ``mu``, then the
        ``shift_terminal`` stretch; its time is the unshifted flow time (``sigmas=`` of ``set_timesteps``)."""
        cfg = self.config
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError(
                    "use_dynamic_shifting=True needs mu= in set_timesteps (FluxPipeline passes it; compute it "
                    "with diffusers_ztsnr.schedule.flow_mu(image_seq_len))."
                )
            path = FlowPath().dynamically_shifted(mu, 1.0, cfg.time_shift_type)
        else:
            path = FlowPath().shifted(cfg.shift)
        return path.stretched_to_terminal(cfg.shift_terminal) if cfg.shift_terminal else path

    @property
    def sigmas(self) -> torch.Tensor:
        """Flow times of the grid, ending with 0 (diffusers' attribute)."""
        return torch.tensor([level[1] for level in self._levels], dtype=torch.float32)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """``alpha * sample + sigma * noise`` (img2img, inpainting): the grid's level where ``timestep`` is one of
        ``self.timesteps``, else ``(1 - s, s)`` with ``s = timestep / num_train_timesteps``. The grid's level is what
        the next step starts from; it differs from ``timestep / num_train_timesteps`` under a shift with custom
        ``timesteps=``, which are kept as model times while the levels are shifted (diffusers' ``scale_noise`` reads
        its ``sigmas`` at the step index, so the two agree)."""
        t = torch.as_tensor(timestep).detach().reshape(-1).to("cpu", torch.float64)
        s = t / self.config.num_train_timesteps
        alpha, sigma = 1 - s, s
        if hasattr(self, "_levels"):
            on_grid = t[:, None] == self.timesteps.detach().to("cpu", torch.float64)[None, :]
            levels = torch.tensor(self._levels[: on_grid.shape[1]], dtype=torch.float64)[on_grid.float().argmax(1)]
            hit = on_grid.any(1)
            alpha, sigma = torch.where(hit, levels[:, 0], alpha), torch.where(hit, levels[:, 1], sigma)
        shape = (-1,) + (1,) * (sample.ndim - 1)
        alpha, sigma = (v.to(sample.device, sample.dtype).reshape(shape) for v in (alpha, sigma))
        return alpha * sample + sigma * noise

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        return self.scale_noise(original_samples, timesteps, noise)

    def _update_rule(self, level, next_level, previous_level):
        if self.config.solver_order == 1:
            return ddim_update(level, next_level)
        return dpmpp_2m_update(level, next_level, previous_level, final_step=self.config.final_step)
