"""The effective-weight audit: each target's x0-space factor, the binned shares, and its two warnings."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.training.objectives import DiffusionObjective, FlowMatchingObjective, training_target
from diffusers_ztsnr.training.objectives.audit import audit_objective, target_factor

SD = VPSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZTSNR = SD.zero_terminal_snr()


@settings(max_examples=40, deadline=None)
@given(log_snr=st.floats(-8, 8), prediction_type=st.sampled_from(["epsilon", "v_prediction", "sample"]),
       seed=st.integers(0, 2**31 - 1))
def test_the_factor_is_the_target_error_per_unit_x0_error_at_the_same_input(log_snr, prediction_type, seed):
    g = torch.Generator().manual_seed(seed)
    x0, eps, delta = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(3))
    snr = torch.tensor(math.exp(log_snr), dtype=torch.float64)
    alpha, sigma = (snr / (1 + snr)).sqrt(), (1 / (1 + snr)).sqrt()
    x_t = alpha * x0 + sigma * eps
    wrong_x0 = x0 + delta
    wrong_eps = (x_t - alpha * wrong_x0) / sigma  # the same noisy input explained by the wrong x0
    error = training_target(wrong_x0, wrong_eps, alpha, sigma, prediction_type) - \
        training_target(x0, eps, alpha, sigma, prediction_type)
    assert float(error.pow(2).sum() / delta.pow(2).sum()) == pytest.approx(float(target_factor(prediction_type, snr)),
                                                                           rel=1e-9)


@pytest.mark.parametrize("s", [0.05, 0.3, 0.9])
def test_the_flow_velocity_factor_is_one_over_s_squared(s):
    snr = torch.tensor(((1 - s) / s) ** 2, dtype=torch.float64)
    assert float(target_factor("flow_prediction", snr)) == pytest.approx(1 / s**2, rel=1e-12)


def test_sample_shares_are_the_timestep_distribution():
    audit = audit_objective(DiffusionObjective(SD, "epsilon"))
    log_snr = SD.log_snr(torch.arange(1000, dtype=torch.float64))
    for (low, high), share in zip(audit.edges, audit.sample_share, strict=True):
        inside = ((log_snr >= low) & (log_snr < high)).double().mean()
        assert share == pytest.approx(float(inside), abs=2e-3)  # bin edges cut at most one timestep
    assert sum(audit.sample_share) == pytest.approx(1.0) and sum(audit.weight_share) == pytest.approx(1.0)


def test_min_snr_with_a_v_target_on_ztsnr_has_no_weight_at_snr_0():
    flagged = audit_objective(DiffusionObjective(ZTSNR, "v_prediction", snr_gamma=5.0))
    assert flagged.edges[0] == (-math.inf, -math.inf) and flagged.weight_share[0] == 0.0
    assert any("weight at SNR 0 is zero" in w for w in flagged.warnings)
    for fixed in (DiffusionObjective(ZTSNR, "v_prediction"),
                  DiffusionObjective(ZTSNR, "v_prediction", snr_gamma=5.0, debiased_estimation=True)):
        audit = audit_objective(fixed)
        assert audit.weight_share[0] > 0 and not any("SNR 0" in w for w in audit.warnings)


def test_an_epsilon_target_puts_its_weight_on_the_cleanest_timesteps():
    audit = audit_objective(DiffusionObjective(SD, "epsilon"))
    assert any("of the time range" in w and "cleanest end" in w for w in audit.warnings)
    assert audit.weight_share[-1] > 0.3 and audit.sample_share[-1] < 0.01
    spread = audit_objective(DiffusionObjective(ZTSNR, "sample"))  # x0 target: weight follows the samples
    assert spread.weight_share == pytest.approx(spread.sample_share, abs=1e-9) and spread.warnings == []


def test_sd3s_logit_normal_flow_is_spread_and_unflagged():
    audit = audit_objective(FlowMatchingObjective("logit_normal", shift=3.0))
    assert audit.warnings == [] and max(audit.weight_share) < 0.3
    assert audit.edges[0][0] > -math.inf  # s = 1 is never drawn


def test_preconditioned_flow_outputs_are_a_loss_on_x0():
    """``--precondition_outputs`` regresses x0 itself: the x0 weight is the time density alone."""
    audit = audit_objective(FlowMatchingObjective("logit_normal", shift=3.0, precondition_outputs=True))
    assert audit.weight_share == pytest.approx(audit.sample_share, abs=1e-9)
    plain = audit_objective(FlowMatchingObjective("logit_normal", shift=3.0))
    assert plain.weight_share != pytest.approx(plain.sample_share, abs=1e-3)
