"""A scheduler step as planned fused passes: exact sums, the fewest passes, plans reused, half-precision latents."""

import pickle

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler, ZTSNRFlowMatchScheduler, ZTSNRUniPCMultistepScheduler
from diffusers_ztsnr.analytic import AnalyticModel, flow_levels, image_like_gaussian, vp_levels
from diffusers_ztsnr.combination import Combination, plan_combination
from diffusers_ztsnr.schedulers.base import ZTSNRSchedulerOutput

COEFFICIENT = st.one_of(st.just(0.0), st.just(1.0), st.floats(-3, 3, allow_nan=False))


def passes(plan: Combination) -> int:
    """Full-tensor passes of a plan: the start (unless a tensor is taken as it is) and one per added term."""
    return len(plan.adds) + (len(plan.start) != 1)


@settings(max_examples=200, deadline=None)
@given(coefficients=st.lists(COEFFICIENT, min_size=1, max_size=4), pair_to_one=st.booleans())
def test_a_plan_computes_the_sum_with_one_pass_per_term_beyond_a_unit_or_affine_start(coefficients, pair_to_one):
    if pair_to_one and len(coefficients) >= 2:
        coefficients[1] = 1.0 - coefficients[0]  # an affine pair, as every flow-path update has
    g = torch.Generator().manual_seed(len(coefficients))
    tensors = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in coefficients]
    originals = [t.clone() for t in tensors]
    plan = plan_combination(coefficients)
    expected = sum(c * t for c, t in zip(coefficients, tensors, strict=True))
    torch.testing.assert_close(plan(tensors), expected, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(t, o) for t, o in zip(tensors, originals, strict=True))  # inputs are never written
    nonzero = [c for c in coefficients if c != 0]
    if not nonzero:
        assert plan.start == () and torch.equal(plan(tensors), torch.zeros(3, 5, dtype=torch.float64))
        return
    unit_or_affine = 1.0 in nonzero or any(
        abs(a + b - 1) <= 1e-12 for i, a in enumerate(nonzero) for b in nonzero[i + 1:])
    assert passes(plan) == max(0, len(nonzero) - 1) if unit_or_affine else passes(plan) == len(nonzero)


@pytest.mark.parametrize("order, most_passes", [(1, 2), (2, 3)])
def test_flow_steps_take_as_few_passes_as_flow_match_euler_plus_the_second_order_term(order, most_passes):
    """FlowMatchEuler's step is two passes (``dt * v``, then the sum). Ours returns the x0 estimate too: order 1 is
    two passes (x0, and the sample), order 2 one more for the previous x0."""
    s = ZTSNRFlowMatchScheduler(shift=3.0, solver_order=order)
    s.set_timesteps(28)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps:
        x = s.step(-x, t, x).prev_sample
    plans = list(s._plans.values())
    assert len(plans) == 28
    assert max(passes(p.x0) + passes(p.sample) for p in plans) == most_passes
    assert all(p.in_latent_dtype for p in plans)


def test_plans_outlive_the_grid_but_not_the_config():
    def sample(scheduler) -> torch.Tensor:
        scheduler.set_timesteps(12)
        x = torch.ones(2, 3)
        for t in scheduler.timesteps:
            x = scheduler.step(0.3 * x, t, x).prev_sample
        return x

    s = ZTSNRFlowMatchScheduler(shift=3.0)
    first, plans = sample(s), dict(s._plans)
    assert torch.equal(sample(s), first)
    assert s._plans.keys() == plans.keys() and all(s._plans[k] is plans[k] for k in plans)  # nothing planned again
    s.register_to_config(solver_order=1)  # a new config: the old one's plans must not be reused
    order_1 = sample(s)
    assert not torch.equal(order_1, first)
    assert torch.equal(order_1, sample(ZTSNRFlowMatchScheduler(shift=3.0, solver_order=1)))


def flow_sample(scheduler, steps: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Sample the exact flow model of an image-like Gaussian, the model answering in the latent dtype as a
    half-precision transformer does."""
    data = image_like_gaussian()
    model = AnalyticModel(data, flow_levels(), "flow_prediction")
    scheduler.set_timesteps(steps)
    x = torch.randn(256, data.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x.double(), t.expand(len(x))).to(dtype), t, x).prev_sample
        assert x.dtype == dtype
    return x.double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", [1, 2])
def test_half_precision_rounding_error_is_that_of_flow_match_euler(dtype, order):
    """Each sampler's half-precision run against its own float64 run (so only rounding differs), relative RMS over
    3 seeds. Measured in float16 (combined in the latent dtype): order 2 1.1-1.7x FlowMatchEuler's error, order 1
    0.9-1.1x, about 1e-3; in bfloat16 (computed in float32): 0.9-1.2x, about 1e-2. The bound leaves room for other
    CPUs' vector units."""
    def error(make) -> float:
        worst = 0.0
        for seed in range(3):
            exact, rounded = flow_sample(make(), 28, seed, torch.float64), flow_sample(make(), 28, seed, dtype)
            worst = max(worst, float((rounded - exact).pow(2).mean().sqrt() / exact.std()))
        return worst

    ours = error(lambda: ZTSNRFlowMatchScheduler(shift=3.0, solver_order=order))
    euler = error(lambda: FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert ours <= 2.5 * euler, (ours, euler)
    assert ours <= 8 * torch.finfo(dtype).eps  # about one rounding of the latent per step, summed over 28 steps


def test_amplifying_steps_are_upcast_and_keep_float32_precision():
    """An epsilon model's x0 is ``(x - sigma eps) / alpha``: its coefficient ``1 / alpha`` would amplify a
    half-precision pass's rounding, so those steps run in float32; v-prediction steps stay in the latent dtype."""
    eps = ZTSNRDPMSolverMultistepScheduler(prediction_type="epsilon")
    eps.set_timesteps(10)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    for t in eps.timesteps:
        x = eps.step(0.5 * x, t, x).prev_sample
    assert not all(p.in_latent_dtype for p in eps._plans.values())
    v = ZTSNRDPMSolverMultistepScheduler(prediction_type="v_prediction", final_step="first_order")
    v.set_timesteps(10)
    for t in v.timesteps:
        x = v.step(0.5 * x, t, x).prev_sample
    assert all(p.in_latent_dtype for p in v._plans.values()) and x.dtype == torch.float16


def test_step_output_is_a_diffusers_output():
    x, x0 = torch.ones(2), torch.zeros(2)
    out = ZTSNRSchedulerOutput(prev_sample=x, pred_original_sample=x0)
    assert list(out.keys()) == ["prev_sample", "pred_original_sample"] and out[1] is x0 and out.to_tuple() == (x, x0)
    assert list(ZTSNRSchedulerOutput(prev_sample=x).keys()) == ["prev_sample"]
    assert torch.equal(pickle.loads(pickle.dumps(out)).pred_original_sample, x0)


def test_an_img2img_start_does_not_carry_into_the_next_run():
    """Pipelines call ``set_begin_index`` after ``set_timesteps`` for img2img only; as in diffusers, the next
    ``set_timesteps`` forgets it, so a text-to-image run on the same scheduler starts at its first timestep."""
    s = ZTSNRUniPCMultistepScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    s.set_timesteps(20)
    s.set_begin_index(10)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps[10:]:
        x = s.step(0.1 * x, t, x).prev_sample
    s.set_timesteps(8)
    assert s.begin_index is None
    for t in s.timesteps:
        x = s.step(0.1 * x, t, x).prev_sample
    assert s.step_index == 8


def test_a_config_attribute_written_after_sampling_is_honoured():
    """diffusers' FrozenDict takes ``scheduler.config.key = value`` (its items keep the old value); the stock
    schedulers read the attribute on the next run, and so do the plans here."""
    def sample(scheduler) -> torch.Tensor:
        scheduler.set_timesteps(10)
        x = torch.ones(1, 4) * torch.linspace(-1, 1, 4)
        for t in scheduler.timesteps:
            x = scheduler.step(0.3 * x + 0.1, t, x).prev_sample
        return x

    kw = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    s = ZTSNRUniPCMultistepScheduler(**kw)
    sample(s)
    s.config.prediction_type = "sample"
    assert torch.equal(sample(s), sample(ZTSNRUniPCMultistepScheduler(**{**kw, "prediction_type": "sample"})))


@pytest.mark.parametrize("cls", [ZTSNRDPMSolverMultistepScheduler, ZTSNRUniPCMultistepScheduler],
                         ids=lambda c: c.__name__)
def test_the_extrapolated_last_step_does_not_amplify_model_error_on_fine_grids(cls):
    """The last step pairs the last x0 prediction with an earlier one at least twice its (sigma/alpha)**2 (weight at
    most 2). With the previous point of a 1000-step grid the weight would be about 100, and an error of 1e-3 in each
    model evaluation would come out about 5 times larger than with the first-order last step (measured)."""
    data = image_like_gaussian(8, 1)
    model = AnalyticModel(data, vp_levels(cls(rescale_betas_zero_snr=True).schedule.alphas_cumprod), "v_prediction")
    g = torch.Generator().manual_seed(0)
    errors = torch.randn(1000, data.dim, generator=g, dtype=torch.float64) * 1e-3

    def effect(final_step: str) -> float:
        s = cls(prediction_type="v_prediction", rescale_betas_zero_snr=True, final_step=final_step)
        z = torch.randn(1, data.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        outs = []
        for noisy in (False, True):
            s.set_timesteps(1000)
            x = z.clone()
            for k, t in enumerate(s.timesteps):
                out = model(x, t.expand(1)) + (errors[k] if noisy else 0)
                x = s.step(out, t, x).prev_sample
            outs.append(x)
        return float((outs[1] - outs[0]).abs().max())

    assert effect("extrapolate") < 2 * effect("first_order")
