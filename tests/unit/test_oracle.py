"""Every scheduler x parameterization x spacing, proved on data whose exact model is known."""

import math

import pytest
import torch

from diffusers_ztsnr import ZTSNRDDIMScheduler, ZTSNREulerAncestralScheduler, ZTSNRFlowMatchScheduler
from diffusers_ztsnr.analytic import GaussianMixture, run_sampler
from diffusers_ztsnr.parameterization import MODEL_PREDICTION_TYPES
from diffusers_ztsnr.spacing import SPACINGS
from tests.oracle_utils import (
    ALL_CLASSES,
    GAUSSIAN,
    VP_CLASSES,
    VP_ODE_CLASSES,
    deterministic_error,
    make_scheduler,
    model_for,
)

# First-order samplers have global error ~ C/n. On the fixed latents of deterministic_error (no seed), at 400 steps
# every one of ours is within 7.4% of a data std of the exact probability-flow sample (the worst: linspace; over
# random latents the max follows the most extreme |z|: 7.2-9.1% for seeds 0-5), and 400 steps leave at most 0.51x
# the error of 25 (trailing, whose last grid point t = 1000/n keeps the low-variance dimensions pre-asymptotic up
# to a few hundred steps, so 50 -> 400 steps gives only 0.68x; and the epsilon flow sampler, held near 1.5% by its
# clamp). Below 1% interpolation rounding remains, so no shrinking is asked there.
TOLERANCE_AT_400 = 0.1
SHRINK_25_TO_400 = 0.7
CONVERGENCE_STEPS = (25, 400)


def assert_converges(err_25: float, err_400: float) -> None:
    assert err_400 < TOLERANCE_AT_400, (err_25, err_400)
    assert err_400 < SHRINK_25_TO_400 * err_25 or err_400 < 0.01, (err_25, err_400)


@pytest.mark.parametrize("cls", VP_ODE_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prediction_type", MODEL_PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_vp_ode_samplers_converge_to_the_exact_flow(cls, prediction_type, spacing):
    """Deterministic check: each latent must land where the exact probability-flow ODE takes it."""
    kw = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    errs = [deterministic_error(make_scheduler(cls, prediction_type, **kw), prediction_type, n)
            for n in CONVERGENCE_STEPS]
    assert_converges(*errs)


@pytest.mark.parametrize("cls", [c for c in VP_ODE_CLASSES if c.fractional_timesteps], ids=lambda c: c.__name__)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_karras_grid_keeps_zero_snr_start_and_converges(cls, prediction_type):
    s = make_scheduler(cls, prediction_type, use_karras_sigmas=True)
    s.set_timesteps(25)
    assert float(s.timesteps[0]) == 999.0 and s._levels[0][0] == 0.0
    errs = [deterministic_error(make_scheduler(cls, prediction_type, use_karras_sigmas=True), prediction_type, n)
            for n in CONVERGENCE_STEPS]
    assert_converges(*errs)


@pytest.mark.parametrize("prediction_type", MODEL_PREDICTION_TYPES)
@pytest.mark.parametrize("solver_order", [1, 2])
@pytest.mark.parametrize("shift", [1.0, 3.0, "dynamic"])
@pytest.mark.parametrize("spacing", ["logsnr", "linspace"])
def test_flow_sampler_converges_to_the_exact_flow(prediction_type, solver_order, shift, spacing):
    kw = dict(use_dynamic_shifting=True) if shift == "dynamic" else dict(shift=shift)
    kw["timestep_spacing"] = spacing
    extra = dict(mu=0.8) if shift == "dynamic" else {}
    errs = [
        deterministic_error(make_scheduler(ZTSNRFlowMatchScheduler, prediction_type, solver_order=solver_order, **kw),
                            prediction_type, n, **extra)
        for n in CONVERGENCE_STEPS
    ]
    assert_converges(*errs)


def test_second_order_beats_first_order_at_equal_cost():
    """The point of the multistep solver: at 20 NFE it is far closer to the exact flow than DDIM."""
    from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler

    ddim = deterministic_error(make_scheduler(ZTSNRDDIMScheduler, "v_prediction"), "v_prediction", 20)
    dpm = deterministic_error(make_scheduler(ZTSNRDPMSolverMultistepScheduler, "v_prediction"), "v_prediction", 20)
    assert dpm < ddim / 3, (dpm, ddim)


MIXTURE = GaussianMixture(
    torch.tensor([[1.0, 0.5, 0, 0], [-1.0, 0, 0, 0]], dtype=torch.float64),
    torch.tensor([[0.1, 0.3, 0.5, 0.05], [0.2, 0.3, 0.2, 0.05]], dtype=torch.float64),
    torch.tensor([0.3, 0.7], dtype=torch.float64),
)
NUM_SAMPLES = 6000


def distribution_error(x: torch.Tensor, data: GaussianMixture) -> tuple[float, float]:
    std = data.variance.sqrt()
    mean_err = ((x.double().mean(0) - data.mean) / std).abs().max().item()
    std_err = (x.double().std(0) / std - 1).abs().max().item()
    return mean_err, std_err


# Monte-Carlo tolerance: 4.5 standard errors of the mean / std of a (near-)Gaussian sample of size N
# (max over 4 dimensions), plus 4% for discretization and mixture kurtosis.
MC_MEAN_TOL = 4.5 / NUM_SAMPLES**0.5 + 0.04
MC_STD_TOL = 4.5 / (2 * NUM_SAMPLES) ** 0.5 + 0.04
# The 4% holds for the ODE samplers at 100 steps (std 2-4% short; worst std error of seeds 1-6: 0.051). Ancestral
# sampling's discretization bias is about twice as large: at 100 steps its std is 4-7% short and the worst of
# seeds 1-6 sits at the tolerance (0.081), which a larger sample would not cure. At 400 steps the bias is at most
# 3% and the worst std error of 12 seeds is 0.040, half the tolerance, while noise 10% too small still fails.
MIXTURE_STEPS = {ZTSNREulerAncestralScheduler: 400}


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "flow_prediction", "sample", "epsilon"])
def test_gaussian_mixture_distribution_is_reproduced(cls, prediction_type):
    """Stochastic and deterministic samplers alike must reproduce a bimodal mixture's moments."""
    s = make_scheduler(cls, prediction_type)
    x = run_sampler(s, model_for(s, MIXTURE, prediction_type), NUM_SAMPLES, MIXTURE_STEPS.get(cls, 100), seed=1)
    mean_err, std_err = distribution_error(x, MIXTURE)
    assert mean_err < MC_MEAN_TOL and std_err < MC_STD_TOL, (mean_err, std_err)
    # bimodality: the share of samples in the right-hand mode matches the mixture weight 0.3
    share = (x[:, 0] > 0).double().mean().item()
    assert abs(share - 0.3) < 0.04, share


def marginal_cdf_distance(x: torch.Tensor, data: GaussianMixture) -> float:
    """Kolmogorov-Smirnov distance between each dimension's empirical CDF and the mixture's marginal CDF
    (the largest over dimensions): it sees the modes, their weights and their widths, not only two moments."""
    xs = x.double().sort(0).values
    z = (xs[:, None, :] - data.means) / data.variances.sqrt()
    cdf = (data.weights[:, None] * 0.5 * torch.erfc(-z / math.sqrt(2))).sum(1)
    above = torch.arange(1, len(xs) + 1, dtype=torch.float64)[:, None] / len(xs)
    return float(torch.maximum(above - cdf, cdf - (above - 1 / len(xs))).max())


# eta = 1 draws fresh noise at every step and its discretization error is about twice DDIM's: at 100 steps
# the std is 6-7% short, and over 12 seeds the worst std error (0.087) exceeded MC_STD_TOL (0.081). At 400
# steps the worst of 12 seeds is 0.047 (std), 0.038 (mean) and 0.025 (marginal CDF distance), against
# tolerances of 0.081, 0.098 and 0.045; a random sample of the mixture itself exceeds a CDF distance of
# 0.045 in one of the four dimensions with probability ~2e-10.
ETA_ONE_STEPS = 400
MARGINAL_CDF_TOL = 0.045


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ddim_eta_one_reproduces_the_mixture(seed):
    s = make_scheduler(ZTSNRDDIMScheduler, "v_prediction")
    model = model_for(s, MIXTURE, "v_prediction")

    def sample(latent: torch.Tensor, noise_seed: int) -> torch.Tensor:
        s.set_timesteps(ETA_ONE_STEPS)
        g, x = torch.Generator().manual_seed(noise_seed), latent
        for t in s.timesteps:
            x = s.step(model(x, t), t, x, eta=1.0, generator=g).prev_sample
        return x

    z = torch.randn(NUM_SAMPLES, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = sample(z, noise_seed=100 + seed)
    mean_err, std_err = distribution_error(x, MIXTURE)
    assert mean_err < MC_MEAN_TOL and std_err < MC_STD_TOL, (mean_err, std_err)
    distance = marginal_cdf_distance(x, MIXTURE)
    assert distance < MARGINAL_CDF_TOL, distance
    # eta = 1 is in effect: its step from SNR 0 is DDPM's posterior, N(alpha_next * E[x0], sigma_next**2), which
    # keeps nothing of the latent, so other latents with the same noise give the same samples (at eta < 1 the
    # latent keeps a weight sqrt(1 - eta**2) * sigma_next)
    torch.testing.assert_close(sample(z[:64], noise_seed=7), sample(-2 * z[:64], noise_seed=7), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "flow_prediction"])
def test_one_step_from_pure_noise_returns_the_data_mean(cls, prediction_type):
    """At SNR 0 the best x0 estimate is E[x0]: one exact step lands there, with no clamp."""
    s = make_scheduler(cls, prediction_type)
    x = run_sampler(s, model_for(s, MIXTURE, prediction_type), 16, 1)
    assert s._levels[0][0] == 0.0  # the step really started at SNR 0
    torch.testing.assert_close(x, MIXTURE.mean.expand(16, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", VP_CLASSES, ids=lambda c: c.__name__)
def test_epsilon_model_at_zero_snr_is_refused_with_the_fixes(cls):
    s = make_scheduler(cls, "epsilon", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="epsilon.*cannot start from SNR 0.*v_prediction.*epsilon_zero_snr_clamp"):
        s.set_timesteps(10)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_epsilon_clamp_is_explicit_warns_and_stays_finite(cls):
    kw = {"rescale_betas_zero_snr": True} if cls.path == "vp" else {}
    s = cls(prediction_type="epsilon", epsilon_zero_snr_clamp=2**-24, **kw)
    with pytest.warns(UserWarning, match="epsilon_zero_snr_clamp"):
        x = run_sampler(s, model_for(s, GAUSSIAN, "epsilon"), 64, 10)
    assert bool(torch.isfinite(x).all())


def test_ancestral_noise_is_seeded():
    s = make_scheduler(ZTSNREulerAncestralScheduler, "v_prediction")
    a = run_sampler(s, model_for(s, GAUSSIAN, "v_prediction"), 8, 10, seed=5)
    b = run_sampler(s, model_for(s, GAUSSIAN, "v_prediction"), 8, 10, seed=5)
    c = run_sampler(s, model_for(s, GAUSSIAN, "v_prediction"), 8, 10, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
