"""Noise paths: alpha and sigma at any time, ZTSNR and shift as transforms of a path.

Both paths of this package satisfy :class:`NoisePath` (``alpha_sigma(t)``, and the SNR derived from it):
:class:`VPSchedule` (discrete VP schedules) and :class:`FlowPath` (rectified flow, with SD3's shift, Flux's
dynamic shift and diffusers' terminal stretch as transforms returning a new path). Each formula lives in one
function of this module; the path classes only compose them.

Conventions (used by every API of this package unless it says otherwise):

* **VP path** (SD 1.x / 2.x / SDXL): ``x_t = alpha_t * x0 + sigma_t * eps`` with
  ``alpha_t = sqrt(alphabar_t)`` and ``sigma_t = sqrt(1 - alphabar_t)``. Training timesteps are the
  integers ``0 .. T-1``; ``T-1`` is the noisiest. ``SNR = alpha**2 / sigma**2``.
* **Flow path** (SD3 / Flux, diffusers' convention): ``x_s = (1 - s) * x0 + s * eps`` with ``s`` in
  ``[0, 1]`` and ``s = 1`` pure noise; the model is conditioned on ``t = 1000 * s``.
* The rectified-flow convention (Liu et al. 2022, "Flow straight and fast"; Lipman et al. 2023, "Flow
  matching for generative modeling") runs time the other way: ``t = 0`` noise, ``t = 1`` data, velocity
  ``x1 - eps``. :func:`flow_sigma_from_rectified_flow_time` and
  :func:`flow_velocity_from_rectified_flow_velocity` translate it.

All schedule tables are kept in float64: the interesting values (``alphabar`` near 0 after a ZTSNR
rescale) lose every digit in float16 and most of them in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from ._deprecation import renamed_function

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

_F64 = torch.float64


def _as_f64(t: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
    return torch.as_tensor(t, dtype=_F64)


def betas_for_schedule(
    num_train_timesteps: int,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """Betas of a discrete VP schedule, with diffusers' config keys and meaning.

    ``scaled_linear`` is linear in ``sqrt(beta)`` (the Stable Diffusion schedule); ``squaredcos_cap_v2``
    is the cosine schedule of Nichol & Dhariwal (2021) with betas capped at 0.999.
    """
    if trained_betas is not None:
        betas = _as_f64(list(trained_betas))
        if betas.ndim != 1 or len(betas) != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {betas.numel()} values but num_train_timesteps={num_train_timesteps}; "
                "pass one beta per training timestep."
            )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=_F64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=_F64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def alphabar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = _as_f64([min(1 - alphabar((i + 1) / n) / alphabar(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(
            f"beta_schedule={beta_schedule!r} is not supported; allowed: {', '.join(BETA_SCHEDULES)} "
            "(or pass trained_betas)."
        )
    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("every beta must lie in (0, 1]; check beta_start, beta_end or trained_betas.")
    return betas


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ZTSNR rescale of Lin et al. 2023 (arXiv:2305.08891, Algorithm 1) on ``alphabar``.

    ``sqrt(alphabar)`` is shifted so that its last value is exactly 0 and scaled so that its first
    value is unchanged. The result has ``alphabar[-1] == 0`` exactly (no hidden clamp).
    """
    root = alphas_cumprod.to(_F64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    root[-1] = 0.0  # exact, whatever the rounding of the line above
    return root**2


@runtime_checkable
class NoisePath(Protocol):
    """A noise path ``x_t = alpha(t) * x0 + sigma(t) * eps``; each implementation states its time ``t``.

    Implementations provide :meth:`alpha_sigma` (float64); the SNR follows from it.
    """

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` at time(s) ``t`` (float64)."""
        ...

    def snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """``alpha**2 / sigma**2``: ``0`` at pure noise, ``inf`` at clean data."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    def log_snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """``log(alpha**2 / sigma**2)``: ``-inf`` at a zero-SNR time."""
        alpha, sigma = self.alpha_sigma(t)
        return 2 * (alpha.log() - sigma.log())


class VPSchedule(NoisePath):
    """A discrete variance-preserving schedule, evaluable at any (fractional) timestep.

    Time: training timesteps ``t`` in ``[0, T-1]``, ``T-1`` the noisiest; ``alpha**2 + sigma**2 = 1``.

    Between integer timesteps ``alpha = sqrt(alphabar)`` is interpolated linearly, which keeps
    ``alpha`` monotone, exact at the grid points, and finite where the SNR is 0 or where sigma is 0
    (log-sigma interpolation, diffusers' choice for Euler, is undefined at ``alphabar_T = 0``).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = _as_f64(alphas_cumprod)
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError("alphas_cumprod must be a 1-D table with at least 2 entries.")
        if not bool((ac[1:] <= ac[:-1]).all()) or not bool(((ac >= 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in [0, 1] and decrease with the timestep.")
        self.alphas_cumprod = ac
        self._alpha_table = ac.sqrt()

    @classmethod
    def from_config(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        rescale_betas_zero_snr: bool = False,
    ) -> VPSchedule:
        """The schedule diffusers builds from the same config keys (optionally ZTSNR-rescaled)."""
        betas = betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        schedule = cls(torch.cumprod(1.0 - betas, dim=0))
        return schedule.zero_terminal_snr() if rescale_betas_zero_snr else schedule

    @classmethod
    def from_scheduler_config(cls, config, rescale_betas_zero_snr: bool | None = None) -> VPSchedule:
        """The schedule of a diffusers scheduler config (a mapping), with diffusers' defaults for absent keys;
        ``rescale_betas_zero_snr`` overrides the config's own value when given."""
        if rescale_betas_zero_snr is None:
            rescale_betas_zero_snr = bool(config.get("rescale_betas_zero_snr", False))
        return cls.from_config(
            config.get("num_train_timesteps", 1000), config.get("beta_start", 0.0001), config.get("beta_end", 0.02),
            config.get("beta_schedule", "linear"), config.get("trained_betas"), rescale_betas_zero_snr,
        )

    def zero_terminal_snr(self) -> VPSchedule:
        """This schedule after the ZTSNR rescale (see :func:`rescale_zero_terminal_snr`)."""
        return VPSchedule(rescale_zero_terminal_snr(self.alphas_cumprod))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def is_zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def betas(self) -> torch.Tensor:
        ac = self.alphas_cumprod
        return 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """``alpha_t = sqrt(alphabar_t)`` at timestep(s) ``t`` in ``[0, T-1]`` (float64)."""
        t = _as_f64(t)
        if bool(((t < 0) | (t > self.num_train_timesteps - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t}.")
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = t - lo
        table = self._alpha_table
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        return (1 - self.alpha(t) ** 2).clamp(min=0).sqrt()

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` at timestep(s) ``t`` in ``[0, T-1]`` (float64)."""
        alpha = self.alpha(t)
        return alpha, (1 - alpha**2).clamp(min=0).sqrt()

    def timestep_from_alpha(self, alpha: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`alpha`: the fractional timestep at which ``alpha_t`` equals ``alpha``."""
        alpha = _as_f64(alpha)
        table = self._alpha_table
        if bool(((alpha > table[0]) | (alpha < table[-1])).any()):
            raise ValueError(
                f"alpha must lie in [{float(table[-1]):.6g}, {float(table[0]):.6g}] for this schedule."
            )
        # the table decreases; search its negation, which increases
        neg = -table
        hi = torch.searchsorted(neg, -alpha).clamp(1, len(table) - 1)
        lo = hi - 1
        span = table[lo] - table[hi]
        frac = torch.where(span > 0, (table[lo] - alpha) / span.clamp(min=1e-300), torch.zeros_like(alpha))
        return lo.to(_F64) + frac

    def timestep_from_log_snr(self, log_snr: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep with the given log-SNR (``-inf`` maps to ``T-1`` on a ZTSNR schedule)."""
        return self.timestep_from_alpha(torch.sigmoid(_as_f64(log_snr)).sqrt())


# --- flow path ---------------------------------------------------------------------------------


def flow_alpha_sigma(s: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma) = (1 - s, s)`` on the rectified-flow path ``x_s = (1 - s) x0 + s eps``."""
    s = _as_f64(s)
    return 1 - s, s


def shift_flow_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Static shift of SD3 (Esser et al. 2024, eq. 23): ``shift * s / (1 + (shift - 1) * s)``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}.")
    # written as ``shift*s / (shift*s + (1 - s))``, which is exactly 1 at s = 1 and never above it: in the form
    # above ``1 + (shift - 1)`` rounds away from ``shift`` (shift=0.2 gave s = 1 + 2e-16, alpha = 1 - s < 0: a
    # math domain error in DPM-Solver++; shift=0.3 gave alpha = 2e-16), so the grid missed SNR 0 exactly and an
    # epsilon model escaped its SNR-0 error
    scaled = shift * s
    return scaled / (scaled + (1 - s))


def dynamic_shift_flow_sigmas(
    s: torch.Tensor, mu: float, exponent: float = 1.0, time_shift_type: str = "exponential"
) -> torch.Tensor:
    """Resolution-dependent shift (Flux): ``e^mu / (e^mu + (1/s - 1)^exponent)``.

    ``time_shift_type="linear"`` uses ``mu`` itself as the shift factor in the same formula, as diffusers
    does. ``s = 0`` maps to 0 and ``s = 1`` to 1.
    """
    if time_shift_type == "exponential":
        factor = math.exp(mu)
    elif time_shift_type == "linear":
        factor = mu
    else:
        raise ValueError(f"time_shift_type={time_shift_type!r}; allowed: 'exponential', 'linear'.")
    s = _as_f64(s)
    odds = torch.where(s > 0, (1 / s.clamp(min=1e-300) - 1) ** exponent, torch.full_like(s, math.inf))
    # a tensor numerator: torch evaluates ``float / tensor`` as ``float * reciprocal(tensor)``, which mapped s = 1
    # to 1 - 1e-16 for some mu; the grid then missed SNR 0 exactly and an epsilon model escaped its error
    factor = torch.tensor(factor, dtype=_F64)
    return factor / (factor + odds)


def flow_mu(
    image_seq_len: int,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's ``mu``: linear in the number of latent tokens between the two configured anchors."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return base_shift + slope * (image_seq_len - base_image_seq_len)


def stretch_flow_sigmas_to_terminal(s: torch.Tensor, shift_terminal: float) -> torch.Tensor:
    """Stretch a descending flow-sigma grid so that its last value equals ``shift_terminal``
    (diffusers' ``shift_terminal`` key, used by LTX-Video)."""
    one_minus = 1 - s
    if float(one_minus[-1]) == 0:
        # a grid that is only s = 1 (one step from pure noise): nothing to stretch, and the scale below
        # would be 0, giving 0/0 = NaN timesteps (diffusers does the same)
        return s
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - one_minus / scale


class FlowPath(NoisePath):
    """The flow path ``x_s = (1 - s) x0 + s eps`` at a time ``u`` that the path's warps map to ``s``.

    Time: diffusers' convention, ``u`` and ``s`` in ``[0, 1]`` with 1 pure noise (SNR 0) and 0 clean data; the
    model is conditioned on ``1000 * s``. Without warps ``s = u``. :meth:`shifted`, :meth:`dynamically_shifted`
    and :meth:`stretched_to_terminal` return a new path whose warps end with that transform (applied in the order
    added), each computed by this module's formula function. The terminal stretch is defined relative to a grid:
    it maps the last entry of the (1-D, descending) times it is evaluated at to ``shift_terminal``.
    """

    def __init__(self, warps: Sequence[Callable[[torch.Tensor], torch.Tensor]] = ()):
        self.warps = tuple(warps)

    def __repr__(self) -> str:
        return f"FlowPath(warps={list(self.warps)!r})"

    def sigma(self, u: torch.Tensor | float) -> torch.Tensor:
        """Flow time ``s`` (the noise level) at time(s) ``u`` (float64)."""
        s = _as_f64(u)
        for warp in self.warps:
            s = warp(s)
        return s

    def alpha_sigma(self, u: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - s, s)`` with ``s = sigma(u)`` (float64)."""
        return flow_alpha_sigma(self.sigma(u))

    def then(self, warp: Callable[[torch.Tensor], torch.Tensor]) -> FlowPath:
        """This path followed by ``warp``, a map of flow times ``s`` that keeps 0 and 1 in ``[0, 1]``."""
        return FlowPath((*self.warps, warp))

    def shifted(self, shift: float) -> FlowPath:
        """SD3's static shift (:func:`shift_flow_sigmas`) after this path's warps."""
        return self.then(functools.partial(shift_flow_sigmas, shift=shift))

    def dynamically_shifted(
        self, mu: float, exponent: float = 1.0, time_shift_type: str = "exponential"
    ) -> FlowPath:
        """Flux's resolution-dependent shift (:func:`dynamic_shift_flow_sigmas`, ``mu`` from :func:`flow_mu`)."""
        return self.then(
            functools.partial(dynamic_shift_flow_sigmas, mu=mu, exponent=exponent, time_shift_type=time_shift_type)
        )

    def stretched_to_terminal(self, shift_terminal: float) -> FlowPath:
        """diffusers' ``shift_terminal`` (:func:`stretch_flow_sigmas_to_terminal`): a grid's last flow time
        becomes ``shift_terminal``."""
        return self.then(functools.partial(stretch_flow_sigmas_to_terminal, shift_terminal=shift_terminal))


# --- mapping between the two paths ----------------------------------------------------------------


def vp_to_flow(alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow time at equal SNR and the input scale: ``s = sigma / (alpha + sigma)``,
    ``x_flow = x_vp * scale`` with ``scale = 1 / (alpha + sigma)``."""
    total = alpha + sigma
    return sigma / total, 1 / total


def flow_to_vp(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VP ``(alpha, sigma)`` at the SNR of flow time ``s`` and the scale ``x_vp = x_flow * scale``."""
    s = _as_f64(s)
    norm = ((1 - s) ** 2 + s**2).sqrt()
    return (1 - s) / norm, s / norm, 1 / norm


def flow_sigma_from_rectified_flow_time(t: torch.Tensor | float) -> torch.Tensor:
    """Time of the rectified-flow convention (``t = 0`` noise, ``t = 1`` data) as diffusers' ``s = 1 - t``."""
    return 1 - _as_f64(t)


def flow_velocity_from_rectified_flow_velocity(u: torch.Tensor) -> torch.Tensor:
    """Velocity of the rectified-flow convention, ``x1 - eps``, as diffusers' flow target ``eps - x0``
    (a sign flip)."""
    return -u


#: deprecated names (kept for one release)
flow_sigma_from_seed_time = renamed_function(flow_sigma_from_rectified_flow_time, "flow_sigma_from_seed_time",
                                             __name__)
flow_velocity_from_seed_velocity = renamed_function(
    flow_velocity_from_rectified_flow_velocity, "flow_velocity_from_seed_velocity", __name__
)
