"""VP <-> flow adapters: proved on the analytic oracle, and usable inside pipelines."""

import numpy as np
import pytest
import torch

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler, ZTSNREulerScheduler, ZTSNRFlowMatchScheduler
from diffusers_ztsnr.adapters import FlowModelAsVP, PathTransformedModel, VPModelAsFlow
from diffusers_ztsnr.analytic import AnalyticModel, flow_levels, vp_levels
from diffusers_ztsnr.schedule import VPSchedule
from tests.oracle_utils import GAUSSIAN

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class Callable(torch.nn.Module):
    """The analytic model behind the module calling convention the adapters wrap."""

    def __init__(self, model, input_name="sample"):
        super().__init__()
        self.inner, self.input_name = model, input_name

    def forward(self, *args, **kwargs):
        if args:
            return self.inner(*args)
        return self.inner(kwargs[self.input_name], kwargs["timestep"])


def sample(scheduler, model, n, z, **kw):
    scheduler.set_timesteps(n, **kw) if n else scheduler.set_timesteps(**kw)
    x = z.clone()
    for t in scheduler.timesteps:
        out = model(x, t.expand(len(x)))
        x = scheduler.step(out, t, x).prev_sample
    return x


def exact(z, first_levels):
    """Where the probability-flow ODE takes latent z (at SNR 0 on both paths: z itself) at t = 0."""
    return GAUSSIAN.posterior_mean(GAUSSIAN.ode_transport(z, first_levels, (1.0, 1e-9)), 1.0, 1e-9)


Z = torch.randn(256, GAUSSIAN.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
STD = GAUSSIAN.variance.sqrt()


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "flow_prediction"])
def test_flow_sampler_drives_a_ztsnr_vp_model_to_the_exact_flow(prediction_type):
    schedule = VPSchedule.from_config(**SD, rescale_betas_zero_snr=True)
    vp_model = AnalyticModel(GAUSSIAN, vp_levels(schedule.alphas_cumprod), prediction_type)
    adapter = PathTransformedModel.vp_as_flow(Callable(vp_model), schedule, prediction_type)
    assert adapter.max_flow_sigma == 1.0
    ref = exact(Z, (0.0, 1.0))
    native = Callable(AnalyticModel(GAUSSIAN, flow_levels(1000), "flow_prediction"))
    errors = []
    # grids 1 .. 1/n: the last model call (s = 1/30) stays inside the VP schedule (s >= 0.0292 at t = 0); below it
    # the VP model can only be evaluated at its timestep 0 (see vp_as_flow), not exactly
    for n in (10, 30):
        grid = np.linspace(1.0, 1.0 / n, n)
        x = sample(ZTSNRFlowMatchScheduler(shift=1.0), adapter, None, Z, sigmas=grid)
        # step for step what the flow sampler does with the native flow model of the same data
        native_x = sample(ZTSNRFlowMatchScheduler(shift=1.0), native, None, Z, sigmas=grid)
        torch.testing.assert_close(x, native_x, rtol=0, atol=1e-8)
        errors.append(float(((x - ref) / STD).abs().max()))
    assert errors[1] < 0.05 and errors[1] < 0.2 * errors[0], errors


@pytest.mark.parametrize("output_type", ["v_prediction", "flow_prediction", "sample"])
def test_vp_sampler_drives_a_flow_model_to_the_exact_flow(output_type):
    flow_model = AnalyticModel(GAUSSIAN, flow_levels(1000), "flow_prediction")
    scheduler = ZTSNRDPMSolverMultistepScheduler(**SD, rescale_betas_zero_snr=True, prediction_type=output_type)
    adapter = PathTransformedModel.flow_as_vp_from_scheduler_config(Callable(flow_model, "hidden_states"),
                                                                    scheduler.config)
    assert adapter.output_type == output_type
    ref = exact(Z, (0.0, 1.0))
    native_model = AnalyticModel(GAUSSIAN, vp_levels(scheduler.schedule.alphas_cumprod), output_type)
    errors = []
    for n in (10, 40):
        x = sample(scheduler, adapter, n, Z)
        torch.testing.assert_close(x, sample(scheduler, Callable(native_model), n, Z), rtol=0, atol=1e-8)
        errors.append(float(((x - ref) / STD).abs().max()))
    assert errors[1] < 0.05 and errors[1] < errors[0], errors


def test_adapted_model_outputs_equal_the_native_model_at_equal_snr():
    """The adapter is exact pointwise: the flow velocity of the VP model equals the flow model's."""
    schedule = VPSchedule.from_config(**SD, rescale_betas_zero_snr=True)
    vp = PathTransformedModel.vp_as_flow(
        Callable(AnalyticModel(GAUSSIAN, vp_levels(schedule.alphas_cumprod), "v_prediction")), schedule, "v_prediction")
    flow = AnalyticModel(GAUSSIAN, flow_levels(1000), "flow_prediction")
    s = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.05], dtype=torch.float64)  # within the schedule (s >= 0.0292)
    x = (1 - s)[:, None] * GAUSSIAN.sample(5, torch.Generator().manual_seed(1)) + s[:, None] * Z[:5]
    torch.testing.assert_close(vp(sample=x, timestep=1000 * s), flow(x, 1000 * s), rtol=1e-9, atol=1e-9)
    # and back: the flow model as VP gives the VP model's v
    back = PathTransformedModel.flow_as_vp(Callable(flow, "hidden_states"), schedule)
    t = torch.tensor([999.0, 700.0, 300.5, 20.0], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    x_vp = alpha[:, None] * GAUSSIAN.sample(4, torch.Generator().manual_seed(2)) + sigma[:, None] * Z[:4]
    native = AnalyticModel(GAUSSIAN, vp_levels(schedule.alphas_cumprod), "v_prediction")
    torch.testing.assert_close(back(hidden_states=x_vp, timestep=t), native(x_vp, t), rtol=1e-9, atol=1e-9)


def test_a_schedule_without_zero_terminal_snr_limits_the_flow_start():
    schedule = VPSchedule.from_config(**SD)  # SD 1.5 as shipped: terminal SNR 0.0047
    model = AnalyticModel(GAUSSIAN, vp_levels(schedule.alphas_cumprod), "epsilon")
    adapter = PathTransformedModel.vp_as_flow(Callable(model), schedule, "epsilon")
    s_max = adapter.max_flow_sigma
    assert 0.9 < s_max < 0.95
    with pytest.raises(ValueError, match="noisier than this VP model's schedule reaches"):
        adapter(sample=Z[:2], timestep=torch.tensor(1000.0))
    # starting at s_max (the sampler's sigmas), the flow sampler reproduces the exact flow from there
    x0 = GAUSSIAN.sample(len(Z), torch.Generator().manual_seed(3))
    start = (1 - s_max) * x0 + s_max * Z
    sigmas = np.linspace(s_max, 0.03, 40)  # the last call stays inside the schedule (s >= 0.0292)
    x = sample(ZTSNRFlowMatchScheduler(shift=1.0), adapter, None, start, sigmas=sigmas)
    native = Callable(AnalyticModel(GAUSSIAN, flow_levels(1000), "flow_prediction"))
    torch.testing.assert_close(x, sample(ZTSNRFlowMatchScheduler(shift=1.0), native, None, start, sigmas=sigmas),
                               rtol=0, atol=1e-8)


def test_adapters_reject_unknown_parameterizations():
    schedule = VPSchedule.from_config(**SD)
    with pytest.raises(ValueError, match="prediction_type='velocity'"):
        PathTransformedModel.vp_as_flow(torch.nn.Identity(), schedule, "velocity")
    with pytest.raises(ValueError, match="output_type='score'"):
        PathTransformedModel.flow_as_vp(torch.nn.Identity(), schedule, output_type="score")


def test_sd_pipeline_runs_a_ztsnr_unet_on_the_flow_scheduler():
    """The UNet adapter inside StableDiffusionPipeline: same image as our VP scheduler, as steps grow."""
    from diffusers_ztsnr.testing.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    native_scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    kw = dict(prompt="a red disc", height=32, width=32, output_type="np", guidance_scale=1.0)
    pipe.scheduler = native_scheduler
    native = pipe(**kw, num_inference_steps=60, generator=torch.Generator().manual_seed(0)).images
    unet = pipe.unet
    pipe.unet = PathTransformedModel.vp_as_flow_from_scheduler_config(unet, native_scheduler.config)
    pipe.scheduler = ZTSNRFlowMatchScheduler(shift=1.0)
    adapted = [pipe(**kw, num_inference_steps=n, generator=torch.Generator().manual_seed(0)).images
               for n in (8, 60)]
    errors = [float(np.abs(a - native).max()) for a in adapted]
    assert np.isfinite(adapted[1]).all() and errors[1] < 0.02 and errors[1] < errors[0], errors


def test_sd3_pipeline_runs_its_transformer_on_a_vp_scheduler():
    from diffusers_ztsnr.testing.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red disc", height=32, width=32, output_type="np", guidance_scale=1.0)
    pipe.scheduler = ZTSNRFlowMatchScheduler.from_config(pipe.scheduler.config, shift=1.0)
    native = pipe(**kw, num_inference_steps=60, generator=torch.Generator().manual_seed(0)).images
    transformer = pipe.transformer
    vp = ZTSNREulerScheduler(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    pipe.transformer = PathTransformedModel.flow_as_vp_from_scheduler_config(transformer, vp.config)
    pipe.scheduler = vp
    adapted = [pipe(**kw, num_inference_steps=n, generator=torch.Generator().manual_seed(0)).images
               for n in (8, 60)]
    errors = [float(np.abs(a - native).max()) for a in adapted]
    assert np.isfinite(adapted[1]).all() and errors[1] < 0.05 and errors[1] < errors[0], errors


class LinearDenoiser(torch.nn.Module):
    """A small seeded module called like a UNet (``sample``) or a transformer (``hidden_states``)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(GAUSSIAN.dim, GAUSSIAN.dim, dtype=torch.float64)

    def forward(self, sample=None, timestep=None, hidden_states=None):
        x = sample if sample is not None else hidden_states
        return self.proj(x) + timestep.reshape(-1, 1).to(x.dtype) / 1000


def test_former_adapter_names_warn_and_equal_the_path_transformed_constructors():
    torch.manual_seed(0)
    module = LinearDenoiser()
    schedule = VPSchedule.from_config(**SD, rescale_betas_zero_snr=True)
    config = ZTSNREulerScheduler(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction").config
    s, t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64), torch.tensor([999.0, 500.0, 20.5], dtype=torch.float64)
    x = Z[:3]
    pairs = [  # (former name building it, the constructor that replaces it, the call)
        (lambda: VPModelAsFlow(module, schedule, "v_prediction"),
         lambda: PathTransformedModel.vp_as_flow(module, schedule, "v_prediction"), dict(sample=x, timestep=1000 * s)),
        (lambda: VPModelAsFlow.from_scheduler_config(module, config),
         lambda: PathTransformedModel.vp_as_flow_from_scheduler_config(module, config),
         dict(sample=x, timestep=1000 * s)),
        (lambda: FlowModelAsVP(module, schedule),
         lambda: PathTransformedModel.flow_as_vp(module, schedule), dict(hidden_states=x, timestep=t)),
        (lambda: FlowModelAsVP.from_scheduler_config(module, config),
         lambda: PathTransformedModel.flow_as_vp_from_scheduler_config(module, config),
         dict(hidden_states=x, timestep=t)),
    ]
    for former, current, call in pairs:
        with pytest.warns(FutureWarning, match="PathTransformedModel"):
            old = former()
        assert isinstance(old, PathTransformedModel)
        torch.testing.assert_close(old(**call), current()(**call), rtol=0, atol=0)
