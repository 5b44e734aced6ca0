"""Exact denoisers for Gaussian and Gaussian-mixture data: the oracle that proves samplers correct.

For data ``x0 ~ sum_k w_k N(mu_k, diag(var_k))`` and ``x_t = alpha * x0 + sigma * eps`` the
posterior mean ``E[x0 | x_t]`` is closed form (Bishop 2006, §2.3.3, per component, mixed with the
components' posterior responsibilities). The MSE-optimal model of every parameterization is that
posterior mean pushed through :func:`~diffusers_ztsnr.parameterization.from_x0_eps`, so a sampler fed
this model must reproduce the data distribution as its step count grows (for the ODE samplers the
probability-flow ODE of the exact score transports N(0, I) onto the data exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .parameterization import from_x0_eps

LevelFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class GaussianMixture:
    """Diagonal Gaussian mixture in ``dim`` dimensions (one component: a Gaussian), float64."""

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, means.shape[-1])
        self.variances = torch.as_tensor(variances, dtype=torch.float64).reshape(self.means.shape)
        k = len(self.means)
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        if bool((self.variances <= 0).any()) or abs(float(w.sum()) - 1) > 1e-9 or bool((w <= 0).any()):
            raise ValueError("variances must be > 0 and weights positive, summing to 1.")
        self.weights = w

    @classmethod
    def gaussian(cls, mean: torch.Tensor, variance: torch.Tensor) -> GaussianMixture:
        return cls(torch.as_tensor(mean)[None], torch.as_tensor(variance)[None])

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def variance(self) -> torch.Tensor:
        second = (self.weights[:, None] * (self.variances + self.means**2)).sum(0)
        return second - self.mean**2

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.variances[comp].sqrt() * z

    def ode_transport(
        self, x: torch.Tensor, start: tuple[float, float], end: tuple[float, float]
    ) -> torch.Tensor:
        """Exact solution of the probability-flow ODE from level ``start`` to ``end`` (one Gaussian).

        Per dimension ``x_t`` has mean ``alpha * mu`` and std ``sqrt(alpha**2 * var + sigma**2)``, and the
        ODE moves each point keeping its standardized value. With ``end = (1, 0)`` this is the exact
        sample a deterministic sampler converges to from the initial latent ``x``.
        """
        if len(self.weights) != 1:
            raise ValueError("ode_transport is closed form for a single Gaussian only.")
        mu, var = self.means[0], self.variances[0]
        (a0, s0), (a1, s1) = start, end
        standardized = (x.double() - a0 * mu) / (a0**2 * var + s0**2).sqrt()
        return a1 * mu + (a1**2 * var + s1**2).sqrt() * standardized

    def posterior_mean(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x_t = x]`` for rows ``x`` of shape ``[B, dim]``; ``alpha``/``sigma`` scalars or ``[B]``."""
        x = x.double()
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        mu, var = self.means[None], self.variances[None]  # [1, K, D]
        marginal = a**2 * var + s**2  # variance of x_t given the component
        resid = x[:, None, :] - a * mu
        x0_k = mu + a * var / marginal * resid  # [B, K, D]
        if len(self.weights) == 1:
            return x0_k[:, 0]
        loglik = -0.5 * ((resid**2 / marginal) + marginal.log() + math.log(2 * math.pi)).sum(-1)
        resp = torch.softmax(loglik + self.weights.log()[None], dim=1)  # [B, K]
        return (resp[..., None] * x0_k).sum(1)


def vp_levels(alphas_cumprod: torch.Tensor) -> LevelFn:
    """Model timestep (fractional, VP) -> ``(alpha, sigma)`` on the schedule the model was trained on."""
    from .schedule import VPSchedule

    schedule = VPSchedule(alphas_cumprod)
    return lambda t: schedule.alpha_sigma(t.double().cpu())


def flow_levels(num_train_timesteps: int = 1000) -> LevelFn:
    """Model timestep ``t = T * s`` -> ``(1 - s, s)`` on the flow path."""
    return lambda t: (1 - t.double().cpu() / num_train_timesteps, t.double().cpu() / num_train_timesteps)


class AnalyticModel:
    """A callable ``model(x_t, timestep) -> output`` that is exact for the data, in any parameterization.

    ``x_t`` has shape ``[B, dim]`` or ``[B, ...]`` flattening to ``dim``; ``timestep`` a scalar or ``[B]``.
    """

    def __init__(self, data: GaussianMixture, levels: LevelFn, prediction_type: str):
        self.data, self.levels, self.prediction_type = data, levels, prediction_type

    @property
    def affine(self) -> bool:
        """Whether the model is affine in ``x_t`` (Gaussian data, one component)."""
        return len(self.data.means) == 1

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(timestep).reshape(-1)
        alpha, sigma = self.levels(t)
        flat = x.reshape(len(x), -1).double()
        x0 = self.data.posterior_mean(flat, alpha, sigma)
        a = alpha.reshape(-1, 1)
        s = sigma.reshape(-1, 1)
        if self.prediction_type == "sample":
            out = x0
        else:
            if bool((s == 0).any()):
                raise ValueError("the analytic model is only defined at sigma > 0.")
            eps = (flat - a * x0) / s
            out = from_x0_eps(x0, eps, alpha.reshape(-1), sigma.reshape(-1), self.prediction_type)
        return out.reshape(x.shape).to(x.dtype)


def run_sampler(
    scheduler, model: AnalyticModel, num_samples: int, num_inference_steps: int | None, seed: int = 0,
    dtype: torch.dtype = torch.float64, **set_timesteps_kwargs,
) -> torch.Tensor:
    """Sample ``num_samples`` rows with any diffusers-protocol scheduler driving ``model``."""
    generator = torch.Generator().manual_seed(seed)
    if num_inference_steps is None:
        scheduler.set_timesteps(**set_timesteps_kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    x = torch.randn(num_samples, model.data.dim, generator=generator, dtype=torch.float64).to(dtype)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = model(model_in, t.expand(len(x)) if t.ndim == 0 else t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


class GuidedModel:
    """Classifier-free guidance of two exact models: ``u + scale * (c - u)`` (``u`` unconditional, ``c``
    conditional, in their common parameterization), as pipelines combine their two predictions. With Gaussian
    data both are affine in ``x_t``, and so is the guided prediction: :func:`sampler_affine` measures samplers
    driving it exactly. ``scale = 1`` is the conditional model."""

    def __init__(self, conditional: AnalyticModel, unconditional: AnalyticModel, scale: float):
        if conditional.prediction_type != unconditional.prediction_type:
            raise ValueError("guide two models of the same prediction_type.")
        self.conditional, self.unconditional, self.scale = conditional, unconditional, scale

    @property
    def data(self) -> GaussianMixture:
        """The conditional data (its ``dim`` is the model's)."""
        return self.conditional.data

    @property
    def affine(self) -> bool:
        """Whether the guided prediction is affine in ``x_t`` (both models of one-component data)."""
        return self.conditional.affine and self.unconditional.affine

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        u = self.unconditional(x, timestep)
        return u + self.scale * (self.conditional(x, timestep) - u)


def guided_ode_solution(model: GuidedModel, start: tuple[float, float] = (0.0, 1.0),
                        end: tuple[float, float] = (1.0, 0.0),
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gain, offset)`` per dimension of the exact guided probability-flow ODE from the latent ``z ~ N(0, I)`` at
    level ``start`` (``(alpha, sigma)``; default SNR 0, where every pipeline starts its latents) to level ``end``
    (default clean data): the limit every consistent deterministic sampler of ``model`` approaches as its steps
    shrink.

    In the variance-exploding frame ``y = x / alpha``, ``tau = sigma / alpha`` (the same ODE for the VP and the
    flow path), the guided score of two diagonal Gaussians ``(m_u, v_u)``, ``(m_c, v_c)`` is ``-a(tau) y + b(tau)``
    with ``a = (1 - w) / (v_u + tau^2) + w / (v_c + tau^2)``, ``b = (1 - w) m_u / (v_u + tau^2) + w m_c /
    (v_c + tau^2)``, and ``dy/dtau = -tau * score`` is linear. With its integrating factor
    ``G(tau) = (v_u + tau^2)^((1 - w) / 2) (v_c + tau^2)^(w / 2)``: ``gain = alpha_e G(tau_e) / (alpha_s G(tau_s))``
    (``sigma_s`` in place of ``alpha_s G(tau_s)`` from SNR 0; ``std_u^(1 - w) std_c^w`` from SNR 0 to clean data)
    and ``offset = alpha_e G(tau_e) int_tau_e^tau_s tau b / G dtau``, a quadrature (trapezoid in ``log tau``:
    exponentially convergent from SNR 0 to clean data, where the integrand vanishes at both ends; to about 1e-6
    of the data std with a finite start or end level). ``w = 1`` gives the conditional data exactly."""
    if not model.affine:
        raise ValueError("guided_ode_solution needs Gaussian data (one component) in both models.")
    w = model.scale
    (m_u, v_u), (m_c, v_c) = ((m.data.means[0], m.data.variances[0]) for m in (model.unconditional, model.conditional))

    def log_g(tau_sq: float | torch.Tensor) -> torch.Tensor:
        tau_sq = torch.as_tensor(tau_sq, dtype=torch.float64)
        return 0.5 * ((1 - w) * (v_u + tau_sq).log() + w * (v_c + tau_sq).log())

    (alpha_s, sigma_s), (alpha_e, sigma_e) = start, end
    log_tau = [math.log(sigma / alpha) if alpha > 0 and sigma > 0 else (40.0 if sigma > 0 else -40.0)
               for alpha, sigma in (end, start)]
    u = torch.linspace(*log_tau, max(2, int((log_tau[1] - log_tau[0]) / 0.005)), dtype=torch.float64)[:, None]
    tau_sq = (2 * u).exp()
    b = (1 - w) * m_u / (v_u + tau_sq) + w * m_c / (v_c + tau_sq)
    integrand = tau_sq * b * (-log_g(tau_sq)).exp()  # tau * b / G, times dtau / du = tau
    scale_e = alpha_e * log_g((sigma_e / alpha_e) ** 2).exp()
    scale_s = sigma_s if alpha_s == 0 else alpha_s * log_g((sigma_s / alpha_s) ** 2).exp()
    return scale_e / scale_s, scale_e * torch.trapezoid(integrand, u[:, 0], dim=0)


def sampler_affine(scheduler, model: AnalyticModel | GuidedModel, num_inference_steps: int | None = None,
                   **set_timesteps_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gain, offset)`` per dimension of a deterministic sampler driving an affine model (the exact model of
    one diagonal Gaussian, or a :class:`GuidedModel` of two): the sample is ``gain * z + offset`` for initial
    noise ``z ~ N(0, I)``, exactly.

    Every step of a deterministic sampler is linear in its inputs and the model is affine in ``x_t``, so two
    runs, from ``z = 0`` and ``z = 1``, give both with no sampling error (in float64; to float32 rounding, about
    1e-7, with schedulers that compute in float32, as diffusers' DPM-Solver and FlowMatchEuler do). ``|gain|`` is
    the output std of each dimension (``gain`` is signed: a sampler can flip a dimension), ``offset`` its mean;
    for the exact model of a Gaussian ``|gain| / data std`` is 1 for a perfect sampler, for a
    :class:`GuidedModel` the target is :func:`guided_ode_solution`. Not for stochastic (ancestral, SDE)
    samplers."""
    if not model.affine:
        raise ValueError("sampler_affine needs Gaussian data (one component): a mixture's exact model is nonlinear.")
    if num_inference_steps is None:
        scheduler.set_timesteps(**set_timesteps_kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    x = torch.stack([torch.zeros(model.data.dim), torch.ones(model.data.dim)]).double()
    # what a pipeline does for schedulers without these (FlowMatchEuler: SD3's pipeline uses neither)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps:
        out = model(scale(x, t), t.expand(2) if t.ndim == 0 else t)
        x = scheduler.step(out, t, x).prev_sample
    return x[1] - x[0], x[0]  # per unit of z: the initial noise is z * init_noise_sigma


def sampler_gain(scheduler, model: AnalyticModel | GuidedModel, num_inference_steps: int | None = None,
                 **set_timesteps_kwargs) -> torch.Tensor:
    """The signed ``gain`` of :func:`sampler_affine`; its magnitude is each dimension's output std."""
    return sampler_affine(scheduler, model, num_inference_steps, **set_timesteps_kwargs)[0]


#: the global-mean direction of a 64x64x4 latent (N = 16384) with per-image brightness std 0.25 has variance
#: N * 0.25**2 = 1024 (std 32) in an orthonormal basis; noise has variance 1 there
BRIGHTNESS_STD = 32.0


def image_like_band_stds(num_bands: int = 8, top: float = 0.8, bottom: float = 0.15) -> torch.Tensor:
    """Band 0: :data:`BRIGHTNESS_STD`; bands 1..B-1 a power law ``top / f_k`` with geometric ``f_k`` from 1 to
    ``top / bottom`` (0.80, 0.61, 0.46, 0.35, 0.26, 0.20, 0.15 for 8 bands)."""
    rest = num_bands - 1
    freqs = [(top / bottom) ** (k / max(rest - 1, 1)) for k in range(rest)]
    return torch.tensor([BRIGHTNESS_STD, *(top / f for f in freqs)], dtype=torch.float64)


def image_like_gaussian(num_bands: int = 8, dims: int = 32, brightness_mean: float = 0.3) -> GaussianMixture:
    """A diagonal Gaussian whose spectrum resembles image latents: ``num_bands`` bands of ``dims`` dimensions,
    band 0 the global brightness (std 32, mean ``brightness_mean``), the rest zero-mean with
    :func:`image_like_band_stds`. Sampling a 64x64x4 latent well means every band's std comes out right."""
    stds = image_like_band_stds(num_bands)
    mean = torch.zeros(num_bands, dims, dtype=torch.float64)
    mean[0] = brightness_mean
    var = (stds**2)[:, None].expand(num_bands, dims)
    return GaussianMixture.gaussian(mean.reshape(-1), var.reshape(-1).clone())


def conditional_gaussian(marginal: GaussianMixture, mean_shift: float, std_ratio: float) -> GaussianMixture:
    """A Gaussian inside ``marginal`` (one component), as a condition narrows what an image can be: each
    dimension's mean moved by ``mean_shift`` of its std along a fixed direction of RMS 1 (``sqrt(2) sin(2.4 k +
    1)``, no random draw), its std times ``std_ratio``. With :class:`GuidedModel` it makes an exact guidance
    oracle: the conditional model is exact for this Gaussian, the unconditional one for ``marginal``."""
    if len(marginal.means) != 1 or not 0 < std_ratio:
        raise ValueError("conditional_gaussian needs a one-component marginal and std_ratio > 0.")
    k = torch.arange(marginal.dim, dtype=torch.float64)
    direction = 2**0.5 * torch.sin(2.4 * k + 1.0)
    std = marginal.variance.sqrt()
    return GaussianMixture.gaussian(marginal.mean + mean_shift * std * direction, marginal.variance * std_ratio**2)
