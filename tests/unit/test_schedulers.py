"""The diffusers protocol: config keys, bad input, custom grids, dtypes, save/load."""

import inspect
import json
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_ztsnr import (
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
)
from diffusers_ztsnr.analytic import run_sampler
from diffusers_ztsnr.parameterization import MODEL_PREDICTION_TYPES
from diffusers_ztsnr.schedulers.stock import FOREIGN_CONFIG_KEYS, OWN_SETTINGS_KEY, stock_keywords
from diffusers_ztsnr.spacing import SPACINGS
from diffusers_ztsnr.testing.released_schedulers import SCHEDULER_CONFIGS_DIR
from tests.oracle_utils import ALL_CLASSES, GAUSSIAN, VP_CLASSES, make_scheduler, model_for

CONFIGS = SCHEDULER_CONFIGS_DIR
VP_CONFIGS = ["sd15.json", "sd21.json", "sdxl.json"]
FLOW_CONFIGS = ["sd3.json", "flux.json"]


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


@pytest.mark.parametrize("cls", VP_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("config", VP_CONFIGS)
def test_vp_from_real_configs_honours_diffusers_keys(cls, config):
    cfg = load(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: trailing is what we pass
        s = cls.from_config(
            cfg, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
        )
    assert s.config.beta_schedule == "scaled_linear" and s.config.beta_end == 0.012
    assert s.config.steps_offset == 1 and s.schedule.is_zero_terminal_snr
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 749, 499, 249]
    x = run_sampler(s, model_for(s, GAUSSIAN, "v_prediction"), 4, 4)
    assert bool(torch.isfinite(x).all())


@pytest.mark.parametrize("config", FLOW_CONFIGS)
@pytest.mark.parametrize("prediction_type", MODEL_PREDICTION_TYPES)
def test_flow_from_real_configs(config, prediction_type):
    cfg = load(config)
    kw = dict(epsilon_zero_snr_clamp=1e-3) if prediction_type == "epsilon" else {}
    s = ZTSNRFlowMatchScheduler.from_config(cfg, prediction_type=prediction_type, **kw)
    assert s.config.shift == 3.0 and s.config.use_dynamic_shifting == (config == "flux.json")
    extra = dict(mu=1.0) if config == "flux.json" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = run_sampler(s, model_for(s, GAUSSIAN, prediction_type), 4, 6, **extra)
    assert bool(torch.isfinite(x).all())


def test_defaults_are_our_best_settings():
    """Passing only prediction_type and rescale_betas_zero_snr gives the spacing that measured best
    (diffusers_ztsnr.lighting and benchmarks/sampling_accuracy.py)."""
    for cls, spacing in [(ZTSNRDPMSolverMultistepScheduler, "logsnr"), (ZTSNRDDIMScheduler, "logsnr"),
                         (ZTSNREulerScheduler, "logsnr"), (ZTSNREulerAncestralScheduler, "logsnr")]:
        s = cls.from_config(load("sd15.json"), prediction_type="v_prediction", rescale_betas_zero_snr=True)
        assert s.config.timestep_spacing == spacing
        s.set_timesteps(10)
        assert int(s.timesteps[0]) == 999 and int(s.timesteps[-1]) == 0
    assert ZTSNRDPMSolverMultistepScheduler().config.solver_order == 2
    assert ZTSNRFlowMatchScheduler().config.solver_order == 2


def test_leading_with_ztsnr_warns():
    with pytest.warns(UserWarning, match="timestep_spacing='leading'.*trailing"):
        ZTSNRDDIMScheduler.from_config(load("sdxl.json"), rescale_betas_zero_snr=True, prediction_type="v_prediction")


BAD_CONSTRUCTIONS = [
    (ZTSNRDDIMScheduler, dict(prediction_type="eps"), "prediction_type='eps' is not supported; allowed: 'epsilon'"),
    (ZTSNRDDIMScheduler, dict(timestep_spacing="uniform"), "timestep_spacing='uniform' is not supported; allowed:"),
    (ZTSNRDDIMScheduler, dict(beta_schedule="cosine"), "beta_schedule='cosine' is not supported; allowed: linear"),
    (ZTSNRDDIMScheduler, dict(steps_offset=-1), "steps_offset=-1 must be >= 0"),
    (ZTSNRDDIMScheduler, dict(epsilon_zero_snr_clamp=0.0), "epsilon_zero_snr_clamp=0.0 must lie in"),
    (ZTSNREulerScheduler, dict(final_sigmas_type="min"), "final_sigmas_type='min' is not supported"),
    (ZTSNREulerAncestralScheduler, dict(eta=1.5), "eta=1.5 must lie in"),
    (ZTSNRDPMSolverMultistepScheduler, dict(solver_order=3), "solver_order=3 is not supported; allowed: 1, 2"),
    (ZTSNRDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver"),
    (ZTSNRDPMSolverMultistepScheduler, dict(solver_type="bh2"), "solver_type='bh2' is not supported"),
    (ZTSNRFlowMatchScheduler, dict(shift=0.0), "shift=0.0 must be > 0"),
    (ZTSNRFlowMatchScheduler, dict(prediction_type="velocity"), "prediction_type='velocity' is not supported"),
    (ZTSNRFlowMatchScheduler, dict(time_shift_type="cubic"), "time_shift_type='cubic' is not supported"),
    (ZTSNRFlowMatchScheduler, dict(shift_terminal=1.5), "shift_terminal=1.5 must lie in"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD_CONSTRUCTIONS, ids=lambda v: str(v)[:40])
def test_bad_config_values_name_the_key_and_the_allowed_values(cls, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cls(**kwargs)


UNHONOURABLE = [
    (ZTSNRDDIMScheduler, dict(clip_sample=True), "clip_sample=True: set clip_sample=False"),
    (ZTSNRDDIMScheduler, dict(thresholding=True), "thresholding=True: set thresholding=False"),
    (ZTSNRDDIMScheduler, dict(use_karras_sigmas=True), "use_karras_sigmas=True"),
    (ZTSNREulerScheduler, dict(shift=3.0), "shift=3.0: set shift=1.0"),
    (ZTSNREulerScheduler, dict(use_dynamic_shifting=True), "use_dynamic_shifting=True"),
    (ZTSNRDPMSolverMultistepScheduler, dict(use_exponential_sigmas=True), "use_exponential_sigmas=True"),
    (ZTSNRFlowMatchScheduler, dict(beta_schedule="scaled_linear"), "beta_schedule='scaled_linear' belongs to"),
    (ZTSNRFlowMatchScheduler, dict(stochastic_sampling=True), "stochastic_sampling=True"),
    (ZTSNRFlowMatchScheduler, dict(invert_sigmas=True), "invert_sigmas=True"),
]


@pytest.mark.parametrize("cls,kwargs,message", UNHONOURABLE, ids=lambda v: str(v)[:40])
def test_config_keys_a_class_cannot_honour_are_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls.from_config(cls().config, **kwargs)


def test_unknown_config_keys_warn_and_inert_ones_do_not():
    with pytest.warns(UserWarning, match=r"ignores the unknown config keys \['my_custom_key'\]"):
        ZTSNRDDIMScheduler.from_config({"my_custom_key": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZTSNRDDIMScheduler.from_config({"skip_prk_steps": True, "clip_sample": False, "thresholding": False})


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_bad_set_timesteps_arguments(cls):
    s = make_scheduler(cls, "v_prediction")
    for n in (0, 1001):
        with pytest.raises(ValueError, match=rf"num_inference_steps={n} must lie in \[1, "):
            s.set_timesteps(n)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        s.set_timesteps(2.5)
    with pytest.raises(ValueError, match="either timesteps= or sigmas="):
        s.set_timesteps(timesteps=[999, 500], sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="needs num_inference_steps"):
        s.set_timesteps()
    with pytest.raises(RuntimeError, match="call set_timesteps before step"):
        make_scheduler(cls, "v_prediction").step(torch.zeros(1), 999, torch.zeros(1))


def test_custom_timesteps_and_sigmas():
    s = make_scheduler(ZTSNRDDIMScheduler, "v_prediction")
    s.set_timesteps(timesteps=[999, 600, 300, 50])
    assert s.timesteps.tolist() == [999, 600, 300, 50] and s.num_inference_steps == 4
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.set_timesteps(timesteps=[500, 600])
    with pytest.raises(ValueError, match=r"must lie in \[0, 999\]"):
        s.set_timesteps(timesteps=[1200, 600])
    with pytest.raises(ValueError, match="does not accept sigmas="):
        s.set_timesteps(sigmas=[10.0, 1.0])
    e = make_scheduler(ZTSNREulerScheduler, "v_prediction")
    e.set_timesteps(sigmas=[float("inf"), 14.6, 1.0, 0.1, 0.0])  # diffusers' sigma/alpha convention
    assert e.timesteps[0].item() == 999.0 and e.num_inference_steps == 4
    torch.testing.assert_close(e.sigmas[1:4], torch.tensor([14.6, 1.0, 0.1], dtype=torch.float64), atol=1e-9, rtol=1e-9)
    f = ZTSNRFlowMatchScheduler()
    f.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    assert f.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match=r"strictly decreasing values in \(0, 1\]"):
        f.set_timesteps(sigmas=[1.5, 0.5])
    with pytest.raises(ValueError, match="needs mu="):
        ZTSNRFlowMatchScheduler(use_dynamic_shifting=True).set_timesteps(4)


def test_step_protocol_details():
    s = make_scheduler(ZTSNRDDIMScheduler, "v_prediction")
    s.set_timesteps(5)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="not on this scheduler's grid"):
        s.step(x, 123, x)
    out = s.step(x, s.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and s.step_index == 1
    with pytest.raises(ValueError, match=r"eta=2.0 must lie in \[0, 1\]"):
        s.step(x, s.timesteps[1], x, eta=2.0)
    # img2img: begin at a later index
    s.set_timesteps(5)
    s.set_begin_index(2)
    s.step(x, s.timesteps[2], x)
    assert s.step_index == 3
    e = make_scheduler(ZTSNREulerScheduler, "v_prediction")
    e.set_timesteps(3)
    with pytest.raises(TypeError, match=r"does not support \['s_churn'\]"):
        e.step(x, e.timesteps[0], x, s_churn=1.0)
    for _ in range(3):
        e.step(x, e.timesteps[0], x)
    with pytest.raises(IndexError, match="more times than the grid has steps"):
        e.step(x, e.timesteps[0], x)


def test_add_noise_and_velocity_match_diffusers():
    kw = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ours, theirs = ZTSNRDDIMScheduler(**kw), DDIMScheduler(**kw, beta_schedule="scaled_linear", beta_start=0.00085,
                                                            beta_end=0.012)
    x0, noise = torch.randn(2, 3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(ours.add_noise(x0, noise, t)[2], noise[2])  # pure noise at the zero-SNR step
    flow = ZTSNRFlowMatchScheduler()
    torch.testing.assert_close(flow.scale_noise(x0, torch.tensor([250.0, 500.0, 1000.0]), noise)[1],
                               0.5 * x0[1] + 0.5 * noise[1])


@settings(max_examples=25, deadline=None)
@given(
    cls=st.sampled_from(ALL_CLASSES),
    prediction_type=st.sampled_from(["v_prediction", "sample", "flow_prediction"]),
    spacing=st.sampled_from(SPACINGS),
    n=st.integers(1, 1000),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_low_precision_latents_never_give_nan_or_inf(cls, prediction_type, spacing, n, dtype):
    kw = {}
    if cls.path == "vp":
        kw = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" and n < 1000 else 0)
    s = make_scheduler(cls, prediction_type, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # leading + ZTSNR warns by design
        x = run_sampler(s, model_for(s, GAUSSIAN, prediction_type), 4, n, dtype=dtype)
    assert x.dtype == dtype and bool(torch.isfinite(x.float()).all())


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_save_and_load_round_trip(cls, tmp_path):
    s = make_scheduler(cls, "v_prediction")
    s.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    # a config of the diffusers counterpart (tests/integration/test_stock_interop.py); our class reads it back exactly
    assert saved["_class_name"] == cls.stock_class.__name__ and saved[OWN_SETTINGS_KEY]
    if cls.path == "vp":
        assert saved["prediction_type"] == "v_prediction"
    loaded = cls.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(s.config)
    s.set_timesteps(7)
    loaded.set_timesteps(7)
    assert torch.equal(s.timesteps, loaded.timesteps)


def _judged(cls, **kwargs) -> str | None:
    """Construct ``cls(**kwargs)`` with warnings as errors: None if it is accepted silently, else the ValueError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            cls(**kwargs)
        except ValueError as error:
            return str(error)
    return None


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_keyword_of_the_diffusers_counterpart_is_accepted(cls):
    """Read from the counterpart's signature, so a keyword a newer diffusers adds fails here until it is judged."""
    own = set(inspect.signature(cls.__init__).parameters)
    for key, default in stock_keywords(cls.stock_class).items():
        assert key in own or key in FOREIGN_CONFIG_KEYS, f"{cls.stock_class.__name__}({key}=...) is not judged"
        inert = FOREIGN_CONFIG_KEYS.get(key)
        if key not in own and inert is not None:
            assert _judged(cls, **{key: inert}) is None  # the no-op value: silently
        problem = _judged(cls, **{key: default})  # diffusers' default: silently, or named with what works
        assert problem is None or f"{key}={default!r}: set {key}=" in problem, problem
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_key'"):
        cls(no_such_key=1)


def test_stock_keywords_that_would_change_sampling_name_the_key_and_what_works():
    ztsnr_v = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert _judged(ZTSNRDPMSolverMultistepScheduler, thresholding=False, lower_order_final=False, **ztsnr_v) is None
    assert _judged(ZTSNRDDIMScheduler, clip_sample=False, clip_sample_range=2.0, **ztsnr_v) is None
    assert _judged(ZTSNRFlowMatchScheduler, invert_sigmas=False, stochastic_sampling=False) is None
    with pytest.raises(ValueError, match=r"thresholding=True: set thresholding=False"):
        ZTSNRDPMSolverMultistepScheduler(thresholding=True)
    with pytest.raises(ValueError, match=r"clip_sample=True: set clip_sample=False"):
        ZTSNRDDIMScheduler(clip_sample=True)
    with pytest.raises(ValueError, match=r"use_beta_sigmas=True: set use_beta_sigmas=False"):
        ZTSNREulerScheduler(use_beta_sigmas=True)
    with pytest.raises(ValueError, match=r"stochastic_sampling=True: set stochastic_sampling=False"):
        ZTSNRFlowMatchScheduler(stochastic_sampling=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_karras_sigmas'"):
        ZTSNRDDIMScheduler(use_karras_sigmas=False)  # not a DDIMScheduler keyword either
    # the constructor and from_config judge a key alike
    with pytest.raises(ValueError, match=r"thresholding=True: set thresholding=False"):
        ZTSNRDPMSolverMultistepScheduler.from_config(DPMSolverMultistepScheduler(thresholding=True).config)


def test_a_keyword_no_table_knows_passes_at_its_diffusers_default_only(monkeypatch):
    """What a newer diffusers adds, before it is judged here: its default is taken, any other value refused,
    by the constructor and by from_config alike."""
    monkeypatch.delitem(FOREIGN_CONFIG_KEYS, "clip_sample_range")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZTSNRDDIMScheduler(clip_sample_range=1.0)
        ZTSNRDDIMScheduler.from_config({"clip_sample_range": 1.0})
    for make in (lambda: ZTSNRDDIMScheduler(clip_sample_range=2.0),
                 lambda: ZTSNRDDIMScheduler.from_config({"clip_sample_range": 2.0})):
        with pytest.raises(ValueError, match=r"clip_sample_range=2.0: set clip_sample_range=1.0"):
            make()


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_protocol_like_diffusers(cls):
    s = make_scheduler(cls, "v_prediction")
    stock = cls.stock_class.from_config(json.loads(s.to_json_string()))
    # before set_timesteps: the training grid, noisiest first, as diffusers has it
    assert s.num_inference_steps is None and len(s.timesteps) == s.config.num_train_timesteps
    torch.testing.assert_close(s.timesteps.double(), stock.timesteps.double(), rtol=1e-6, atol=0)
    assert s.order == 1 and s.init_noise_sigma == 1.0 and len(s) == s.config.num_train_timesteps
    # compatibles: the counterpart and our classes of the same path, between which a config moves
    same_path = [c for c in ALL_CLASSES if c.path == cls.path]
    assert cls.stock_class in s.compatibles and set(same_path) <= set(s.compatibles)
    for other in same_path:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # each other's keys are judged, silently when they are no-ops
            moved = other.from_config(s.config)
        assert moved.config.prediction_type == "v_prediction" and type(moved) is other
    # step: shapes and dtypes kept, a tuple without return_dict
    s.set_timesteps(3)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    assert s.scale_model_input(x, s.timesteps[0]) is x
    out = s.step(torch.randn_like(x), s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == x.dtype
    assert out.pred_original_sample.shape == x.shape
    prev, x0 = s.step(torch.randn_like(x), s.timesteps[1], x, return_dict=False)
    assert prev.shape == x0.shape == x.shape
    # add_noise follows the samples' device and dtype, whatever the timesteps'
    t = s.timesteps[:2]
    for device, dtype in [("cpu", torch.float64), ("cpu", torch.bfloat16), ("meta", torch.float16)]:
        x0 = torch.zeros(2, 4, 8, 8, device=device, dtype=dtype)
        noisy = s.add_noise(x0, torch.ones_like(x0), t)
        assert noisy.device.type == device and noisy.dtype == dtype and noisy.shape == x0.shape
    pure = s.add_noise(torch.zeros(1, 3), torch.ones(1, 3), s.timesteps[:1])  # the zero-SNR start: pure noise
    torch.testing.assert_close(pure, torch.ones(1, 3))


def test_dpm_solver_and_unipc_configs_move_between_the_two_as_in_diffusers():
    """``solver_type`` means a DPM-Solver variant (midpoint, heun) in one and a UniPC one (bh1, bh2) in the other;
    diffusers reads the other's value as its own default variant, and so do ours."""
    from diffusers import UniPCMultistepScheduler

    from diffusers_ztsnr import ZTSNRUniPCMultistepScheduler

    dpm = ZTSNRDPMSolverMultistepScheduler(prediction_type="v_prediction", solver_type="heun")
    unipc = ZTSNRUniPCMultistepScheduler.from_config(dpm.config)
    assert unipc.config.solver_type == "bh2" and unipc.config.prediction_type == "v_prediction"
    assert ZTSNRDPMSolverMultistepScheduler.from_config(unipc.config).config.solver_type == "midpoint"
    stock_unipc = UniPCMultistepScheduler().config
    assert ZTSNRDPMSolverMultistepScheduler.from_config(stock_unipc).config.solver_type == "midpoint"
    assert UniPCMultistepScheduler.from_config(dpm.config).config.solver_type == "bh2"  # diffusers' own reading
    with pytest.raises(ValueError, match="solver_type='midpoint' is not supported"):
        ZTSNRUniPCMultistepScheduler(solver_type="midpoint")  # a direct argument is taken as meant
