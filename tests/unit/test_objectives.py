"""Training objective: targets, noisy inputs, timestep sampling, min-SNR / debiased weights, loss, config checks."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_ztsnr.parameterization import to_x0_eps
from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.training.objectives import (
    apply_noise_offset,
    check_objective_config,
    diffusion_loss,
    input_perturbation_noise,
    loss_weights,
    noisy_latents,
    sample_timesteps,
    training_target,
)

TARGETS = ("epsilon", "v_prediction", "sample", "flow_prediction")
GAMMA = 5.0


def sd_schedule(ztsnr: bool) -> VPSchedule:
    return VPSchedule.from_config(1000, 0.00085, 0.012, "scaled_linear", rescale_betas_zero_snr=ztsnr)


def x0_space_factor(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """c with |target error|^2 = c * |x0 error|^2 at fixed x_t (finite snr only)."""
    return {
        "epsilon": snr,
        "v_prediction": snr + 1,
        "sample": torch.ones_like(snr),
        "flow_prediction": (1 + snr.sqrt()) ** 2,
    }[prediction_type]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    alpha, sigma = sd_schedule(True).alpha_sigma(t.double())
    return x0, eps, t, alpha, sigma


# --- targets and noisy inputs ---------------------------------------------------------------------


def test_targets_are_the_textbook_formulas(batch):
    x0, eps, _, alpha, sigma = batch
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0, "flow_prediction": eps - x0}
    for name, want in expected.items():
        got = training_target(x0, eps, alpha, sigma, name)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(noisy_latents(x0, eps, alpha, sigma), a * x0 + s * eps, rtol=0, atol=1e-12)
    # the ZTSNR terminal step: pure noise in, v = -x0 (alpha = 0, sigma = 1)
    assert alpha[-1] == 0 and sigma[-1] == 1
    torch.testing.assert_close(training_target(x0, eps, alpha, sigma, "v_prediction")[-1], -x0[-1])
    torch.testing.assert_close(noisy_latents(x0, eps, alpha, sigma)[-1], eps[-1])


@pytest.mark.parametrize("prediction_type", TARGETS)
def test_exact_model_gives_x0_back(batch, prediction_type):
    x0, eps, _, alpha, sigma = batch
    if prediction_type == "epsilon":  # singular at SNR 0 by construction: check it on the other steps
        x0, eps, alpha, sigma = x0[:-1], eps[:-1], alpha[:-1], sigma[:-1]
    x_t = noisy_latents(x0, eps, alpha, sigma)
    output = training_target(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = to_x0_eps(output, x_t, alpha, sigma, prediction_type)
    # epsilon -> x0 divides by alpha (~4e-4 at t = 998): allow for that amplification of rounding
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-9)


def test_flow_path_target_roundtrip():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 5, 3, 4, 4, generator=g)
    s = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    x_s = noisy_latents(x0, eps, 1 - s, s)
    torch.testing.assert_close(x_s, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps)
    target = training_target(x0, eps, 1 - s, s, "flow_prediction")
    x0_back, _ = to_x0_eps(target, x_s, 1 - s, s, "flow_prediction")
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-6)


def test_matches_diffusers_add_noise_and_velocity():
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         rescale_betas_zero_snr=True)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 998, 999])
    alpha, sigma = sd_schedule(True).alpha_sigma(t.double())
    torch.testing.assert_close(noisy_latents(x0, eps, alpha, sigma), ddpm.add_noise(x0, eps, t), rtol=0, atol=2e-6)
    torch.testing.assert_close(training_target(x0, eps, alpha, sigma, "v_prediction"),
                               ddpm.get_velocity(x0, eps, t), rtol=0, atol=2e-6)


def test_bf16_inputs_keep_their_dtype_and_broadcast_scalars():
    x0 = torch.ones(2, 3, dtype=torch.bfloat16)
    eps = torch.full((2, 3), 2.0, dtype=torch.bfloat16)
    out = noisy_latents(x0, eps, 0.6, 0.8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.full((2, 3), 2.2), rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        noisy_latents(x0, eps, torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="allowed: epsilon, sample, v_prediction, flow_prediction"):
        training_target(x0, eps, 0.6, 0.8, "score")


# --- loss weights ---------------------------------------------------------------------------------

SNRS = torch.tensor([0.0, 1.0, GAMMA, 100.0, math.inf], dtype=torch.float64)
MIN_SNR_EXPECTED = {  # hand-computed, gamma = 5, at SNR = 0, 1, gamma, 100, inf
    "epsilon": [1.0, 1.0, 1.0, 5 / 100, 0.0],
    "v_prediction": [0.0, 1 / 2, 5 / 6, 5 / 101, 0.0],
    "sample": [0.0, 1.0, 5.0, 5.0, 5.0],
    "flow_prediction": [0.0, 1 / 4, 5 / (1 + math.sqrt(5)) ** 2, 5 / 121, 0.0],
}


@pytest.mark.parametrize("prediction_type", TARGETS)
def test_min_snr_weights_at_known_snrs(prediction_type):
    w = loss_weights(SNRS, prediction_type, snr_gamma=GAMMA)
    torch.testing.assert_close(w, torch.tensor(MIN_SNR_EXPECTED[prediction_type], dtype=torch.float64))
    assert torch.equal(loss_weights(SNRS, prediction_type), torch.ones_like(SNRS))  # no option: plain MSE


def test_min_snr_finite_on_ztsnr_schedule_where_diffusers_formula_is_nan():
    snr = sd_schedule(True).snr(torch.arange(1000.0))
    assert snr[-1] == 0 and bool((snr[:-1] > 0).all())
    g = GAMMA
    diffusers_x0 = torch.stack([snr, g * torch.ones_like(snr)], 1).min(1)[0]  # diffusers' example scripts
    diffusers_eps = diffusers_x0 / snr
    assert torch.isnan(diffusers_eps[-1]) and bool(torch.isfinite(diffusers_eps[:-1]).all())
    for name in TARGETS:
        w = loss_weights(snr, name, snr_gamma=g)
        assert bool(torch.isfinite(w).all()) and bool((w >= 0).all()), name
    w_eps = loss_weights(snr, "epsilon", snr_gamma=g)
    torch.testing.assert_close(w_eps[:-1], diffusers_eps[:-1], rtol=1e-12, atol=0)
    assert w_eps[-1] == 1.0  # the limit of min(1, gamma / SNR) as SNR -> 0
    torch.testing.assert_close(loss_weights(snr, "v_prediction", snr_gamma=g), diffusers_x0 / (snr + 1))


@pytest.mark.parametrize("debiased", [False, True])
def test_targets_agree_in_x0_space(debiased):
    snr = sd_schedule(True).snr(torch.arange(1000.0))
    if debiased:  # the debiased weight is evaluated on the clamped SNR: agreement holds there
        snr = snr[(snr >= 1e-3) & (snr <= 1e3)]
    else:
        snr = snr[snr > 0]
    lam = {n: loss_weights(snr, n, snr_gamma=GAMMA, debiased=debiased) * x0_space_factor(snr, n) for n in TARGETS}
    for name in TARGETS:
        torch.testing.assert_close(lam[name], lam["sample"], rtol=1e-12, atol=0)
    want = snr.clamp(max=GAMMA) / (snr.sqrt() if debiased else 1)
    torch.testing.assert_close(lam["sample"], want, rtol=1e-12, atol=0)


def test_debiased_weights_hand_computed_and_finite_at_snr_zero():
    snr = torch.tensor([0.0, 1e-3, 1.0, 100.0, 1e3, math.inf], dtype=torch.float64)
    r = math.sqrt(1000)
    torch.testing.assert_close(loss_weights(snr, "epsilon", debiased=True),
                               torch.tensor([r, r, 1.0, 0.1, 1 / r, 1 / r], dtype=torch.float64))
    torch.testing.assert_close(loss_weights(snr, "sample", debiased=True),
                               torch.tensor([1 / r, 1 / r, 1.0, 10.0, r, r], dtype=torch.float64))
    # v: sqrt(SNR) / (SNR + 1) = alpha * sigma, held at the clamp boundaries
    v = [(1 / r) / 1.001, (1 / r) / 1.001, 0.5, 10 / 101, r / 1001, r / 1001]
    torch.testing.assert_close(loss_weights(snr, "v_prediction", debiased=True), torch.tensor(v, dtype=torch.float64))
    # with min-SNR as well, the two multiply (sd-scripts applies both to the epsilon loss)
    torch.testing.assert_close(loss_weights(snr, "epsilon", snr_gamma=GAMMA, debiased=True),
                               torch.tensor([r, r, 1.0, 0.05 / 10, 5e-3 / r, 5e-3 / r], dtype=torch.float64))


def test_debiased_equals_sd_scripts_where_it_is_finite_and_is_finite_where_it_is_not():
    t = torch.arange(1000.0)
    for ztsnr in (False, True):
        snr = sd_schedule(ztsnr).snr(t)
        kohya = 1 / torch.sqrt(torch.minimum(snr, torch.ones_like(snr) * 1000))  # apply_debiased_estimation
        ours = loss_weights(snr, "epsilon", debiased=True)
        assert bool(torch.isfinite(ours).all()) and float(ours.max()) <= math.sqrt(1000) * (1 + 1e-12)
        keep = snr >= 1e-3
        torch.testing.assert_close(ours[keep], kohya[keep], rtol=1e-12, atol=0)
        if not ztsnr:
            assert bool(keep.all())  # SD's own schedule never reaches the lower clamp
        else:
            assert torch.isinf(kohya[-1])
    snr = sd_schedule(True).snr(t)
    floor = float(snr[snr > 0].min())
    w = loss_weights(snr, "epsilon", debiased=True, debiased_snr_range=(floor, 1e3))
    assert w[-1] == w[-2] == pytest.approx(1 / math.sqrt(floor))


@settings(max_examples=300, deadline=None)
@given(
    snr=st.one_of(st.floats(0, math.inf, allow_nan=False), st.sampled_from([0.0, math.inf, 5e-324, 1e308])),
    gamma=st.one_of(st.none(), st.floats(1e-3, 1e3)),
    debiased=st.booleans(),
    prediction_type=st.sampled_from(TARGETS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_weights_finite_and_nonnegative_for_any_snr(snr, gamma, debiased, prediction_type, dtype):
    w = loss_weights(torch.tensor([snr], dtype=dtype), prediction_type, snr_gamma=gamma, debiased=debiased)
    assert w.dtype == dtype
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all()), (snr, gamma, debiased, prediction_type, w)


def test_loss_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="no NaN"):
        loss_weights(torch.tensor([1.0, math.nan]), "epsilon", snr_gamma=5.0)
    with pytest.raises(ValueError, match="no NaN"):
        loss_weights(torch.tensor([-1.0]), "epsilon", snr_gamma=5.0)
    with pytest.raises(ValueError, match="snr_gamma"):
        loss_weights(torch.tensor([1.0]), "epsilon", snr_gamma=-1.0)
    with pytest.raises(ValueError, match="allowed"):
        loss_weights(torch.tensor([1.0]), "eps", snr_gamma=5.0)
    with pytest.raises(ValueError, match="debiased_snr_range"):
        loss_weights(torch.tensor([1.0]), "epsilon", debiased=True, debiased_snr_range=(0.0, 1e3))
    assert torch.equal(loss_weights(torch.tensor([0.0, 2.0]), "epsilon", snr_gamma=0), torch.ones(2))  # 0 = off


# --- timestep sampling ----------------------------------------------------------------------------


def test_uniform_timesteps_cover_the_range_with_a_flat_histogram():
    T, n = 1000, 200_000
    t = sample_timesteps(n, sd_schedule(True), generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (n,)
    assert int(t.min()) == 0 and int(t.max()) == T - 1
    counts = torch.bincount(t, minlength=T).double()
    expected = n / T
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # Pearson's statistic of a flat histogram ~ chi-square with T-1 = 999 dof: mean 999, sd sqrt(2*999) ~ 44.7;
    # +-6 sd rejects a biased sampler (e.g. round(u*(T-1)) halves both end bins: chi2 ~ +100) only together with
    # the end-bin check below, and rejects a too-regular one (chi2 ~ 0).
    dof = T - 1
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof), chi2
    # the end bins are full bins: ~ expected +- 4 sd of a Poisson count (sd ~ 14), not expected / 2
    assert abs(counts[0] - expected) < 4 * math.sqrt(expected) and abs(counts[-1] - expected) < 4 * math.sqrt(expected)


def test_shift_increases_the_mean_timestep_as_predicted():
    T, n, k = 1000, 100_000, 3.0
    sched = sd_schedule(True)
    base = sample_timesteps(n, sched, generator=torch.Generator().manual_seed(1)).double()
    shifted = sample_timesteps(n, sched, generator=torch.Generator().manual_seed(1), timestep_shift=k).double()
    assert bool((shifted >= base).all())  # same u, monotone shift: every draw moves to a noisier (or equal) step
    # E[u'] = int_0^1 k u / (1 + (k-1) u) du = k/(k-1) * (1 - ln(k)/(k-1)); E[floor(T u')] ~ T E[u'] - 1/2
    mean_u = k / (k - 1) * (1 - math.log(k) / (k - 1))
    se = float(shifted.std()) / math.sqrt(n)  # ~0.85
    assert abs(float(shifted.mean()) - (T * mean_u - 0.5)) < 6 * se
    assert abs(float(base.mean()) - (T - 1) / 2) < 6 * float(base.std()) / math.sqrt(n)
    # density k / (k - (k-1) u')^2: P(u' >= 0.9) = 1 - 0.9 / (k - (k-1) 0.9) = 0.25 (0.1 unshifted)
    frac_noisy = float((shifted >= 900).double().mean())
    assert abs(frac_noisy - 0.25) < 6 * math.sqrt(0.25 * 0.75 / n)
    cleaner = sample_timesteps(n, sched, generator=torch.Generator().manual_seed(1), timestep_shift=1 / k).double()
    assert float(cleaner.mean()) < float(base.mean()) - 100


def test_logit_normal_is_centred_and_in_range():
    t = sample_timesteps(50_000, sd_schedule(False), generator=torch.Generator().manual_seed(2), scheme="logit_normal")
    assert 0 <= int(t.min()) and int(t.max()) <= 999
    assert abs(float(t.double().mean()) - 499.5) < 5  # symmetric around u = 1/2
    assert float(((t >= 250) & (t < 750)).double().mean()) > 0.6  # 0.5 for uniform; ~0.68 for logit-normal(0, 1)


def test_timestep_sampling_is_reproducible_and_validates():
    sched = sd_schedule(True)
    a = sample_timesteps(8, sched, generator=torch.Generator().manual_seed(3), timestep_shift=2.0)
    b = sample_timesteps(8, sched, generator=torch.Generator().manual_seed(3), timestep_shift=2.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="allowed: uniform, logit_normal"):
        sample_timesteps(8, sched, scheme="cosine")
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="timestep_shift must be a finite number > 0"):
            sample_timesteps(8, sched, timestep_shift=bad)


# --- noise offset and input perturbation ----------------------------------------------------------


def test_noise_offset_adds_a_per_channel_constant():
    B, C, H, W, offset = 4096, 4, 16, 16, 0.1
    noise = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(4))
    out = apply_noise_offset(noise, offset, torch.Generator().manual_seed(5))
    expected = noise + offset * torch.randn(B, C, 1, 1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    delta = out - noise
    assert float(delta.std(dim=(2, 3)).max()) < 1e-6  # constant over H, W
    # the per-channel mean of N(0, 1) noise has variance 1/(HW); the offset adds offset^2 to it
    var_before = float(noise.mean(dim=(2, 3)).var())
    var_after = float(out.mean(dim=(2, 3)).var())
    want = 1 / (H * W) + offset**2
    rel_se = math.sqrt(2 / (B * C))  # relative standard error of a sample variance of B*C normals, ~1.1%
    assert abs(var_before * H * W - 1) < 5 * rel_se
    assert abs(var_after / want - 1) < 5 * rel_se
    assert apply_noise_offset(noise, 0.0) is noise
    with pytest.raises(ValueError, match="noise_offset must be >= 0"):
        apply_noise_offset(noise, -0.1)


def test_input_perturbation():
    noise = torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    out = input_perturbation_noise(noise, 0.1, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(7)))
    assert abs(float((out - noise).var()) / 0.01 - 1) < 0.05  # per-element, not per-channel: variance gamma^2
    assert input_perturbation_noise(noise, 0.0) is noise


# --- configuration checks ---------------------------------------------------------------------------


def test_check_objective_config():
    with pytest.raises(ValueError, match=r"SNR 0.*cannot learn anything.*v_prediction.*ε→v conversion"):
        check_objective_config("epsilon", True, 0.0, 0.0, None)
    with pytest.raises(ValueError, match="allowed: epsilon, sample, v_prediction, flow_prediction"):
        check_objective_config("x0", False, 0.0, 0.0, None)
    for kwargs, name in (({"noise_offset": -0.1}, "noise_offset"), ({"input_perturbation": -1}, "input_perturbation"),
                         ({"snr_gamma": -5.0}, "snr_gamma")):
        with pytest.raises(ValueError, match=f"{name} must be >= 0"):
            check_objective_config("v_prediction", False, **kwargs)
    with pytest.warns(UserWarning, match=r"noise_offset=0.1 with zero_terminal_snr.*contradicts ZTSNR"):
        check_objective_config("v_prediction", True, 0.1, 0.0, 5.0)
    with pytest.warns(UserWarning, match=r"input_perturbation=0.1 with zero_terminal_snr.*contradicts ZTSNR"):
        check_objective_config("v_prediction", True, 0.0, 0.1, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_objective_config("epsilon", False, 0.1, 0.1, 5.0)  # offset noise without ZTSNR: fine
        check_objective_config("v_prediction", True, 0.0, 0.0, 5.0)
        check_objective_config("sample", True, None, None, None)


# --- the loss -------------------------------------------------------------------------------------


def test_diffusion_loss_hand_computed():
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.zeros(2, 2)
    # per-sample MSE: (1 + 4)/2 = 2.5, (9 + 16)/2 = 12.5; weighted by (2, 0.5): 5, 6.25
    assert float(diffusion_loss(out, target)) == 7.5
    assert float(diffusion_loss(out, target, torch.tensor([2.0, 0.5]))) == 5.625
    assert float(diffusion_loss(out, target, torch.tensor([2.0, 0.5], dtype=torch.float64), reduction="sum")) == 11.25
    assert torch.equal(diffusion_loss(out, target, reduction="none"), torch.tensor([2.5, 12.5]))
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 3, 4, 5, 5, generator=g)
    torch.testing.assert_close(diffusion_loss(a, b), torch.nn.functional.mse_loss(a, b))
    with pytest.raises(ValueError, match="allowed: mean, sum, none"):
        diffusion_loss(out, target, reduction="max")
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        diffusion_loss(out, target, torch.ones(3))


def test_diffusion_loss_is_float32_for_half_inputs():
    # errors of 2^-7 on values ~1: squared (2^-14) and averaged in float32, exactly
    target = torch.ones(2, 4096, dtype=torch.bfloat16)
    out = (target.float() + 2.0**-7).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        loss = diffusion_loss(out.to(dtype), target.to(dtype), torch.tensor([1.0, 3.0], dtype=torch.float64))
        assert loss.dtype == torch.float32
        assert float(loss) == 2.0**-14 * 2  # mean over batch of (1, 3) * 2^-14


# --- flow matching ----------------------------------------------------------------------------------------

from diffusers_ztsnr.schedule import flow_mu  # noqa: E402
from diffusers_ztsnr.training.objectives import (  # noqa: E402
    FLOW_SIGMA_MIN,
    flow_loss_weights,
    flow_matching_loss,
    sample_flow_sigmas,
)


def test_flow_loss_weights_at_known_points():
    s = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(flow_loss_weights(s, "sigma_sqrt"), torch.tensor([16.0, 4.0, 1.0], dtype=torch.float64))
    # cosmap 2 / (pi (1 - 2s + 2s^2)): 2/pi at the ends, 4/pi in the middle
    torch.testing.assert_close(flow_loss_weights(torch.tensor([0.0, 0.5, 1.0]), "cosmap"),
                               torch.tensor([2 / math.pi, 4 / math.pi, 2 / math.pi], dtype=torch.float64))
    for scheme in ("none", "logit_normal", "mode"):
        assert bool((flow_loss_weights(s, scheme) == 1).all())
    with pytest.raises(ValueError, match="infinite at s = 0"):
        flow_loss_weights(torch.tensor([0.0]), "sigma_sqrt")
    with pytest.raises(ValueError, match="unknown weighting_scheme 'uniform'; allowed: logit_normal"):
        flow_loss_weights(s, "uniform")


def test_flow_time_densities_match_their_formulas():
    n = 200_000
    g = torch.Generator().manual_seed(0)
    # logit-normal: logit(s) ~ N(mean, std)
    s = sample_flow_sigmas(n, g, "logit_normal", logit_mean=0.7, logit_std=0.5)
    logit = torch.log(s / (1 - s))
    assert abs(float(logit.mean()) - 0.7) < 0.01 and abs(float(logit.std()) - 0.5) < 0.01
    # uniform: mean 1/2 (clamped at FLOW_SIGMA_MIN only)
    u = sample_flow_sigmas(n, g, "none")
    assert abs(float(u.mean()) - 0.5) < 0.005 and float(u.min()) >= FLOW_SIGMA_MIN
    # mode with scale 0 is 1 - u: uniform again; with scale 1.29 it favours the middle
    assert abs(float(sample_flow_sigmas(n, g, "mode", mode_scale=0.0).mean()) - 0.5) < 0.005
    mode = sample_flow_sigmas(n, g, "mode", mode_scale=1.29)
    middle = float(((mode > 0.25) & (mode < 0.75)).double().mean())
    assert middle > 0.6  # uniform puts 0.5 there
    # the static shift maps the median 1/2 to k/(k+1); Flux's mu maps it to e^mu/(e^mu+1)
    shifted = sample_flow_sigmas(n, g, "none", shift=3.0)
    assert abs(float(shifted.median()) - 0.75) < 0.005
    dynamic = sample_flow_sigmas(n, g, "none", mu=math.log(3.0))
    assert abs(float(dynamic.median()) - 0.75) < 0.005
    assert flow_mu(256) == pytest.approx(0.5) and flow_mu(4096) == pytest.approx(1.15)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(scheme=st.sampled_from(["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"]),
       shift=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1))
def test_flow_times_stay_in_range_and_weights_finite(scheme, shift, seed):
    s = sample_flow_sigmas(64, torch.Generator().manual_seed(seed), scheme, shift=shift)
    assert s.dtype == torch.float64 and bool(((s >= FLOW_SIGMA_MIN) & (s <= 1)).all())
    assert bool(torch.isfinite(flow_loss_weights(s, scheme)).all())


@pytest.mark.parametrize("bad,message", [
    (dict(weighting_scheme="mode", mode_scale=2.0), "mode_scale must lie in"),
    (dict(weighting_scheme="logit_normal", logit_std=-1.0), "logit_std > 0"),
    (dict(shift=0.0), "shift must be a finite number > 0"),
    (dict(mu=math.inf), "mu must be finite"),
])
def test_flow_time_sampling_rejects_bad_parameters(bad, message):
    with pytest.raises(ValueError, match=message):
        sample_flow_sigmas(4, **bad)


@pytest.mark.parametrize("prediction_type", TARGETS)
def test_flow_matching_loss_is_zero_for_the_exact_output_in_any_parameterization(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    s = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    x_s = noisy_latents(x0, noise, 1 - s, s)
    exact = training_target(x0, noise, 1 - s, s, prediction_type)
    for precondition in (False, True):
        assert float(flow_matching_loss(exact, prediction_type, x_s, x0, noise, 1 - s, s,
                                        precondition_outputs=precondition)) < 1e-10
    # and a wrong output costs exactly its velocity error (flow model: no conversion)
    wrong = training_target(x0, noise, 1 - s, s, "flow_prediction") + 0.1
    assert float(flow_matching_loss(wrong, "flow_prediction", x_s, x0, noise, 1 - s, s)) == pytest.approx(0.01)


def test_flow_matching_loss_refuses_an_epsilon_model_at_pure_noise():
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="cannot train an? epsilon model on this flow objective"):
        flow_matching_loss(x, "epsilon", x, x, x, torch.tensor([0.0], dtype=torch.float64),
                           torch.tensor([1.0], dtype=torch.float64))
