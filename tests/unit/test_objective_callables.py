"""The objectives as callables: ``objective(predict, latents, conditioning, noise, generator) -> (loss [B], times)``.

An exact ``predict`` (built from the clean latents and the noise the objective was given) has zero loss; the
times, inputs and draws are the documented ones; weights and preconditioning reach the per-sample loss.
"""

import pytest
import torch

from diffusers_ztsnr.schedule import VPSchedule, flow_mu
from diffusers_ztsnr.training.objectives import (
    FLOW_SIGMA_MIN,
    DiffusionObjective,
    FlowMatchingObjective,
    ResolutionShift,
    apply_noise_offset,
    loss_weights,
    noisy_latents,
    resolve_flow_shift,
    sample_flow_sigmas,
    sample_timesteps,
    training_target,
)

SHAPE = (6, 4, 8, 8)
COND = {"encoder_hidden_states": torch.zeros(6, 3, 5)}


def sd_schedule(ztsnr: bool) -> VPSchedule:
    return VPSchedule.from_config(1000, 0.00085, 0.012, "scaled_linear", rescale_betas_zero_snr=ztsnr)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)


def exact_vp_predict(objective: DiffusionObjective, x0: torch.Tensor, seen: dict):
    """The target the objective asks for, computed from what predict is handed (noisy input, timesteps) and the
    clean latents: the noise is read back from the input, so only consistent inputs give zero loss."""
    def predict(noisy, t, cond):
        assert cond is COND
        alpha, sigma = objective.alphas[t], objective.sigmas[t]
        noise = (noisy - alpha.view(-1, 1, 1, 1) * x0) / sigma.view(-1, 1, 1, 1)
        seen.update(noisy=noisy, t=t)
        return training_target(x0, noise, alpha, sigma, objective.prediction_type)

    return predict


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prediction_type,ztsnr", [("epsilon", False), ("v_prediction", True), ("sample", True)])
def test_an_exact_vp_model_has_zero_loss_at_the_documented_inputs(prediction_type, ztsnr, seed):
    objective = DiffusionObjective(sd_schedule(ztsnr), prediction_type, timestep_shift=2.0)
    x0, noise = batch(seed)
    seen = {}
    loss, t = objective(exact_vp_predict(objective, x0, seen), x0, COND, noise, torch.Generator().manual_seed(seed))
    assert loss.shape == (SHAPE[0],) and t.dtype == torch.long and torch.equal(seen["t"], t)
    assert float(loss.abs().max()) < 1e-18
    # the timesteps are the generator's first draw; the input is alpha_t x0 + sigma_t noise at them
    expected_t = sample_timesteps(SHAPE[0], objective.schedule, generator=torch.Generator().manual_seed(seed),
                                  timestep_shift=2.0)
    assert torch.equal(t, expected_t)
    torch.testing.assert_close(seen["noisy"], noisy_latents(x0, noise, objective.alphas[t], objective.sigmas[t]))


def test_offset_noise_is_drawn_before_the_timesteps_and_reaches_input_and_target():
    schedule = sd_schedule(False)
    objective = DiffusionObjective(schedule, "epsilon", noise_offset=0.1)
    x0, noise = batch(3)
    seen = {}
    loss, t = objective(exact_vp_predict(objective, x0, seen), x0, COND, noise, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    offset = apply_noise_offset(noise, 0.1, g)
    assert torch.equal(t, sample_timesteps(SHAPE[0], schedule, generator=g))
    torch.testing.assert_close(seen["noisy"], noisy_latents(x0, offset, objective.alphas[t], objective.sigmas[t]))
    assert float(loss.abs().max()) < 1e-18


def test_input_perturbation_changes_the_input_only():
    """An exact model of the unperturbed noise is off by exactly the perturbation (Ning et al. 2023)."""
    objective = DiffusionObjective(sd_schedule(False), "epsilon", input_perturbation=0.1)
    x0, noise = batch(4)
    seen = {}
    loss, _ = objective(exact_vp_predict(objective, x0, seen), x0, COND, noise, torch.Generator().manual_seed(4))
    # predict returned the noise read from the perturbed input; the target is the unperturbed noise
    assert 0.1**2 * 0.5 < float(loss.mean()) < 0.1**2 * 1.5


@pytest.mark.parametrize("weighting", [{"snr_gamma": 5.0}, {"debiased_estimation": True}])
def test_weights_multiply_each_samples_loss(weighting):
    objective = DiffusionObjective(sd_schedule(True), "v_prediction", **weighting)
    x0, noise = batch(5)
    loss, t = objective(lambda noisy, t, cond: torch.zeros_like(noisy), x0, COND, noise,
                        torch.Generator().manual_seed(5))
    target = training_target(x0, noise, objective.alphas[t], objective.sigmas[t], "v_prediction")
    weights = loss_weights(objective.snrs[t], "v_prediction", weighting.get("snr_gamma"),
                           weighting.get("debiased_estimation", False))
    torch.testing.assert_close(loss, target.square().flatten(1).mean(1) * weights)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("precondition", [False, True])
def test_an_exact_velocity_has_zero_flow_loss(precondition, seed):
    objective = FlowMatchingObjective("logit_normal", shift=3.0, precondition_outputs=precondition)
    x0, noise = batch(seed)
    seen = {}

    def predict(noisy, s, cond):
        seen.update(noisy=noisy, s=s)
        return noise - x0

    loss, s = objective(predict, x0, COND, noise, torch.Generator().manual_seed(seed))
    assert loss.shape == (SHAPE[0],) and float(loss.abs().max()) < 1e-24
    expected = sample_flow_sigmas(SHAPE[0], torch.Generator().manual_seed(seed), "logit_normal", shift=3.0)
    assert torch.equal(s, expected) and torch.equal(seen["s"], s)
    torch.testing.assert_close(seen["noisy"], noisy_latents(x0, noise, 1 - s, s))


def test_flow_times_respect_the_clamp_and_a_wrong_velocity_costs_its_error():
    objective = FlowMatchingObjective("none", min_time=0.2)
    x0, noise = batch(6)
    loss, s = objective(lambda noisy, s, cond: noise - x0 + 0.5, x0, COND, noise, torch.Generator().manual_seed(6))
    assert float(s.min()) >= 0.2 and float(s.max()) < 1
    torch.testing.assert_close(loss, torch.full((SHAPE[0],), 0.25, dtype=torch.float64))


def test_shift_resolution_auto_dynamic_and_static():
    sd3 = {"shift": 3.0}
    flux = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
            "base_shift": 0.5, "max_shift": 1.15}
    latents = torch.zeros(1, 16, 64, 64)  # 32 x 32 = 1024 patches of 2 x 2
    assert resolve_flow_shift("auto", sd3) == 3.0 and resolve_flow_shift(2.5, flux) == 2.5
    dynamic = resolve_flow_shift("auto", flux)
    assert isinstance(dynamic, ResolutionShift) and resolve_flow_shift("dynamic", flux) == dynamic
    objective = FlowMatchingObjective(shift=dynamic)
    assert objective.shift_and_mu(latents) == (1.0, flow_mu(1024, 256, 4096, 0.5, 1.15))
    assert FlowMatchingObjective(shift=3.0).shift_and_mu(latents) == (3.0, None)
    assert FLOW_SIGMA_MIN > 0
