"""Numerics matrix: no NaN/Inf anywhere in the scheduler x parameterization x grid x dtype space.

Every case builds one scheduler from a drawn point of the matrix

* class: DDIM (``eta`` 0 / 0.5 / 1 in ``step``), Euler, ancestral Euler (``eta`` config), DPM-Solver++ (order 1
  and 2, midpoint / heun), FlowMatch (order 1 and 2; static shift, dynamic shift with ``mu``, both
  ``time_shift_type`` values, ``shift_terminal``);
* ``prediction_type``: every entry of ``MODEL_PREDICTION_TYPES``; epsilon with and without
  ``epsilon_zero_snr_clamp``;
* VP schedule: ``beta_schedule`` linear / scaled_linear / squaredcos_cap_v2, ``rescale_betas_zero_snr`` on/off,
  ``set_alpha_to_one`` / ``final_sigmas_type``;
* grid: every ``timestep_spacing`` of ``SPACINGS`` (``steps_offset`` 0/1 with ``leading``), Karras sigmas, custom
  ``timesteps=`` (integer, or fractional where the class takes them) and custom ``sigmas=`` (VP ``sigma/alpha``
  with or without the ``inf`` zero-SNR start and a final 0; flow times with or without ``s = 1``);
* ``num_inference_steps`` 1..1000 (plus a few invalid counts), latents and model output in float32 / float16 /
  bfloat16,

and samples it with the exact analytic oracle (a two-component Gaussian mixture, computed in float64 and cast
to the latent dtype) on a ``[2, 2, 2, 2]`` latent. Every case must either run with every ``prev_sample`` and
``pred_original_sample`` finite and of the latent dtype, or raise the documented error, which the test predicts
from the case *before* running it (epsilon at SNR 0: the message names ``v_prediction`` and
``epsilon_zero_snr_clamp``; a bad step count: ``num_inference_steps``; ``leading`` + ``steps_offset`` past
``T-1``: both keys). An unexpected error, a missing one, or a different one fails; so does the clamp's warning
where the case does not start at SNR 0 with epsilon, or its absence where it does.

Coverage (hypothesis, ``derandomize=True``, ``database=None``: the same examples every run, nothing written).
``OUTCOMES`` counts the outcomes of the last run, in memory only; the CI test asserts each kind occurred.

* CI subset, ``test_numerics_matrix``: ``CI_EXAMPLES`` = 250 cases: 190 sampled to the end (32,634 sampler steps),
  45 refused for an invalid step count, 15 refused for epsilon at SNR 0; ~23 s on the 2-core CI CPU (the whole
  file ~35 s).
* ``pytest -m slow tests/campaigns/test_numerics_matrix.py``: ``SLOW_EXAMPLES`` = 5000 cases: 4129 sampled to
  the end (818,605 sampler steps), 621 refused for an invalid step count, 244 for epsilon at SNR 0, 6 for
  ``leading`` past ``T-1``; ~9.5 min.

The matrix found six bugs, each fixed where it lived and pinned by a regression test at the end of this file.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_ztsnr import (
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
)
from diffusers_ztsnr.analytic import AnalyticModel, GaussianMixture, flow_levels, vp_levels
from diffusers_ztsnr.parameterization import MODEL_PREDICTION_TYPES
from diffusers_ztsnr.schedule import BETA_SCHEDULES, VPSchedule
from diffusers_ztsnr.spacing import SPACINGS

CI_EXAMPLES = 250
SLOW_EXAMPLES = 5000
T = 1000
SHAPE = (2, 2, 2, 2)  # batch 2, 8 values per sample: 1000 steps stay well under a second
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CLASSES = (
    ZTSNRDDIMScheduler,
    ZTSNREulerScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNRFlowMatchScheduler,
)
# bimodal, one mode off-centre: the posterior mean is non-linear in x_t, and E[x0] != 0
DATA = GaussianMixture(
    torch.tensor([[1.0, 0.5, 0, 0, 0.2, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0, 0, -0.3]], dtype=torch.float64),
    torch.tensor([[0.1, 0.3, 0.5, 0.05, 1.0, 0.2, 0.1, 0.05], [0.2, 0.3, 0.2, 0.05, 0.5, 0.4, 0.1, 0.02]],
                 dtype=torch.float64),
    torch.tensor([0.3, 0.7], dtype=torch.float64),
)

EPSILON_AT_SNR0 = "epsilon.*cannot start from SNR 0.*says nothing.*v_prediction.*epsilon_zero_snr_clamp"
BAD_STEP_COUNT = r"num_inference_steps=-?\d+ must lie in \[1, "
LEADING_PAST_END = r"timestep_spacing='leading' with steps_offset=1 .*num_inference_steps=1000"

#: outcomes of the cases of the last matrix run, kept in memory only
OUTCOMES: Counter = Counter()


# -- the matrix ------------------------------------------------------------------------------------


@st.composite
def step_counts(draw) -> int:
    """Mostly valid counts (small ones oversampled, they are where grids degenerate), rarely invalid ones."""
    if draw(st.integers(0, 24)) == 0:
        return draw(st.sampled_from([0, -1, T + 1]))
    return draw(st.one_of(st.integers(1, 12), st.integers(1, T), st.sampled_from([1, 2, 3, T - 1, T])))


@st.composite
def cases(draw) -> dict:
    cls = draw(st.sampled_from(CLASSES))
    prediction_type = draw(st.sampled_from(MODEL_PREDICTION_TYPES))
    case = dict(
        cls=cls, dtype=draw(st.sampled_from(DTYPES)), n=draw(step_counts()), seed=draw(st.integers(0, 2**16)),
        kwargs=dict(prediction_type=prediction_type), step_kwargs={}, set_kwargs={},
    )
    kw = case["kwargs"]
    if prediction_type == "epsilon":
        kw["epsilon_zero_snr_clamp"] = draw(st.sampled_from([None, None, 2**-24, 1e-3]))
    if cls.path == "vp":
        kw["beta_schedule"] = draw(st.sampled_from(BETA_SCHEDULES))
        if kw["beta_schedule"] == "linear":  # diffusers' DDPM defaults; the class defaults are SD's
            kw.update(beta_start=0.0001, beta_end=0.02)
        kw["rescale_betas_zero_snr"] = draw(st.booleans())
        kw["timestep_spacing"] = draw(st.sampled_from(SPACINGS))
        kw["steps_offset"] = int(kw["timestep_spacing"] == "leading" and draw(st.booleans()))
        if cls is ZTSNRDDIMScheduler:
            kw["set_alpha_to_one"] = draw(st.booleans())
            case["step_kwargs"]["eta"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
        else:
            kw["final_sigmas_type"] = draw(st.sampled_from(["zero", "sigma_min"]))
        if cls is ZTSNREulerAncestralScheduler:
            kw["eta"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
        if cls is ZTSNRDPMSolverMultistepScheduler:
            kw["solver_order"] = draw(st.sampled_from([1, 2]))
            kw["solver_type"] = draw(st.sampled_from(["midpoint", "heun"]))
        grids = ["spacing", "timesteps"] + (["karras", "sigmas"] if cls.fractional_timesteps else [])
        case["grid"] = draw(st.sampled_from(grids))
        kw["use_karras_sigmas"] = case["grid"] == "karras" or None
        if case["grid"] in ("timesteps", "sigmas"):
            case["custom"] = dict(start_at_snr0=draw(st.booleans()), fractional=draw(st.booleans()),
                                  final_zero=draw(st.booleans()), float32=draw(st.booleans()))
    else:
        kw["solver_order"] = draw(st.sampled_from([1, 2]))
        if draw(st.booleans()):
            kw["use_dynamic_shifting"] = True
            kw["time_shift_type"] = draw(st.sampled_from(["exponential", "linear"]))
            low = 0.2 if kw["time_shift_type"] == "linear" else -1.0  # a linear shift factor must be > 0
            case["set_kwargs"]["mu"] = draw(st.floats(low, 3.0))
        else:
            kw["shift"] = draw(st.sampled_from([1.0, 3.0, 0.5]) | st.floats(0.2, 8.0))
        if draw(st.integers(0, 4)) == 0:
            kw["shift_terminal"] = draw(st.floats(0.01, 0.5))
        case["grid"] = draw(st.sampled_from(["spacing", "timesteps", "sigmas"]))
        if case["grid"] != "spacing":
            case["custom"] = dict(start_at_snr0=draw(st.booleans()), fractional=True, final_zero=False,
                                  float32=draw(st.booleans()))
    kw = {k: v for k, v in kw.items() if v is not None}
    case["kwargs"] = kw
    return case


def custom_grid(case: dict, schedule: VPSchedule | None) -> dict:
    """``timesteps=`` or ``sigmas=`` for ``set_timesteps``: ``n`` random distinct points, decreasing."""
    n, custom = min(max(case["n"], 1), T), case["custom"]
    g = torch.Generator().manual_seed(case["seed"])
    if case["cls"].path == "flow":
        # flow times in (0, 1]: s = 1 first if asked, then distinct values from a 1/T grid
        pool = torch.randperm(T - 1, generator=g)[: n - 1 if custom["start_at_snr0"] else n] + 1
        s = pool.double().sort(descending=True).values / T
        if custom["start_at_snr0"]:
            s = torch.cat([torch.ones(1, dtype=torch.float64), s])
        if custom["float32"]:  # what a diffusers scheduler's float32 .sigmas holds
            s = s.float().double()
        return dict(sigmas=s.tolist()) if case["grid"] == "sigmas" else dict(timesteps=(s * T).tolist())
    # VP: timesteps in [0, T-1], T-1 (SNR 0 on a ZTSNR schedule) first if asked
    pool = torch.randperm(T - 1, generator=g)[: n - 1 if custom["start_at_snr0"] else n]
    t = pool.double().sort(descending=True).values
    if custom["fractional"] and case["cls"].fractional_timesteps:
        t = t + torch.rand(len(t), generator=g, dtype=torch.float64) * 0.999  # stays distinct, below T-1
    if custom["start_at_snr0"]:
        t = torch.cat([torch.tensor([T - 1.0], dtype=torch.float64), t])
    if case["grid"] == "timesteps":
        return dict(timesteps=t.tolist() if custom["fractional"] and case["cls"].fractional_timesteps
                    else [int(v) for v in t])
    alpha, sigma = schedule.alpha_sigma(t)
    ve = torch.where(alpha > 0, sigma / alpha.clamp(min=1e-300), torch.full_like(alpha, math.inf))
    if custom["float32"]:  # diffusers' sigmas are float32: the ends may lie an ulp outside the float64 table
        ve = ve.float().double()
    ve = ve.tolist() + ([0.0] if custom["final_zero"] else [])
    return dict(sigmas=ve)


def expected_error(case: dict, first_alpha: float | None) -> str | None:
    """The documented error this case must raise (a regex), or ``None`` if it must sample."""
    kw = case["kwargs"]
    if invalid_step_count(case):
        return BAD_STEP_COUNT
    if leading_past_end(case):
        return LEADING_PAST_END
    if kw["prediction_type"] == "epsilon" and kw.get("epsilon_zero_snr_clamp") is None and first_alpha == 0:
        return EPSILON_AT_SNR0
    return None


def invalid_step_count(case: dict) -> bool:
    return case["grid"] in ("spacing", "karras") and not 1 <= case["n"] <= T


def leading_past_end(case: dict) -> bool:
    """diffusers' ``leading`` grid with ``steps_offset=1`` reaches ``T`` at ``T`` steps."""
    kw = case["kwargs"]
    return case["grid"] == "spacing" and kw.get("timestep_spacing") == "leading" and kw["steps_offset"] == 1 \
        and case["n"] == T


def first_grid_alpha(case: dict, schedule: VPSchedule | None, grid_kwargs: dict) -> float:
    """``alpha`` at the first grid point, derived from the documented grids, not from the scheduler."""
    n, kw = case["n"], case["kwargs"]
    if case["cls"].path == "flow":
        if case["grid"] == "spacing":
            return 0.0  # diffusers' grid starts at s = 1; every shift keeps s = 1 at 1
        first = grid_kwargs["sigmas"][0] if "sigmas" in grid_kwargs else grid_kwargs["timesteps"][0] / T
        return 1.0 - first if first < 1 else 0.0
    if case["grid"] == "sigmas":
        ve = grid_kwargs["sigmas"][0]
        return 0.0 if math.isinf(ve) else 1 / math.sqrt(1 + ve * ve)
    if case["grid"] == "timesteps":
        t0 = grid_kwargs["timesteps"][0]
    elif case["grid"] == "karras":
        t0 = T - 1
    else:
        spacing = kw["timestep_spacing"]
        if spacing == "linspace":
            t0 = T - 1 if n > 1 else 0  # np.linspace(0, T-1, 1) is [0]
        elif spacing == "leading":
            t0 = (n - 1) * (T // n) + kw["steps_offset"]
        else:  # trailing, logsnr, flow: T-1 by definition
            t0 = T - 1
    return float(schedule.alpha(float(t0)))


def build(case: dict):
    """The scheduler, its oracle model and the set_timesteps kwargs of ``case``."""
    scheduler = case["cls"](**case["kwargs"])
    if scheduler.path == "vp":
        schedule = scheduler.schedule
        model = AnalyticModel(DATA, vp_levels(schedule.alphas_cumprod), case["kwargs"]["prediction_type"])
    else:
        schedule = None
        model = AnalyticModel(DATA, flow_levels(T), case["kwargs"]["prediction_type"])
    if case["grid"] in ("timesteps", "sigmas"):
        grid_kwargs = custom_grid(case, schedule)
    else:
        grid_kwargs = dict(num_inference_steps=case["n"])
    return scheduler, schedule, model, {**grid_kwargs, **case["set_kwargs"]}


def sample_checked(scheduler, model: AnalyticModel, dtype: torch.dtype, seed: int, step_kwargs: dict) -> torch.Tensor:
    """Sample from pure noise; every step's outputs must be finite and of the latent dtype."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(SHAPE, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma).to(dtype)
    for i, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), t.expand(SHAPE[0]))
        assert out.dtype == dtype
        result = scheduler.step(out, t, x, generator=g, **step_kwargs)
        for name in ("prev_sample", "pred_original_sample"):
            value = getattr(result, name)
            assert value.dtype == dtype, (i, name, value.dtype)
            assert bool(torch.isfinite(value).all()), f"step {i} of {len(scheduler.timesteps)} (t={float(t)}): " \
                f"{name} is not finite: {value.flatten().tolist()}"
        x = result.prev_sample
    return x


def check_case(case: dict) -> None:
    scheduler, schedule, model, set_kwargs = build(case)
    refused_early = invalid_step_count(case) or leading_past_end(case)  # no grid to look at
    first_alpha = None if refused_early else first_grid_alpha(case, schedule, set_kwargs)
    expected = expected_error(case, first_alpha)
    if expected is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # leading + ZTSNR warns by design
            with pytest.raises(ValueError, match=expected):
                scheduler.set_timesteps(**set_kwargs)
        OUTCOMES[f"refused: {expected[:30]}"] += 1
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler.set_timesteps(**set_kwargs)
    clamp_warned = any("epsilon_zero_snr_clamp" in str(w.message) for w in caught)
    assert clamp_warned == (case["kwargs"]["prediction_type"] == "epsilon" and first_alpha == 0), caught
    assert len(scheduler.timesteps) == scheduler.num_inference_steps >= 1
    x = sample_checked(scheduler, model, case["dtype"], case["seed"], case["step_kwargs"])
    assert x.dtype == case["dtype"] and x.shape == SHAPE and bool(torch.isfinite(x).all())
    OUTCOMES["sampled"] += 1
    OUTCOMES["sampled steps"] += scheduler.num_inference_steps


MATRIX_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=CI_EXAMPLES, **MATRIX_SETTINGS)
@given(case=cases())
def _ci_matrix(case):
    check_case(case)


@settings(max_examples=SLOW_EXAMPLES, **MATRIX_SETTINGS)
@given(case=cases())
def _slow_matrix(case):
    check_case(case)


def test_numerics_matrix():
    OUTCOMES.clear()
    _ci_matrix()
    # the fixed subset really exercises both sides: samples to the end, and each documented refusal
    assert OUTCOMES["sampled"] >= CI_EXAMPLES // 2, OUTCOMES
    for regex in (EPSILON_AT_SNR0, BAD_STEP_COUNT):
        assert OUTCOMES[f"refused: {regex[:30]}"] > 0, OUTCOMES


@pytest.mark.slow
def test_numerics_matrix_slow():
    OUTCOMES.clear()
    _slow_matrix()
    assert OUTCOMES["sampled"] >= SLOW_EXAMPLES // 2, OUTCOMES


# -- explicit cases --------------------------------------------------------------------------------

ONE_STEP_SCHEDULERS = [
    (ZTSNRDDIMScheduler, {}, {}),
    (ZTSNREulerScheduler, {}, {}),
    (ZTSNREulerScheduler, dict(use_karras_sigmas=True), {}),
    (ZTSNREulerAncestralScheduler, {}, {}),
    (ZTSNRDPMSolverMultistepScheduler, dict(solver_order=1), {}),
    (ZTSNRDPMSolverMultistepScheduler, dict(solver_order=2), {}),
    (ZTSNRFlowMatchScheduler, dict(solver_order=1), {}),
    (ZTSNRFlowMatchScheduler, dict(solver_order=2, shift=3.0), {}),
    (ZTSNRFlowMatchScheduler, dict(use_dynamic_shifting=True), dict(mu=1.15)),
]
ONE_STEP_IDS = [f"{c.__name__[5:]}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw, _ in ONE_STEP_SCHEDULERS]


def ztsnr_scheduler(cls, prediction_type: str, beta_schedule: str = "scaled_linear", **kwargs):
    if cls.path == "vp":
        kwargs.update(rescale_betas_zero_snr=True, beta_schedule=beta_schedule)
    return cls(prediction_type=prediction_type, **kwargs)


@pytest.mark.parametrize("cls,kwargs,set_kwargs", ONE_STEP_SCHEDULERS, ids=ONE_STEP_IDS)
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "flow_prediction"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_step_from_pure_noise_is_the_data_mean(cls, kwargs, set_kwargs, prediction_type, dtype):
    """At SNR 0 the exact model's x0 is E[x0] whatever the noise: one step from there returns the data mean,
    in every dtype (up to the dtype's rounding of the mean), with no clamp."""
    for beta_schedule in BETA_SCHEDULES if cls.path == "vp" else ["-"]:
        s = ztsnr_scheduler(cls, prediction_type, beta_schedule, **kwargs)
        s.set_timesteps(1, **set_kwargs)
        assert s._levels[0][0] == 0.0 and s._levels[-1] == (1.0, 0.0)  # from pure noise to clean data
        model = AnalyticModel(DATA, vp_levels(s.schedule.alphas_cumprod) if s.path == "vp" else flow_levels(T),
                              prediction_type)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
        t = s.timesteps[0]
        result = s.step(model(x, t.expand(SHAPE[0])), t, x)
        mean = DATA.mean.to(dtype).reshape(1, *SHAPE[1:]).expand(SHAPE)
        tol = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else dict(atol=2 ** -8, rtol=0)
        for value in (result.prev_sample, result.pred_original_sample):
            assert value.dtype == dtype
            torch.testing.assert_close(value, mean, **tol)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_one_step_epsilon_at_zero_snr_says_nothing(cls):
    """The same one step with an epsilon model is refused: at pure noise epsilon says nothing about x0."""
    s = ztsnr_scheduler(cls, "epsilon")
    with pytest.raises(ValueError, match=EPSILON_AT_SNR0):
        s.set_timesteps(1)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("n", [0, -1, T + 1])
def test_invalid_step_counts_name_num_inference_steps(cls, n):
    s = ztsnr_scheduler(cls, "v_prediction")
    with pytest.raises(ValueError, match=BAD_STEP_COUNT):
        s.set_timesteps(n)


def test_leading_past_the_last_timestep_names_num_inference_steps():
    s = ZTSNRDDIMScheduler(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match=LEADING_PAST_END):
        s.set_timesteps(T)


# -- regressions: bugs the matrix found ------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("cls", [ZTSNREulerScheduler, ZTSNREulerAncestralScheduler, ZTSNRDPMSolverMultistepScheduler],
                         ids=lambda c: c.__name__)
def test_karras_sigmas_without_zero_terminal_snr(cls, beta_schedule):
    """spacing.karras_grid raised "alpha must lie in [...]" at every n >= 2 on the linear and scaled_linear
    schedules without the ZTSNR rescale: the rho-power round trip put an end point an ulp outside the table."""
    kw = dict(beta_start=0.0001, beta_end=0.02) if beta_schedule == "linear" else {}
    s = cls(prediction_type="v_prediction", beta_schedule=beta_schedule, use_karras_sigmas=True, **kw)
    for n in (2, 3, 25, T):
        s.set_timesteps(n)
        t = s.timesteps
        assert len(t) == n and float(t[0]) == T - 1 and float(t[-1]) == 0 and bool((t.diff() < 0).all())
    s.set_timesteps(25)
    model = AnalyticModel(DATA, vp_levels(s.schedule.alphas_cumprod), "v_prediction")
    assert bool(torch.isfinite(sample_checked(s, model, torch.float16, 0, {})).all())


@pytest.mark.parametrize("solver_order", [1, 2])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_zero_length_final_step_is_the_identity(solver_order, solver_type):
    """final_sigmas_type="sigma_min" after a grid that ends at t = 0 makes the last step go from alpha_0 to
    alpha_0; DPM-Solver++(2M) divided by its zero log-SNR length (ZeroDivisionError)."""
    from diffusers_ztsnr.solvers import Update, dpmpp_2m_update

    level = (0.99, math.sqrt(1 - 0.99**2))
    assert dpmpp_2m_update(level, level, (0.9, math.sqrt(1 - 0.81)), solver_type) == Update(x=1.0, x0=0.0)
    s = ZTSNRDPMSolverMultistepScheduler(
        prediction_type="sample", beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="leading",
        final_sigmas_type="sigma_min", solver_order=solver_order, solver_type=solver_type,
    )
    s.set_timesteps(2)  # [500, 0], then 0 -> alpha_0 again
    assert s.timesteps.tolist() == [500, 0] and s._levels[-1] == s._levels[-2]
    model = AnalyticModel(DATA, vp_levels(s.schedule.alphas_cumprod), "sample")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = s.step(model(x, s.timesteps[0].expand(2)), s.timesteps[0], x).prev_sample
    last = s.step(model(x, s.timesteps[1].expand(2)), s.timesteps[1], x).prev_sample
    assert torch.equal(last, x)


@pytest.mark.parametrize("kwargs,set_kwargs", [
    (dict(shift_terminal=0.1), {}),
    (dict(shift=3.0, shift_terminal=0.01), {}),
    (dict(use_dynamic_shifting=True, shift_terminal=0.1), dict(mu=0.7)),
])
def test_shift_terminal_with_one_step_keeps_the_pure_noise_start(kwargs, set_kwargs):
    """With a grid of only s = 1, schedule.stretch_flow_sigmas_to_terminal computed 0/0: NaN timesteps (step()
    then failed with "timestep nan is not on this scheduler's grid"), and an epsilon model escaped its error."""
    for grid in (dict(num_inference_steps=1), dict(sigmas=[1.0]), dict(timesteps=[float(T)])):
        s = ZTSNRFlowMatchScheduler(prediction_type="v_prediction", **kwargs)
        s.set_timesteps(**grid, **set_kwargs)
        assert s.timesteps.tolist() == [float(T)] and s.sigmas.tolist() == [1.0, 0.0]
        with pytest.raises(ValueError, match=EPSILON_AT_SNR0):
            ZTSNRFlowMatchScheduler(prediction_type="epsilon", **kwargs).set_timesteps(**grid, **set_kwargs)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_dynamic_shift_starts_exactly_at_pure_noise(time_shift_type):
    """schedule.dynamic_shift_flow_sigmas computed ``factor / tensor`` as ``factor * reciprocal(tensor)``: s = 1
    became 1 - 1e-16 for some mu (linear, mu = 2.835...), so the grid missed SNR 0 and an epsilon model was
    converted with alpha = 1e-16 instead of raising the documented error."""
    from diffusers_ztsnr.schedule import dynamic_shift_flow_sigmas

    mus = torch.linspace(0.05, 4.0, 800, dtype=torch.float64).tolist() + [2.8350127914183725]
    one = torch.ones(1, dtype=torch.float64)
    assert all(float(dynamic_shift_flow_sigmas(one, mu, 1.0, time_shift_type)[0]) == 1.0 for mu in mus)
    kw = dict(use_dynamic_shifting=True, time_shift_type=time_shift_type, shift_terminal=0.01)
    with pytest.raises(ValueError, match=EPSILON_AT_SNR0):
        ZTSNRFlowMatchScheduler(prediction_type="epsilon", **kw).set_timesteps(2, mu=2.8350127914183725)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_custom_sigmas_of_diffusers_euler_are_accepted(beta_schedule, rescale, spacing):
    """A diffusers Euler scheduler's own (float32) sigmas passed as ``sigmas=`` raised "alpha must lie in [...]"
    where an end point rounds outside the float64 table (and so did the float64 sigma_min of the linear one)."""
    from diffusers import EulerDiscreteScheduler

    kw = dict(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
    kw.update(dict(beta_start=0.0001, beta_end=0.02) if beta_schedule == "linear" else dict(beta_start=0.00085,
                                                                                           beta_end=0.012))
    theirs = EulerDiscreteScheduler(**kw, timestep_spacing=spacing)
    theirs.set_timesteps(10)
    sigmas = theirs.sigmas.tolist()
    if rescale and spacing != "leading":
        sigmas[0] = math.inf  # diffusers clamps alphabar_T to 2**-24 (sigma 4096); ours is the exact SNR-0 point
    ours = ZTSNREulerScheduler(prediction_type="v_prediction", **kw)
    ours.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps.float(), atol=0.01, rtol=0)
    alpha_0, sigma_0 = ours.schedule.alpha_sigma(torch.tensor([0.0, 999.0], dtype=torch.float64))
    ours.set_timesteps(sigmas=(sigma_0 / alpha_0).tolist()[::-1])  # our own float64 sigma_min
    torch.testing.assert_close(ours.timesteps, torch.tensor([999.0, 0.0]), atol=1e-6, rtol=0)


def test_custom_sigmas_outside_the_schedule_name_its_range():
    s = ZTSNREulerScheduler(prediction_type="v_prediction")  # SD's schedule: sigma/alpha in [0.0292, 14.6]
    for bad in ([math.inf, 1.0], [100.0, 1.0], [1.0, 1e-3]):
        with pytest.raises(ValueError, match=r"custom sigmas \(sigma/alpha\) must lie in \[0\.029\d*, 14\.6\d*\]"):
            s.set_timesteps(sigmas=bad)


@pytest.mark.parametrize("shift", [0.2, 0.3, 0.7, 3.0, 7.0])
@pytest.mark.parametrize("shift_terminal", [None, 0.01])
def test_static_shift_starts_exactly_at_pure_noise(shift, shift_terminal):
    """schedule.shift_flow_sigmas mapped s = 1 to 1 + 2e-16 at shift=0.2 (``1 + (shift - 1)`` rounds below
    ``shift``): alpha = 1 - s < 0, a math domain error in DPM-Solver++, and no SNR-0 error for epsilon."""
    s = ZTSNRFlowMatchScheduler(prediction_type="v_prediction", shift=shift, shift_terminal=shift_terminal)
    s.set_timesteps(3)
    assert s._levels[0] == (0.0, 1.0) and all(0 <= a <= 1 for a, _ in s._levels)
    model = AnalyticModel(DATA, flow_levels(T), "v_prediction")
    assert bool(torch.isfinite(sample_checked(s, model, torch.float16, 0, {})).all())
    with pytest.raises(ValueError, match=EPSILON_AT_SNR0):
        ZTSNRFlowMatchScheduler(prediction_type="epsilon", shift=shift, shift_terminal=shift_terminal).set_timesteps(3)
