"""Our schedulers as drop-ins in real diffusers pipelines (tiny offline SD 1.5 / SDXL / SD3 / Flux).

Each test swaps ``pipe.scheduler`` of a module-wide tiny pipeline for one of ours (restoring the original
afterwards) and runs the pipeline end to end: encode -> denoise with our scheduler -> decode.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusionPipeline,
)

from diffusers_ztsnr import (  # noqa: E402
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
    ZTSNRUniPCMultistepScheduler,
)
from diffusers_ztsnr.testing.tiny import load_tiny_pipeline, make_tiny_pipeline  # noqa: E402

SIZE = 64
STEPS = 3
PROMPT = "a photo of a cat"
VP_KINDS = ("sd15", "sdxl")
FLOW_KINDS = ("sd3", "flux")
VP_CLASSES = (ZTSNRDDIMScheduler, ZTSNREulerScheduler, ZTSNREulerAncestralScheduler, ZTSNRDPMSolverMultistepScheduler,
              ZTSNRUniPCMultistepScheduler)
# VP latents of the tiny SD 1.5 / SDXL pipelines at 64 x 64 px
VP_LATENT_SHAPE = (1, 4, SIZE // 2, SIZE // 2)

ZTSNR_V = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)  # spacing: our default
ZTSNR_V_TRAILING = dict(ZTSNR_V, timestep_spacing="trailing")
VP_OVERRIDES = {"trailing": ZTSNR_V_TRAILING, "defaults": ZTSNR_V}


def _name(cls) -> str:
    return cls.__name__


@pytest.fixture(scope="module")
def pipes() -> dict[str, DiffusionPipeline]:
    return {kind: make_tiny_pipeline(kind) for kind in VP_KINDS + FLOW_KINDS}


@pytest.fixture(scope="module")
def flow_references(pipes) -> dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Image, timesteps and sigmas of each flow pipeline with its own FlowMatchEulerDiscreteScheduler."""
    out = {}
    for kind in FLOW_KINDS:
        pipe = pipes[kind]
        assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
        image = _run(pipe)
        out[kind] = (image, pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone())
    return out


@pytest.fixture(scope="module")
def trailing_images(pipes):
    """``get(kind, cls)``: the seed-0 image with ``cls`` (ZTSNR, v_prediction, trailing), computed once."""
    cache: dict[tuple[str, type], np.ndarray] = {}

    def get(kind: str, cls) -> np.ndarray:
        if (kind, cls) not in cache:
            pipe = pipes[kind]
            with _swapped(pipe, cls.from_config(pipe.scheduler.config, **ZTSNR_V_TRAILING)):
                cache[kind, cls] = _run(pipe)
        return cache[kind, cls]

    return get


@contextlib.contextmanager
def _swapped(pipe: DiffusionPipeline, scheduler):
    """``pipe.scheduler = scheduler`` for the duration of the block (the pipelines are shared)."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def _run(pipe: DiffusionPipeline, seed: int = 0, **kwargs) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


def _check_image(image: np.ndarray) -> None:
    assert image.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0


def _public_config(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _vp_scheduler(pipe: DiffusionPipeline, cls, overrides: str, kind: str):
    """``cls.from_config(pipe.scheduler.config, ...)``; SDXL's config says timestep_spacing='leading',
    which with ZTSNR and no spacing override must warn; every other swap must be silent."""
    kwargs = VP_OVERRIDES[overrides]
    if kind == "sdxl" and "timestep_spacing" not in kwargs:
        with pytest.warns(UserWarning, match="timestep_spacing='leading'"):
            return cls.from_config(pipe.scheduler.config, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return cls.from_config(pipe.scheduler.config, **kwargs)


# --------------------------------------------------------------------------------------------------
# VP path: SD 1.5 and SDXL
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", ["trailing", "defaults"])
@pytest.mark.parametrize("cls", VP_CLASSES, ids=_name)
@pytest.mark.parametrize("kind", VP_KINDS)
def test_vp_scheduler_drop_in(kind, cls, overrides, pipes, trailing_images):
    pipe = pipes[kind]
    scheduler = _vp_scheduler(pipe, cls, overrides, kind)
    assert type(scheduler) is cls
    cfg = scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_betas_zero_snr
    # the checkpoint's beta schedule and offset are carried over
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert cfg.steps_offset == 1
    expected_spacing = {"trailing": "trailing", "defaults": "leading" if kind == "sdxl" else None}[overrides]
    if expected_spacing is not None:
        assert cfg.timestep_spacing == expected_spacing
    else:  # SD 1.5's 'leading' is only PNDM's default value, not the checkpoint's: ours applies
        assert cfg.timestep_spacing == cls().config.timestep_spacing

    with _swapped(pipe, scheduler):
        image = _run(pipe)
        assert pipe.scheduler is scheduler
        assert len(scheduler.timesteps) == STEPS and scheduler.step_index == STEPS
        if cfg.timestep_spacing != "leading":
            assert int(scheduler.timesteps[0]) == 999  # the loop started at SNR 0
        _check_image(image)
        if cls is ZTSNREulerAncestralScheduler:
            assert not np.array_equal(_run(pipe, seed=1), image)
        # same seed -> identical (trailing: through the shared cache, a second swap of a fresh instance)
        again = trailing_images(kind, cls) if overrides == "trailing" else _run(pipe)
    np.testing.assert_array_equal(again, image)
    assert pipe.scheduler is not scheduler  # restored


@pytest.mark.parametrize("cls", VP_CLASSES, ids=_name)
@pytest.mark.parametrize("kind", VP_KINDS)
def test_vp_step_noise_comes_from_the_generator(kind, cls, pipes):
    """With fixed initial latents only a stochastic step can make the seed matter: the ancestral
    sampler draws its noise from the pipeline's generator, the ODE samplers draw none."""
    pipe = pipes[kind]
    scheduler = cls.from_config(pipe.scheduler.config, **ZTSNR_V_TRAILING)
    latents = torch.randn(VP_LATENT_SHAPE, generator=torch.Generator().manual_seed(123))
    with _swapped(pipe, scheduler):
        a = _run(pipe, seed=0, latents=latents.clone())
        b = _run(pipe, seed=1, latents=latents.clone())
        _check_image(a)
        _check_image(b)
        if cls is ZTSNREulerAncestralScheduler:
            assert not np.array_equal(a, b)
            np.testing.assert_array_equal(_run(pipe, seed=1, latents=latents.clone()), b)
        else:
            np.testing.assert_array_equal(a, b)
        if cls is ZTSNRDDIMScheduler:  # the pipelines' eta argument reaches DDIM's step
            c = _run(pipe, seed=0, latents=latents.clone(), eta=1.0)
            _check_image(c)
            assert not np.array_equal(c, a)


@pytest.mark.parametrize("cls", VP_CLASSES, ids=_name)
@pytest.mark.parametrize("kind", VP_KINDS)
def test_vp_guidance_rescale(kind, cls, pipes, trailing_images):
    """diffusers' native CFG rescale (Lin et al. 2023, eq. 16) runs on top of our schedulers."""
    pipe = pipes[kind]
    scheduler = cls.from_config(pipe.scheduler.config, **ZTSNR_V_TRAILING)
    with _swapped(pipe, scheduler):
        rescaled = _run(pipe, guidance_rescale=0.7)  # with the pipelines' default guidance_scale (> 1)
        assert pipe.guidance_scale > 1 and pipe.do_classifier_free_guidance and pipe.guidance_rescale == 0.7
    _check_image(rescaled)
    assert not np.array_equal(rescaled, trailing_images(kind, cls))  # guidance_rescale=0.0


@pytest.mark.parametrize("cls", VP_CLASSES, ids=_name)
@pytest.mark.parametrize("kind", VP_KINDS)
def test_epsilon_model_at_snr0_is_a_clear_error(kind, cls, pipes):
    pipe = pipes[kind]
    scheduler = cls.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert scheduler.config.prediction_type == "epsilon"  # from the checkpoint's config
    with _swapped(pipe, scheduler):
        with pytest.raises(ValueError, match="SNR 0"):
            _run(pipe)


@pytest.mark.parametrize("cls", VP_CLASSES, ids=_name)
def test_epsilon_model_at_snr0_with_opt_in_clamp(cls, pipes):
    """The documented way out (diffusers' alphabar clamp) warns and then samples finitely."""
    pipe = pipes["sd15"]
    scheduler = cls.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing", epsilon_zero_snr_clamp=2**-24
    )
    with _swapped(pipe, scheduler):
        with pytest.warns(UserWarning, match="epsilon_zero_snr_clamp"):
            image = _run(pipe)
    _check_image(image)


# --------------------------------------------------------------------------------------------------
# Flow path: SD3 and Flux
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver_order", [1, 2])
@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_flow_scheduler_drop_in(kind, solver_order, pipes, flow_references):
    """On diffusers' grid (``timestep_spacing="linspace"``) the grid is the pipeline scheduler's, and Euler is its
    sampler."""
    pipe = pipes[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scheduler = ZTSNRFlowMatchScheduler.from_config(pipe.scheduler.config, solver_order=solver_order,
                                                        timestep_spacing="linspace")
    assert scheduler.config.shift == 3.0
    assert scheduler.config.use_dynamic_shifting == (kind == "flux")
    ref_image, ref_timesteps, ref_sigmas = flow_references[kind]
    with _swapped(pipe, scheduler):
        image = _run(pipe)
        _check_image(image)
        # same grid as diffusers' scheduler (Flux: through set_timesteps(sigmas=..., mu=...))
        torch.testing.assert_close(scheduler.timesteps, ref_timesteps, rtol=0, atol=1e-3)
        torch.testing.assert_close(scheduler.sigmas, ref_sigmas, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(_run(pipe), image)
        assert not np.array_equal(_run(pipe, seed=1), image)
    if solver_order == 1:  # Euler: the same sampler as the pipeline's own scheduler
        np.testing.assert_allclose(image, ref_image, rtol=0, atol=1e-4)


@pytest.mark.parametrize("use_pipeline_sigmas", [True, False])
@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_flow_scheduler_default_grid_in_the_pipeline(kind, use_pipeline_sigmas, pipes, flow_references):
    """The default ``logsnr`` grid where the pipeline passes only a step count (SD3); FluxPipeline's own sigmas are
    sampled as given unless ``use_pipeline_sigmas=False``."""
    pipe = pipes[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scheduler = ZTSNRFlowMatchScheduler.from_config(pipe.scheduler.config, use_pipeline_sigmas=use_pipeline_sigmas)
    _, ref_timesteps, ref_sigmas = flow_references[kind]
    with _swapped(pipe, scheduler):
        image = _run(pipe)
        _check_image(image)
        np.testing.assert_array_equal(_run(pipe), image)
        sigmas = scheduler.sigmas
    assert len(sigmas) == len(ref_sigmas) and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    if kind == "flux" and use_pipeline_sigmas:
        torch.testing.assert_close(sigmas, ref_sigmas, rtol=0, atol=1e-6)  # the drop-in rule
    else:
        assert float(sigmas[1]) > 0.99 > float(ref_sigmas[1])  # the first step lands near pure noise


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_flow_other_prediction_types(kind, prediction_type, pipes, flow_references):
    """The random model's output reinterpreted as another parameterization still samples finitely."""
    pipe = pipes[kind]
    scheduler = ZTSNRFlowMatchScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    assert scheduler.config.prediction_type == prediction_type
    with _swapped(pipe, scheduler):
        image = _run(pipe)
    _check_image(image)
    assert not np.array_equal(image, flow_references[kind][0])


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_flow_epsilon_at_snr0_is_a_clear_error(kind, pipes):
    pipe = pipes[kind]
    scheduler = ZTSNRFlowMatchScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    with _swapped(pipe, scheduler):
        with pytest.raises(ValueError, match="SNR 0"):
            _run(pipe)


# --------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# --------------------------------------------------------------------------------------------------


ROUND_TRIP_KINDS = ("sd15", "flux")
ROUND_TRIP_CLASSES = {"sd15": ZTSNRDPMSolverMultistepScheduler, "flux": ZTSNRFlowMatchScheduler}


@pytest.fixture(scope="module")
def saved_pipelines(pipes, tmp_path_factory) -> dict[str, tuple]:
    """``kind -> (directory, scheduler, image)``: the tiny sd15 pipeline with our DPM-Solver++ (v_prediction,
    ZTSNR, trailing) and the tiny flux pipeline with our flow scheduler (solver_order 2), each saved."""
    out = {}
    for kind in ROUND_TRIP_KINDS:
        pipe, cls = pipes[kind], ROUND_TRIP_CLASSES[kind]
        scheduler = cls.from_config(pipe.scheduler.config, **(ZTSNR_V_TRAILING if kind == "sd15" else {}))
        path = tmp_path_factory.mktemp(kind)
        with _swapped(pipe, scheduler):
            image = _run(pipe)
            pipe.save_pretrained(str(path), safe_serialization=True)
        out[kind] = (path, scheduler, image)
    return out


def _model_index(path) -> dict:
    return json.loads((path / "model_index.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("kind", ROUND_TRIP_KINDS)
def test_saved_scheduler_files(kind, saved_pipelines):
    path, scheduler, image = saved_pipelines[kind]
    cls = ROUND_TRIP_CLASSES[kind]
    _check_image(image)
    library, class_name = _model_index(path)["scheduler"]
    assert class_name == cls.__name__
    assert library.split(".")[0] == "diffusers_ztsnr"
    assert getattr(importlib.import_module(library), class_name) is cls
    saved = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    # a config of the diffusers counterpart (tests/integration/test_stock_interop.py), which our class reads back
    # exactly
    assert saved["_class_name"] == cls.stock_class.__name__
    assert _public_config(cls.from_config(saved).config) == _public_config(scheduler.config)
    if kind == "sd15":
        assert saved["prediction_type"] == "v_prediction" and saved["rescale_betas_zero_snr"] is True


@pytest.mark.parametrize("kind", ROUND_TRIP_KINDS)
def test_model_index_names_the_public_library(kind, saved_pipelines):
    path = saved_pipelines[kind][0]
    assert _model_index(path)["scheduler"] == ["diffusers_ztsnr", ROUND_TRIP_CLASSES[kind].__name__]


@pytest.mark.parametrize("kind", ROUND_TRIP_KINDS)
def test_scheduler_subfolder_from_pretrained(kind, saved_pipelines):
    """Loading a scheduler subfolder by path, as from a Hub repo id."""
    path, scheduler, _ = saved_pipelines[kind]
    cls = ROUND_TRIP_CLASSES[kind]
    direct = cls.from_pretrained(str(path), subfolder="scheduler")
    assert type(direct) is cls
    assert _public_config(direct.config) == _public_config(scheduler.config)


@pytest.mark.parametrize("kind", ROUND_TRIP_KINDS)
def test_pipeline_from_pretrained_round_trip(kind, saved_pipelines):
    path, scheduler, image = saved_pipelines[kind]
    cls = ROUND_TRIP_CLASSES[kind]
    pipeline_class = StableDiffusionPipeline if kind == "sd15" else FluxPipeline
    loaded = pipeline_class.from_pretrained(str(path))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is cls
    assert _public_config(loaded.scheduler.config) == _public_config(scheduler.config)
    # plain from_pretrained: equal to float32 round-off (unaligned weights, see tests/integration/test_tiny.py)
    np.testing.assert_allclose(_run(loaded), image, rtol=0, atol=1e-5)
    # re-allocated weights: bitwise identical
    np.testing.assert_array_equal(_run(load_tiny_pipeline(kind, path)), image)
    # the generic entry point resolves the pipeline class and our scheduler class
    generic = DiffusionPipeline.from_pretrained(str(path))
    assert type(generic) is pipeline_class and type(generic.scheduler) is cls


# --------------------------------------------------------------------------------------------------
# Config keys a class cannot honour
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", VP_CLASSES, ids=_name)
@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_vp_class_rejects_flow_pipeline_config(kind, cls, pipes):
    config = pipes[kind].scheduler.config
    with pytest.raises(ValueError, match=r"config key shift=3\.0"):
        cls.from_config(config)
    if kind == "flux":  # the next key it cannot honour is named too
        with pytest.raises(ValueError, match=r"config key use_dynamic_shifting=True"):
            cls.from_config(config, shift=1.0)


@pytest.mark.parametrize("kind", VP_KINDS)
def test_flow_class_rejects_vp_pipeline_config(kind, pipes):
    with pytest.raises(ValueError, match=r"config key beta_start=0\.00085 belongs to a scheduler of the other path"):
        ZTSNRFlowMatchScheduler.from_config(pipes[kind].scheduler.config)


def test_vp_class_rejects_a_sampling_changing_key(pipes):
    config = {**pipes["sdxl"].scheduler.config, "use_karras_sigmas": True}
    with pytest.raises(ValueError, match=r"config key use_karras_sigmas=True"):
        ZTSNRDDIMScheduler.from_config(config, **ZTSNR_V_TRAILING)
    # the Euler-grid classes do honour it
    scheduler = ZTSNREulerScheduler.from_config(config, **ZTSNR_V_TRAILING)
    assert scheduler.config.use_karras_sigmas is True
