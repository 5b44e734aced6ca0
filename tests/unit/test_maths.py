"""Schedule, spacing and conversion maths: exact values, diffusers parity, and hypothesis properties."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_ztsnr import schedule as schedule_module
from diffusers_ztsnr.parameterization import (
    MODEL_PREDICTION_TYPES,
    PARAMETERIZATIONS,
    SingularParameterizationError,
    convert,
    from_x0_eps,
    to_x0_eps,
)
from diffusers_ztsnr.schedule import (
    VPSchedule,
    betas_for_schedule,
    dynamic_shift_flow_sigmas,
    flow_mu,
    flow_sigma_from_rectified_flow_time,
    flow_to_vp,
    flow_velocity_from_rectified_flow_velocity,
    shift_flow_sigmas,
    vp_to_flow,
)
from diffusers_ztsnr.spacing import SPACINGS, discrete_timesteps, logsnr_grid

BETA_CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
]


@pytest.mark.parametrize("cfg", BETA_CONFIGS)
@pytest.mark.parametrize("zsnr", [False, True])
def test_alphas_cumprod_match_diffusers(cfg, zsnr):
    ours = VPSchedule.from_config(1000, rescale_betas_zero_snr=zsnr, **cfg)
    theirs = DDIMScheduler(rescale_betas_zero_snr=zsnr, **cfg).alphas_cumprod.double()
    torch.testing.assert_close(ours.alphas_cumprod, theirs, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg", BETA_CONFIGS)
def test_ztsnr_rescale_is_exact_at_both_ends(cfg):
    base = VPSchedule.from_config(1000, **cfg)
    z = base.zero_terminal_snr()
    assert z.alphas_cumprod[-1].item() == 0.0
    assert z.is_zero_terminal_snr and not base.is_zero_terminal_snr
    assert math.isclose(z.alphas_cumprod[0].item(), base.alphas_cumprod[0].item(), rel_tol=1e-12)
    assert z.snr(999).item() == 0.0 and z.log_snr(999).item() == -math.inf
    # sqrt(alphabar) is an affine map of the original (Lin et al. 2023, Algorithm 1)
    a, b = base.alpha(torch.arange(1000.0)), z.alpha(torch.arange(1000.0))
    slope = (b[0] - b[1]) / (a[0] - a[1])
    torch.testing.assert_close(b, slope * (a - a[-1]), atol=1e-12, rtol=1e-10)


def test_sd_schedule_known_values():
    s = VPSchedule.from_config(1000, 0.00085, 0.012, "scaled_linear")
    assert math.isclose(s.alphas_cumprod[0].item(), 1 - 0.00085, rel_tol=1e-12)
    # SD's terminal SNR, the flaw ZTSNR fixes: alphabar_T ~= 0.0047 (Lin et al. 2023, Table 1: sqrt = 0.068)
    assert math.isclose(s.alpha(999).item(), 0.068, abs_tol=5e-4)


def test_bad_schedule_config_errors():
    with pytest.raises(ValueError, match="beta_schedule='cosine'.*allowed: linear, scaled_linear"):
        betas_for_schedule(1000, beta_schedule="cosine")
    with pytest.raises(ValueError, match="trained_betas has 3 values but num_train_timesteps=1000"):
        betas_for_schedule(1000, trained_betas=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        VPSchedule.from_config(1000).alpha(1000.0)


@settings(max_examples=60, deadline=None)
@given(
    t=st.floats(0, 999),
    zsnr=st.booleans(),
    cfg=st.sampled_from(BETA_CONFIGS),
)
def test_fractional_timesteps_interpolate_monotonically_and_invert(t, zsnr, cfg):
    s = VPSchedule.from_config(1000, rescale_betas_zero_snr=zsnr, **cfg)
    lo, hi = math.floor(t), min(math.floor(t) + 1, 999)
    a = s.alpha(t).item()
    assert s.alpha(hi).item() - 1e-15 <= a <= s.alpha(lo).item() + 1e-15
    alpha, sigma = s.alpha_sigma(t)
    assert math.isclose(alpha.item() ** 2 + sigma.item() ** 2, 1.0, rel_tol=1e-12)
    if s.alpha(lo) > s.alpha(hi):  # invertible where alpha strictly decreases
        assert math.isclose(s.timestep_from_alpha(alpha).item(), t, abs_tol=1e-6)


@pytest.mark.parametrize("cfg", BETA_CONFIGS)
def test_snr_strictly_decreasing(cfg):
    for zsnr in (False, True):
        snr = VPSchedule.from_config(1000, rescale_betas_zero_snr=zsnr, **cfg).snr(torch.arange(1000.0))
        assert bool((snr[1:] < snr[:-1]).all())


# --- spacings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 20, 25, 50, 333, 999])
def test_anchor_spacings_match_diffusers(spacing, n):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(n)
    ours = discrete_timesteps(VPSchedule.from_config(1000), n, spacing, 1 if spacing == "leading" else 0)
    assert ours.tolist() == ref.timesteps.tolist()


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 1000), spacing=st.sampled_from(SPACINGS), zsnr=st.booleans())
def test_every_spacing_gives_n_distinct_decreasing_timesteps(n, spacing, zsnr):
    s = VPSchedule.from_config(1000, rescale_betas_zero_snr=zsnr)
    offset = 1 if spacing == "leading" and n < 1000 else 0
    grid = discrete_timesteps(s, n, spacing, offset)
    assert len(grid) == n
    assert bool((grid[1:] < grid[:-1]).all())
    assert 0 <= int(grid[-1]) and int(grid[0]) <= 999
    if spacing in ("trailing", "logsnr", "flow") or (spacing == "linspace" and n > 1):
        assert int(grid[0]) == 999  # starts at the zero-SNR timestep of a ZTSNR schedule
    if spacing in ("logsnr", "flow", "linspace") and n > 1:
        assert int(grid[-1]) == 0  # ends at the lowest noise the model was trained on


@settings(max_examples=80, deadline=None)
@given(n=st.integers(3, 1000), zsnr=st.booleans(), cfg=st.sampled_from(BETA_CONFIGS))
def test_logsnr_grid_is_uniform_in_log_snr_from_t_minus_2_to_0_after_the_first_timestep(n, zsnr, cfg):
    """spacing.logsnr_grid: ``T-1`` (SNR 0 on a ZTSNR schedule), then ``n-1`` points with equal log-SNR
    increments from ``log_snr(T-2)`` to ``log_snr(0)``; the integer grid the schedulers use is its rounding
    wherever rounding keeps the entries distinct."""
    s = VPSchedule.from_config(1000, rescale_betas_zero_snr=zsnr, **cfg)
    grid = logsnr_grid(s, n)
    assert len(grid) == n and grid[0].item() == 999.0 and grid[-1].item() == 0.0
    if zsnr:
        assert s.log_snr(grid[0]).item() == -math.inf  # the first point is the SNR-0 timestep
    hi, lo = s.log_snr(998.0).item(), s.log_snr(0.0).item()
    lam = s.log_snr(grid[1:])
    assert math.isclose(lam[0].item(), hi, rel_tol=0, abs_tol=1e-9)
    assert math.isclose(lam[-1].item(), lo, rel_tol=0, abs_tol=1e-9)
    torch.testing.assert_close(lam.diff(), torch.full((n - 2,), (lo - hi) / (n - 2), dtype=torch.float64),
                               atol=1e-9, rtol=0)
    rounded = grid.round().long()
    if len(set(rounded.tolist())) == n:
        assert discrete_timesteps(s, n, "logsnr").tolist() == rounded.tolist()


@pytest.mark.parametrize("zsnr", [False, True])
def test_logsnr_grid_with_one_or_two_steps_keeps_the_first_timestep_and_ends_at_0(zsnr):
    s = VPSchedule.from_config(1000, rescale_betas_zero_snr=zsnr)
    assert logsnr_grid(s, 1).tolist() == [999.0]
    assert logsnr_grid(s, 2).tolist() == [999.0, 0.0]


def test_our_spacings_end_at_low_noise_where_trailing_does_not():
    s = VPSchedule.from_config(1000, rescale_betas_zero_snr=True)
    for n in (4, 10):
        assert discrete_timesteps(s, n, "trailing")[-1] == 1000 // n - 1
        assert discrete_timesteps(s, n, "logsnr")[-1] == 0
        assert discrete_timesteps(s, n, "flow")[-1] == 0


def test_spacing_errors():
    s = VPSchedule.from_config(1000)
    with pytest.raises(ValueError, match="timestep_spacing='uniform' is not supported; allowed: linspace"):
        discrete_timesteps(s, 10, "uniform")
    for n in (0, 1001):
        with pytest.raises(ValueError, match=r"num_inference_steps=.* must lie in \[1, num_train_timesteps=1000\]"):
            discrete_timesteps(s, n, "trailing")
    with pytest.raises(ValueError, match="use timestep_spacing='trailing'"):
        discrete_timesteps(s, 1000, "leading", steps_offset=1)


# --- flow path ------------------------------------------------------------------------------------


def test_flow_shift_formulas_at_known_points():
    s = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_flow_sigmas(s, 3.0), torch.tensor([0.0, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(dynamic_shift_flow_sigmas(s, math.log(3.0)), torch.tensor([0.0, 0.75, 1.0],
                                                                                           dtype=torch.float64))
    assert flow_mu(256) == pytest.approx(0.5) and flow_mu(4096) == pytest.approx(1.15)
    assert flow_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


@settings(max_examples=50, deadline=None)
@given(s=st.floats(1e-6, 1 - 1e-6))
def test_vp_flow_mapping_preserves_snr_and_round_trips(s):
    alpha, sigma, scale = flow_to_vp(torch.tensor(s, dtype=torch.float64))
    assert math.isclose((alpha / sigma).item(), (1 - s) / s, rel_tol=1e-10)
    s_back, inv_scale = vp_to_flow(alpha, sigma)
    assert math.isclose(s_back.item(), s, rel_tol=1e-10)
    assert math.isclose((scale * inv_scale).item(), 1.0, rel_tol=1e-10)


def test_rectified_flow_convention_helpers():
    """Rectified-flow time runs the other way (t = 0 noise, t = 1 data, velocity x1 - eps)."""
    assert flow_sigma_from_rectified_flow_time(0.0).item() == 1.0  # t = 0 is noise there, s = 1 here
    assert flow_sigma_from_rectified_flow_time(1.0).item() == 0.0
    x1, eps = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(flow_velocity_from_rectified_flow_velocity(x1 - eps), eps - x1)


@pytest.mark.parametrize(
    "old, new, argument",
    [
        ("flow_sigma_from_seed_time", flow_sigma_from_rectified_flow_time, torch.tensor([0.0, 0.25, 1.0])),
        ("flow_velocity_from_seed_velocity", flow_velocity_from_rectified_flow_velocity, torch.randn(4)),
    ],
)
def test_deprecated_flow_convention_names_warn_and_agree(old, new, argument):
    """The former names still work for one release, warn naming the new function, and give its result."""
    alias = getattr(schedule_module, old)
    with pytest.warns(FutureWarning, match=new.__name__):
        result = alias(argument)
    torch.testing.assert_close(result, new(argument))
    assert alias.__name__ == old and new.__name__ in alias.__doc__


# --- one conversion function -----------------------------------------------------------------------

level = st.tuples(st.floats(1e-3, 1.0), st.floats(1e-3, 1.0))


@settings(max_examples=100, deadline=None)
@given(lv=level, source=st.sampled_from(PARAMETERIZATIONS), target=st.sampled_from(PARAMETERIZATIONS),
       seed=st.integers(0, 2**16))
def test_conversions_round_trip_and_agree_with_definitions(lv, source, target, seed):
    alpha, sigma = lv
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 5, generator=g, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    definitions = {
        "epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "flow_prediction": eps - x0,
        "score": -eps / sigma,
    }
    out = convert(definitions[source], x_t, alpha, sigma, source, target)
    torch.testing.assert_close(out, definitions[target], atol=1e-9, rtol=1e-7)
    back = convert(out, x_t, alpha, sigma, target, source)
    torch.testing.assert_close(back, definitions[source], atol=1e-9, rtol=1e-7)


def test_singular_cases_raise_clear_errors():
    x = torch.randn(4)
    with pytest.raises(
        SingularParameterizationError, match="epsilon prediction carries no information about x0 at SNR = 0"
    ):
        to_x0_eps(x, x, 0.0, 1.0, "epsilon")
    with pytest.raises(SingularParameterizationError, match="score"):
        to_x0_eps(x, x, 0.0, 1.0, "score")
    with pytest.raises(SingularParameterizationError, match="sigma = 0"):
        to_x0_eps(x, x, 1.0, 0.0, "sample")
    with pytest.raises(SingularParameterizationError, match="undefined at sigma = 0"):
        from_x0_eps(x, x, 1.0, 0.0, "score")
    with pytest.raises(ValueError, match="unknown parameterization 'eps'; allowed: epsilon, sample"):
        convert(x, x, 0.5, 0.5, "eps", "sample")


@pytest.mark.parametrize("p", ["v_prediction", "flow_prediction", "sample"])
def test_zero_snr_is_exact_for_informative_parameterizations(p):
    x0, eps = torch.randn(2, 8, dtype=torch.float64)
    out = from_x0_eps(x0, eps, 0.0, 1.0, p)
    got_x0, got_eps = to_x0_eps(out, eps, 0.0, 1.0, p)  # at SNR 0, x_t = eps
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", MODEL_PREDICTION_TYPES)
def test_low_precision_conversion_is_finite_near_the_ends(dtype, p):
    x = torch.randn(1000).to(dtype) * 3
    for alpha in (1e-4, 0.5, 1.0):
        sigma = math.sqrt(1 - alpha**2) or 1e-4
        x0, eps = to_x0_eps(x, x, alpha, sigma, p)
        assert x0.dtype == dtype and bool(torch.isfinite(x0.float()).all()) and bool(torch.isfinite(eps.float()).all())


def test_per_sample_levels_broadcast():
    x0, eps = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    alpha = torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    v = from_x0_eps(x0, eps, alpha, sigma, "v_prediction")
    torch.testing.assert_close(to_x0_eps(v, x_t, alpha, sigma, "v_prediction")[0], x0)
    assert np.isfinite(v.numpy()).all()
