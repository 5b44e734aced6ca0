"""Grid construction shared by the schedulers that sample the discrete VP path (SD 1.x/2.x/SDXL)."""

from __future__ import annotations

import warnings

import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from ..parameterization import from_x0_eps
from ..schedule import VPSchedule
from ..spacing import SPACINGS, check_num_inference_steps, discrete_timesteps, karras_grid, logsnr_grid
from .base import ZTSNRSchedulerBase

VP_CLASS_NAMES = ("ZTSNRDDIMScheduler", "ZTSNREulerScheduler", "ZTSNREulerAncestralScheduler",
                  "ZTSNRDPMSolverMultistepScheduler", "ZTSNRUniPCMultistepScheduler")
#: ``final_sigmas_type``: the last step goes to clean data ("zero") or to the schedule's timestep 0 ("sigma_min")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


class VPSchedulerBase(ZTSNRSchedulerBase):
    """Holds a :class:`~diffusers_ztsnr.schedule.VPSchedule` built from diffusers' config keys.

    Subclasses set ``fractional_timesteps`` (whether the model may be called between integer
    timesteps, which Karras grids and custom ``sigmas`` need) and may override :meth:`_final_level`.
    """

    path = "vp"
    fractional_timesteps = False
    # a config moves between these (diffusers' list for its VP schedulers, and ours)
    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + list(VP_CLASS_NAMES)

    def _setup_vp(self) -> None:
        cfg = self.config
        self._check_prediction_type(cfg.prediction_type)
        self._check_choice("timestep_spacing", cfg.timestep_spacing, SPACINGS)
        if cfg.steps_offset < 0:
            raise ValueError(f"steps_offset={cfg.steps_offset} must be >= 0.")
        clamp = cfg.epsilon_zero_snr_clamp
        if clamp is not None and not 0 < clamp < 1:
            raise ValueError(f"epsilon_zero_snr_clamp={clamp} must lie in (0, 1) (an alphabar), or be None.")
        self.schedule = VPSchedule.from_config(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas,
            cfg.rescale_betas_zero_snr,
        )
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.betas = self.schedule.betas.float()
        # as in diffusers: the training timesteps, noisiest first, until set_timesteps
        T = cfg.num_train_timesteps
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.float32 if self.fractional_timesteps else torch.long)
        self.num_inference_steps = None
        if cfg.rescale_betas_zero_snr and cfg.timestep_spacing == "leading":
            warnings.warn(
                "rescale_betas_zero_snr=True with timestep_spacing='leading': the first timestep is not the "
                "zero-SNR one, so sampling from pure noise keeps the train/test mismatch ZTSNR removes. "
                "Pass timestep_spacing='trailing' or 'logsnr'.",
                UserWarning,
                stacklevel=3,
            )

    def _final_level(self) -> tuple[float, float]:
        """The level the last step goes to: clean data."""
        return (1.0, 0.0)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Build the grid: from ``num_inference_steps`` and ``config.timestep_spacing``; or from
        custom integer ``timesteps`` (decreasing, in ``[0, T-1]``); or from custom ``sigmas`` in
        diffusers' Euler convention, ``sigma/alpha`` (decreasing; ``inf`` is the zero-SNR timestep, a
        trailing 0 is dropped since the last step always goes to the final level)."""
        self._check_custom_grid_args(num_inference_steps, timesteps, sigmas)
        T = self.config.num_train_timesteps
        if timesteps is not None:
            grid = torch.as_tensor(timesteps, dtype=torch.float64)
            if grid.ndim != 1 or len(grid) == 0 or bool((grid.diff() >= 0).any()):
                raise ValueError("custom timesteps must be a non-empty, strictly decreasing list.")
            if bool(((grid < 0) | (grid > T - 1)).any()):
                raise ValueError(f"custom timesteps must lie in [0, {T - 1}].")
            if not self.fractional_timesteps and bool((grid != grid.round()).any()):
                raise ValueError(f"{type(self).__name__} takes integer timesteps only.")
        elif sigmas is not None:
            if not self.fractional_timesteps:
                raise ValueError(f"{type(self).__name__} does not accept sigmas=; pass timesteps= instead.")
            ve = torch.as_tensor(sigmas, dtype=torch.float64)
            if len(ve) > 1 and float(ve[-1]) == 0:
                ve = ve[:-1]
            if ve.ndim != 1 or len(ve) == 0 or bool((ve.diff() >= 0).any()) or bool((ve <= 0).any()):
                raise ValueError("custom sigmas must be positive and strictly decreasing (a final 0 is allowed).")
            # The schedule's own range, in sigma/alpha. Its ends used to raise "alpha must lie in [...]": the float64
            # round trip of our own sigma_min lands an ulp outside the table, and diffusers' sigmas are float32 (its
            # cosine sigma_min is 0.2% off, from 1 - alphabar_0 in float32). Ends within 1% are clamped to the
            # table (diffusers clamps any value); anything further is refused with the range.
            alpha_ends = self.schedule.alpha(torch.tensor([T - 1.0, 0.0], dtype=torch.float64))
            ve_ends = (1 - alpha_ends**2).sqrt() / alpha_ends  # [sigma_max (inf on ZTSNR), sigma_min]
            if bool(((ve < ve_ends[1] * 0.99) | (ve > ve_ends[0] * 1.01)).any()):
                raise ValueError(
                    f"custom sigmas (sigma/alpha) must lie in [{float(ve_ends[1]):.6g}, {float(ve_ends[0]):.6g}] "
                    f"for this schedule (inf only on a zero-terminal-SNR one), got {ve.tolist()}."
                )
            alpha = torch.where(torch.isinf(ve), torch.zeros_like(ve), 1 / (1 + ve**2).sqrt())
            grid = self.schedule.timestep_from_alpha(alpha.clamp(float(alpha_ends[0]), float(alpha_ends[1])))
        elif getattr(self.config, "use_karras_sigmas", False):
            check_num_inference_steps(num_inference_steps, T)
            grid = karras_grid(self.schedule, num_inference_steps)
        elif self.config.timestep_spacing in ("logsnr", "logsnr_warped") and self.fractional_timesteps:
            # not rounded to integers: rounding fixes the last steps at t = 3, 2, 1, 0 whatever the step count, which
            # stops the error from falling past about 100 steps
            check_num_inference_steps(num_inference_steps, T)
            grid = logsnr_grid(self.schedule, num_inference_steps, warped=self.config.timestep_spacing != "logsnr")
        else:
            grid = discrete_timesteps(
                self.schedule, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset
            ).double()
        alpha, sigma = self.schedule.alpha_sigma(grid)
        model_timesteps = grid.float() if self.fractional_timesteps else grid.long()
        self._set_levels(model_timesteps, alpha, sigma, self._final_level(), device)

    @property
    def sigmas(self) -> torch.Tensor:
        """The grid as diffusers' Euler ``sigma/alpha`` (``inf`` at a zero-SNR point, 0 at the end)."""
        levels = torch.tensor(self._levels, dtype=torch.float64)
        return torch.where(levels[:, 0] > 0, levels[:, 1] / levels[:, 0], torch.full_like(levels[:, 0], torch.inf))

    def _levels_at(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.schedule.alpha_sigma(timesteps.detach().to("cpu", torch.float64))
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (alpha.to(like.device, like.dtype).reshape(shape), sigma.to(like.device, like.dtype).reshape(shape))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t * x0 + sigma_t * noise`` at (fractional) training timesteps, one per sample."""
        alpha, sigma = self._levels_at(torch.as_tensor(timesteps).reshape(-1), original_samples)
        return alpha * original_samples + sigma * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``alpha_t * noise - sigma_t * x0`` (diffusers' name)."""
        alpha, sigma = self._levels_at(torch.as_tensor(timesteps).reshape(-1), sample)
        return from_x0_eps(sample, noise, alpha.flatten(), sigma.flatten(), "v_prediction")


class FractionalVPSchedulerBase(VPSchedulerBase):
    """A VP scheduler whose model may be called between integer timesteps (Karras grids, custom ``sigmas``),
    with diffusers' ``final_sigmas_type`` for the level of its last step. Base of the Euler and DPM-Solver
    schedulers; subclasses call :meth:`_setup_fractional` in ``__init__``."""

    fractional_timesteps = True

    def _final_level(self) -> tuple[float, float]:
        if self.config.final_sigmas_type == "zero":
            return (1.0, 0.0)
        return tuple(float(v) for v in self.schedule.alpha_sigma(0.0))

    def _setup_fractional(self) -> None:
        self._setup_vp()
        self._check_choice("final_sigmas_type", self.config.final_sigmas_type, FINAL_SIGMAS_TYPES)
