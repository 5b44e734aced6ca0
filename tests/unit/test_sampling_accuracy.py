"""Sampling accuracy of the defaults on the image-like Gaussian, measured exactly (no sampling noise).

Every deterministic sampler is linear in its initial noise when it drives the exact model of a Gaussian, so the
std each band comes out with is a number, not an estimate (:func:`diffusers_ztsnr.analytic.sampler_gain`): these
bounds hold on every machine. Targets: every band's |log(std ratio)| within 0.15 / 0.05 / 0.03 at 10 / 20 / 30
model evaluations on the flow path, with SD3's config and with Flux's at 1024 px (``mu`` from the image size);
on the VP path the default last step to clean data (extrapolated to zero noise) no longer shrinks fine detail
to a posterior mean, and UniPC's defaults hold every band within 0.05 / 0.01 / 0.005 at 10 / 20 / 30.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_ztsnr import (
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNRFlowMatchScheduler,
    ZTSNRUniPCMultistepScheduler,
    unipc_rules,
)
from diffusers_ztsnr.analytic import (
    AnalyticModel,
    GaussianMixture,
    flow_levels,
    image_like_band_stds,
    image_like_gaussian,
    sampler_gain,
    vp_levels,
)
from diffusers_ztsnr.schedule import flow_mu
from diffusers_ztsnr.testing.released_schedulers import released_scheduler_config

DATA = image_like_gaussian(num_bands=8, dims=1)
STDS = image_like_band_stds(8)
MODEL = AnalyticModel(DATA, flow_levels(), "flow_prediction")
TARGETS = {10: 0.15, 20: 0.05, 30: 0.03}
FLUX_MU_1024 = flow_mu((1024 // 16) ** 2)


def config(name: str) -> dict:
    return released_scheduler_config(name.removesuffix(".json"))


def worst_log_gain(scheduler, nfe: int, **kwargs) -> float:
    return float((sampler_gain(scheduler, MODEL, nfe, **kwargs) / STDS).log().abs().max())


def flux_pipeline_sigmas(nfe: int) -> np.ndarray:
    return np.linspace(1.0, 1 / nfe, nfe)  # what FluxPipeline passes


@pytest.mark.parametrize("nfe", TARGETS)
def test_default_grid_meets_the_targets_with_sd3s_config(nfe):
    scheduler = ZTSNRFlowMatchScheduler.from_config(config("sd3.json"))
    assert worst_log_gain(scheduler, nfe) <= TARGETS[nfe]


@pytest.mark.parametrize("nfe", TARGETS)
def test_our_grid_meets_the_targets_under_fluxs_pipeline_sigmas_when_chosen(nfe):
    ours = ZTSNRFlowMatchScheduler.from_config(config("flux.json"), use_pipeline_sigmas=False)
    ours.set_timesteps(sigmas=flux_pipeline_sigmas(nfe), mu=FLUX_MU_1024)
    assert len(ours.timesteps) == nfe and float(ours.sigmas[0]) == 1.0
    gain = sampler_gain(ours, MODEL, None, sigmas=flux_pipeline_sigmas(nfe), mu=FLUX_MU_1024)
    assert float((gain / STDS).log().abs().max()) <= TARGETS[nfe]


def test_pipeline_sigmas_are_honoured_by_default():
    """The drop-in rule: a grid the pipeline passes is sampled as given (and that grid is far less accurate)."""
    ours = ZTSNRFlowMatchScheduler.from_config(config("flux.json"), solver_order=1)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(config("flux.json"))
    for s in (ours, theirs):
        s.set_timesteps(sigmas=flux_pipeline_sigmas(20), mu=FLUX_MU_1024)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas.float(), atol=1e-6, rtol=0)
    given = worst_log_gain(ZTSNRFlowMatchScheduler.from_config(config("flux.json")), None,
                           sigmas=flux_pipeline_sigmas(20), mu=FLUX_MU_1024)
    assert given > 3 * TARGETS[20]


@pytest.mark.parametrize("nfe", [10, 20, 30])
def test_default_grid_beats_diffusers_flowmatch_euler_at_every_shift(nfe):
    for shift in (1.0, 2.0, 3.0):
        ours = worst_log_gain(ZTSNRFlowMatchScheduler(shift=shift), nfe)
        theirs = worst_log_gain(FlowMatchEulerDiscreteScheduler(shift=shift), nfe)
        assert ours < theirs / 4, (shift, ours, theirs)


def test_logsnr_grid_starts_at_pure_noise_and_lands_near_it():
    scheduler = ZTSNRFlowMatchScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    s = scheduler.sigmas.double()
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s.diff() < 0).all())
    assert s[1] / (1 - s[1]) > 1000  # sigma/alpha of the first landing: the brightness direction survives
    half_logsnr = ((1 - s[1:-1]) / s[1:-1]).log()
    torch.testing.assert_close(half_logsnr.diff(), half_logsnr.diff()[:1].expand(8), rtol=1e-4, atol=0)


def test_bad_grid_settings_are_clear_errors():
    with pytest.raises(ValueError, match="timestep_spacing"):
        ZTSNRFlowMatchScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="use_pipeline_sigmas"):
        ZTSNRFlowMatchScheduler(use_pipeline_sigmas="no")


def vp_log_gains(nfe: int, **kwargs) -> torch.Tensor:
    scheduler = ZTSNRDPMSolverMultistepScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, **kwargs)
    model = AnalyticModel(DATA, vp_levels(scheduler.schedule.alphas_cumprod), "v_prediction")
    return (sampler_gain(scheduler, model, nfe) / STDS).log()


def test_vp_default_last_step_keeps_fine_detail_and_the_error_keeps_falling():
    """SD's smallest noise level is sigma/alpha = 0.029: a last step returning the x0 prediction there keeps only
    s / sqrt(s^2 + 0.029^2) of a band of std s (0.982 for the finest band, 0.15), at any step count. The default
    last step extrapolates the last two x0 predictions to zero noise: the error falls with the step count."""
    first_order = {n: vp_log_gains(n, final_step="first_order") for n in (30, 50, 100)}
    default = {n: vp_log_gains(n) for n in (30, 50, 100)}
    for n in (50, 100):
        assert float(first_order[n][-1]) < -0.015  # the floor of the first-order last step
    assert float(default[30].abs().max()) < 0.012  # measured 0.95%
    assert float(default[50].abs().max()) < 0.005  # measured 0.34%
    assert float(default[100].abs().max()) < 0.0035  # measured 0.22%
    trapezoid = vp_log_gains(50, final_step="trapezoid")
    assert float(trapezoid.abs().max()) < 0.005


def test_vp_last_steps_on_detail_finer_than_the_last_noise_level():
    """A band of std 0.005 (below sigma/alpha = 0.029) is not resolved by any step that sees the model only down to
    0.029: the first-order step shrinks it, the trapezoid step leaves noise of about 0.029 / 2 in it (far too
    wide), and the extrapolated step stays between the first-order one and the data."""
    fine = AnalyticModel(GaussianMixture.gaussian(torch.zeros(1), torch.full((1,), 0.005**2)), None, "v_prediction")
    gains = {}
    for final_step in ("first_order", "trapezoid", "extrapolate"):
        scheduler = ZTSNRDPMSolverMultistepScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                     final_step=final_step)
        fine.levels = vp_levels(scheduler.schedule.alphas_cumprod)
        gains[final_step] = float(sampler_gain(scheduler, fine, 30)[0]) / 0.005
    assert gains["trapezoid"] > 2.0, gains
    assert gains["first_order"] < gains["extrapolate"] < 1.0, gains


@settings(max_examples=200, deadline=None)
@given(s=st.floats(1e-3, 50.0), tau=st.floats(1e-3, 2.0), ratio=st.floats(1.05, 20.0))
def test_extrapolated_final_step_lies_between_the_x0_prediction_and_the_exact_end(s, tau, ratio):
    """On a zero-mean Gaussian band of std ``s``, the exact x0 prediction along the exact ODE is ``s / sqrt(1 +
    (tau / s)^2)`` (unit noise): convex and decreasing in ``tau^2``, so the line through two of its points meets
    ``tau = 0`` between the nearer point's value and ``s``, the ODE's end."""
    from diffusers_ztsnr.solvers import extrapolated_final_update

    def level_and_x0(t: float) -> tuple[tuple[float, float], float]:
        alpha = 1 / (1 + t * t) ** 0.5
        return (alpha, alpha * t), s / (1 + (t / s) ** 2) ** 0.5

    (level, x0), (previous, previous_x0) = level_and_x0(tau), level_and_x0(tau * ratio)
    u = extrapolated_final_update(level, (1.0, 0.0), previous)
    out = u.x0 * x0 + u.previous_x0 * previous_x0
    assert u.x == 0 and u.x0 + u.previous_x0 == pytest.approx(1.0, abs=1e-12)
    assert x0 * (1 - 1e-9) <= out <= s * (1 + 1e-9)


def test_trapezoid_final_step_matches_the_exact_ode_on_one_band():
    from diffusers_ztsnr.solvers import trapezoid_final_update

    s, tau = 0.15, 0.029
    alpha = 1 / (1 + tau**2) ** 0.5
    level = (alpha, alpha * tau)
    x = alpha * (s**2 + tau**2) ** 0.5  # a unit-noise sample on the exact marginal: z = 1, data mean 0
    x0 = s**2 / (s**2 + tau**2) * x / alpha  # the exact posterior mean
    u = trapezoid_final_update(level, (1.0, 0.0))
    out = u.x * x + u.x0 * x0
    r = tau / s
    assert out / s == pytest.approx((1 + r * r / 2) / (1 + r * r) ** 0.5, rel=1e-12)
    assert abs(out / s - 1) < 3e-4 and abs(x0 / s - 1) > 0.015  # the exact ODE ends at exactly s


def test_a_vp_multistep_config_with_flow_sigmas_is_read_as_a_flow():
    """Sana ships DPM-Solver++ with ``use_flow_sigmas=True``: its ``flow_shift`` is the flow scheduler's ``shift``,
    its beta keys describe nothing a flow grid uses; a VP scheduler refuses it, naming the flow one."""
    import warnings

    from diffusers import DPMSolverMultistepScheduler

    sana = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, flow_shift=3.0,
                                       prediction_type="flow_prediction", use_flow_sigmas=True,
                                       timestep_spacing="trailing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = ZTSNRFlowMatchScheduler.from_config(sana.config)
    assert ours.config.shift == 3.0 and ours.config.prediction_type == "flow_prediction"
    assert worst_log_gain(ours, 10) <= TARGETS[10]
    with pytest.raises(ValueError, match="use_flow_sigmas=True.*ZTSNRFlowMatchScheduler"):
        ZTSNRDPMSolverMultistepScheduler.from_config(sana.config)


VP_TARGETS = {10: 0.05, 20: 0.01, 30: 0.005}


def unipc_log_gains(nfe: int, **kwargs) -> torch.Tensor:
    scheduler = ZTSNRUniPCMultistepScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, **kwargs)
    model = AnalyticModel(DATA, vp_levels(scheduler.schedule.alphas_cumprod), "v_prediction")
    return (sampler_gain(scheduler, model, nfe) / STDS).log()


@pytest.mark.parametrize("nfe", VP_TARGETS)
def test_vp_unipc_default_meets_the_targets_and_beats_the_dpm_default(nfe):
    """UniPC's defaults (third order on log-SNR steps up to 0.7, the warped log-SNR grid, the extrapolated last
    step): every band within 5% / 1% / 0.5% at 10 / 20 / 30 evaluations (measured 2.2% / 0.67% / 0.10%), where
    DPM-Solver++(2M) on the log-SNR grid leaves 8.7% / 2.1% / 0.95%."""
    ours = float(unipc_log_gains(nfe).abs().max())
    assert ours <= VP_TARGETS[nfe]
    assert ours < 0.7 * float(vp_log_gains(nfe).abs().max())


def test_vp_unipc_pieces_each_matter(monkeypatch):
    """Each default is needed at some step count: second order leaves 1.24% at 20 evaluations, the plain log-SNR
    grid 6.5% at 10; third order on every step (no cap) leaves 24% at 10."""
    assert float(unipc_log_gains(20, solver_order=2).abs().max()) > 0.011 > float(unipc_log_gains(20).abs().max())
    assert float(unipc_log_gains(10, timestep_spacing="logsnr").abs().max()) > 0.055 > 2 * float(
        unipc_log_gains(10).abs().max())
    monkeypatch.setattr(unipc_rules, "MAX_THIRD_ORDER_STEP", math.inf)
    assert float(unipc_log_gains(10).abs().max()) > 0.1
