"""Our schedulers in diffusers' image-to-image and inpainting pipelines (tiny offline SD 1.5, SD3, Flux).

These pipelines use a scheduler differently from text-to-image: ``strength`` keeps ``timesteps[t_start * order:]``
and calls ``set_begin_index(t_start * order)``; the start latent is ``add_noise`` (VP) / ``scale_noise`` (flow) of
the encoded image at the first kept timestep; a 4-channel inpainting UNet re-noises the known region with
``add_noise(image_latents, noise, [timesteps[i + 1]])`` after every step. Each test compares with the stock
diffusers scheduler the class replaces, on the same tiny pipeline and seed.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)

from diffusers_ztsnr import (  # noqa: E402
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNRFlowMatchScheduler,
    ZTSNRUniPCMultistepScheduler,
)
from diffusers_ztsnr.solvers import FINAL_ANCHOR_RATIO  # noqa: E402
from diffusers_ztsnr.testing.tiny import make_tiny_pipeline  # noqa: E402
from tests.oracle_utils import VP_CLASSES  # noqa: E402  (the five VP classes, as every oracle test takes them)

SIZE = 64
STEPS = 4
PROMPT = "a photo of a cat"
STRENGTHS = (0.5, 0.75, 1.0)
ZTSNR_V = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True)  # our spacing: the default (logsnr)
STOCK_ZTSNR_V = dict(ZTSNR_V, timestep_spacing="trailing")  # diffusers' recommended ZTSNR setup
VP_PIPELINES = ("img2img", "inpaint4", "inpaint9")
FLOW_PIPELINES = ("sd3_img2img", "sd3_inpaint", "flux_img2img")


def _image(phase: float) -> torch.Tensor:
    """A smooth (1, 3, 64, 64) image in [0, 1], different for each ``phase``."""
    y, x = torch.meshgrid(torch.linspace(0, 3, SIZE), torch.linspace(0, 3, SIZE), indexing="ij")
    channels = [torch.sin(x * (c + 1) + y + phase) for c in range(3)]
    return (0.5 + 0.4 * torch.stack(channels)).unsqueeze(0)


MASK = torch.zeros(1, 1, SIZE, SIZE)
MASK[..., SIZE // 2:] = 1.0  # repaint the right half, keep the left


@pytest.fixture(scope="module")
def pipes() -> dict:
    sd15, sd3, flux = (make_tiny_pipeline(kind) for kind in ("sd15", "sd3", "flux"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)  # a 9-channel (latents, mask, masked-image latents) inpainting UNet
        unet9 = UNet2DConditionModel.from_config({**sd15.unet.config, "in_channels": 9}).eval()
    out = {
        "txt2img": sd15,
        "img2img": StableDiffusionImg2ImgPipeline.from_pipe(sd15),
        "inpaint4": StableDiffusionInpaintPipeline.from_pipe(sd15),
        "inpaint9": StableDiffusionInpaintPipeline.from_pipe(sd15, unet=unet9),
        "sd3_txt2img": sd3,
        "sd3_img2img": StableDiffusion3Img2ImgPipeline.from_pipe(sd3),
        "sd3_inpaint": StableDiffusion3InpaintPipeline.from_pipe(sd3),
        "flux_img2img": FluxImg2ImgPipeline.from_pipe(flux),
    }
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


class Recorder:
    """Records the denoiser's timesteps and first input, and every ``add_noise`` / ``scale_noise`` call."""

    def __init__(self, timestep_scale: float = 1.0):
        self.timestep_scale = timestep_scale  # FluxPipeline passes timestep / 1000 to its transformer
        self.timesteps: list[float] = []
        self.first_input: torch.Tensor | None = None
        self.noising: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (t, x0, noise, out)

    def denoiser_hook(self, module, args, kwargs):
        sample = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if self.first_input is None:
            self.first_input = sample[:1].clone()
        self.timesteps.append(float(torch.as_tensor(timestep).flatten()[0]) * self.timestep_scale)

    def wrap(self, scheduler, name: str) -> None:
        original = getattr(scheduler, name)

        def noising(x0, *rest):
            noise, t = (rest[1], rest[0]) if name == "scale_noise" else rest
            out = original(x0, *rest)
            self.noising.append((torch.as_tensor(t).flatten()[:1].clone(), x0.clone(), noise.clone(), out.clone()))
            return out

        setattr(scheduler, name, noising)


@contextlib.contextmanager
def recording(pipe, scheduler):
    """Run ``pipe`` with ``scheduler`` while recording; restores the pipeline's own scheduler afterwards."""
    recorder, original = Recorder(1000.0 if isinstance(pipe, FluxImg2ImgPipeline) else 1.0), pipe.scheduler
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    handle = denoiser.register_forward_pre_hook(recorder.denoiser_hook, with_kwargs=True)
    name = "scale_noise" if isinstance(scheduler, (ZTSNRFlowMatchScheduler, FlowMatchEulerDiscreteScheduler)) else (
        "add_noise")
    recorder.wrap(scheduler, name)
    pipe.scheduler = scheduler
    try:
        yield recorder
    finally:
        pipe.scheduler = original
        handle.remove()
        delattr(scheduler, name)


def _run(pipe, which: str, seed: int = 0, strength: float | None = 0.5, image_phase: float = 0.0) -> np.ndarray:
    kwargs = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                  generator=torch.Generator().manual_seed(seed))
    if strength is not None:
        kwargs.update(image=_image(image_phase), strength=strength)
    if "inpaint" in which:
        kwargs["mask_image"] = MASK
    return pipe(PROMPT, **kwargs).images


def _vp_pair(pipe, cls):
    return (cls.from_config(pipe.scheduler.config, **ZTSNR_V),
            cls.stock_class.from_config(pipe.scheduler.config, **STOCK_ZTSNR_V))


def _flow_pair(pipe):
    return ZTSNRFlowMatchScheduler.from_config(pipe.scheduler.config), pipe.scheduler


def _pair(pipes, which: str, cls=None):
    pipe = pipes[which]
    return pipe, (_flow_pair(pipe) if which in FLOW_PIPELINES else _vp_pair(pipe, cls))


def _begin(which: str, strength: float) -> int:
    """The index of the first kept timestep: SD's ``get_timesteps`` truncates ``STEPS * strength`` first, SD3's and
    Flux's subtract it as a float and truncate the difference."""
    if which in FLOW_PIPELINES:
        return int(max(STEPS - STEPS * strength, 0))
    return STEPS - min(int(STEPS * strength), STEPS)


def _level(scheduler, index: int) -> tuple[float, float]:
    """The grid's (alpha, sigma) at ``index``, from the public ``sigmas`` (VP: ``sigma/alpha``; flow: ``s``)."""
    value = float(scheduler.sigmas[index])
    if isinstance(scheduler, ZTSNRFlowMatchScheduler):
        return 1.0 - value, value
    if value == float("inf"):
        return 0.0, 1.0
    alpha = 1.0 / (1.0 + value**2) ** 0.5
    return alpha, value * alpha


def _check_image(image: np.ndarray) -> None:
    assert image.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0


CASES = [(which, cls) for which in VP_PIPELINES for cls in VP_CLASSES] + [(which, None) for which in FLOW_PIPELINES]


@pytest.mark.parametrize("which,cls", CASES, ids=[f"{w}-{c.__name__ if c else 'flow'}" for w, c in CASES])
def test_strength_keeps_the_stock_call_count_and_starts_at_the_begin_index(which, cls, pipes):
    """Per strength: as many denoiser calls as with the stock scheduler, and exactly our grid from the begin index."""
    pipe, (ours, stock) = _pair(pipes, which, cls)
    for strength in STRENGTHS:
        begin = _begin(which, strength)
        seen = {}
        for scheduler in (ours, stock):
            with recording(pipe, scheduler) as rec:
                _check_image(_run(pipe, which, strength=strength))
            expected = scheduler.timesteps[begin:].tolist()
            np.testing.assert_allclose(rec.timesteps, expected, rtol=1e-6, atol=1e-3 if cls is None else 0)
            seen[scheduler is ours] = len(rec.timesteps)
        assert seen[True] == seen[False] == STEPS - begin, (strength, seen)


@pytest.mark.parametrize("which,cls", CASES, ids=[f"{w}-{c.__name__ if c else 'flow'}" for w, c in CASES])
def test_noising_applies_the_grid_level_of_its_timestep(which, cls, pipes):
    """Every ``add_noise`` / ``scale_noise`` the pipeline makes (the start latent; a 4-channel inpainting UNet's known
    region after each step) is ``alpha_k x0 + sigma_k noise`` at the grid level of its timestep, and the denoiser's
    first input is that start latent."""
    pipe, (ours, _) = _pair(pipes, which, cls)
    with recording(pipe, ours) as rec:
        _check_image(_run(pipe, which, strength=0.75))
    begin = _begin(which, 0.75)
    grid = ours.timesteps.tolist()
    called_at = [float(t) for t, *_ in rec.noising]
    renoised = which in ("inpaint4", "sd3_inpaint")  # SD3's inpainting re-noises its known region for any transformer
    assert called_at == (grid[begin:] if renoised else grid[begin:begin + 1])
    for t, x0, noise, out in rec.noising:
        alpha, sigma = _level(ours, grid.index(float(t)))
        assert 0 < alpha < 1 and 0 < sigma < 1
        torch.testing.assert_close(out, alpha * x0 + sigma * noise, rtol=1e-5, atol=1e-5)
    if which != "flux_img2img":  # Flux packs the latent into tokens after noising it
        start = rec.noising[0][3][:1]  # a 9-channel UNet's input is (latents, mask, masked-image latents)
        torch.testing.assert_close(rec.first_input[:, : start.shape[1]], start, rtol=0, atol=0)
    if cls is not None:
        # the level is the model's training schedule: diffusers' alphas_cumprod at the (possibly fractional) timestep
        table = DDIMScheduler.from_config(pipe.scheduler.config, **STOCK_ZTSNR_V).alphas_cumprod.double()
        t = float(rec.noising[0][0])
        low, high = float(table[int(np.ceil(t))]), float(table[int(np.floor(t))])
        assert low - 1e-6 <= _level(ours, begin)[0] ** 2 <= high + 1e-6


@pytest.mark.parametrize("cls", VP_CLASSES, ids=lambda c: c.__name__)
def test_strength_one_starts_from_pure_noise_like_text_to_image(cls, pipes):
    """At strength 1 the first timestep is text-to-image's, at SNR 0: the image contributes exactly nothing, so two
    different init images give the same result. The stock scheduler on the released (non-ZTSNR) schedule does not."""
    pipe, (ours, _) = _pair(pipes, "img2img", cls)
    with recording(pipe, ours) as rec:
        first = _run(pipe, "img2img", strength=1.0, image_phase=0.0)
    with recording(pipe, ours):
        second = _run(pipe, "img2img", strength=1.0, image_phase=2.0)
    (t, x0, noise, out), = rec.noising
    assert _level(ours, 0) == (0.0, 1.0)
    torch.testing.assert_close(out, noise, rtol=0, atol=0)
    np.testing.assert_array_equal(first, second)
    with recording(pipes["txt2img"], ours) as txt:
        _run(pipes["txt2img"], "txt2img", strength=None)
    assert rec.timesteps == txt.timesteps and float(t) == txt.timesteps[0]
    released = DDIMScheduler.from_config(pipe.scheduler.config)  # alphabar_T = 0.0047: the image leaks through
    with recording(pipe, released):
        a = _run(pipe, "img2img", strength=1.0, image_phase=0.0)
    with recording(pipe, released):
        b = _run(pipe, "img2img", strength=1.0, image_phase=2.0)
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("which", ("sd3_img2img", "flux_img2img"))
def test_flow_strength_one_starts_from_pure_noise(which, pipes):
    """Flow img2img at strength 1: ``scale_noise`` at ``s = 1`` returns the noise itself, whatever the image."""
    pipe, (ours, _) = _pair(pipes, which)
    with recording(pipe, ours) as rec:
        first = _run(pipe, which, strength=1.0, image_phase=0.0)
    with recording(pipe, ours):
        second = _run(pipe, which, strength=1.0, image_phase=2.0)
    (_t, _x0, noise, out), = rec.noising
    assert _level(ours, 0) == (0.0, 1.0)
    torch.testing.assert_close(out, noise, rtol=0, atol=0)
    np.testing.assert_array_equal(first, second)


TXT2IMG = {"img2img": "txt2img", "inpaint4": "txt2img", "sd3_img2img": "sd3_txt2img"}
REUSE_CASES = [(which, cls) for which in ("img2img", "inpaint4") for cls in VP_CLASSES] + [("sd3_img2img", None)]


@pytest.mark.parametrize("which,cls", REUSE_CASES, ids=[f"{w}-{c.__name__ if c else 'flow'}" for w, c in REUSE_CASES])
def test_seeded_and_text_to_image_afterwards_is_unaffected(which, cls, pipes):
    """Deterministic under a seed (and the seed matters); the same scheduler object then samples text-to-image as a
    fresh one does (the begin index does not leak), and img2img again as before."""
    pipe, (ours, _) = _pair(pipes, which, cls)
    txt_pipe = pipes[TXT2IMG[which]]
    fresh = type(ours).from_config(ours.config)
    with recording(txt_pipe, fresh) as reference:
        expected_txt = _run(txt_pipe, "txt2img", strength=None)
    with recording(pipe, ours):
        first = _run(pipe, which, seed=0)
    with recording(pipe, ours):
        again = _run(pipe, which, seed=0)
    with recording(pipe, ours):
        other_seed = _run(pipe, which, seed=1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other_seed).max() > 1e-3
    with recording(txt_pipe, ours) as rec:
        txt = _run(txt_pipe, "txt2img", strength=None)
    _check_image(txt)
    assert rec.timesteps == reference.timesteps == ours.timesteps.tolist() and len(rec.timesteps) == STEPS
    np.testing.assert_array_equal(txt, expected_txt)
    with recording(pipe, ours):
        np.testing.assert_array_equal(_run(pipe, which, seed=0), first)


def test_flow_scale_noise_with_custom_timesteps_uses_the_shifted_grid_level():
    """``set_timesteps(timesteps=...)`` under a shift keeps the model times and shifts the levels (as diffusers
    does; LTX and Wan video-to-video pass ``timesteps=``). ``scale_noise`` at a kept timestep must noise to the level
    the next step starts from, as the stock scheduler's does; ``t / 1000`` would be the unshifted level."""
    custom = [1000.0, 750.0, 500.0, 250.0]
    x0, noise = torch.zeros(1, 4), torch.ones(1, 4)
    ours, stock = ZTSNRFlowMatchScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler in (ours, stock):
        scheduler.set_timesteps(timesteps=custom)
        scheduler.set_begin_index(1)
    shifted = 3 * 0.75 / (1 + 2 * 0.75)  # 0.9
    assert float(ours.sigmas[1]) == pytest.approx(shifted)
    start = ours.scale_noise(x0, ours.timesteps[1:2], noise)
    torch.testing.assert_close(start, stock.scale_noise(x0, stock.timesteps[1:2], noise))
    torch.testing.assert_close(start, torch.full((1, 4), shifted))
    # off the grid (training-style calls), s = t / num_train_timesteps
    torch.testing.assert_close(ours.scale_noise(x0, torch.tensor([300.0]), noise), torch.full((1, 4), 0.3))


def _last_prediction_gain(cls, steps: int, strength: float) -> float:
    """How much of the last x0 prediction reaches the output, on an SD pipeline's img2img call sequence
    (``get_timesteps``' slice and ``set_begin_index``), with a "sample" model predicting 0 until the last call."""
    scheduler = cls(prediction_type="sample", rescale_betas_zero_snr=True)
    scheduler.set_timesteps(steps)
    keep = min(int(steps * strength), steps)
    scheduler.set_begin_index(steps - keep)
    x = torch.zeros(1, 4)
    for k, t in enumerate(scheduler.timesteps[steps - keep:]):
        x = scheduler.step(torch.full((1, 4), float(k == keep - 1)), t, x).prev_sample
    return float(x[0, 0])


@pytest.mark.parametrize("cls", (ZTSNRDPMSolverMultistepScheduler, ZTSNRUniPCMultistepScheduler),
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("steps,strength", [(100, 0.04), (1000, 0.03)])
def test_low_strength_last_step_never_extrapolates_beyond_the_anchor_ratio(cls, steps, strength):
    """The extrapolated last step pairs the last x0 prediction with the latest one at least FINAL_ANCHOR_RATIO
    noisier, so it weighs the last prediction by at most that. A low-strength run begins after that point; it used
    the previous prediction instead (weights 4.9 / 9.3 at 100 steps, 45 / 114 at 1000); it now steps first order.
    Text-to-image and a strength that keeps the anchor still extrapolate, with the same weight."""
    text_to_image = _last_prediction_gain(cls, steps, 1.0)
    assert 1.5 < text_to_image <= FINAL_ANCHOR_RATIO
    assert _last_prediction_gain(cls, steps, 0.5) == pytest.approx(text_to_image, rel=1e-6)
    assert _last_prediction_gain(cls, steps, strength) == pytest.approx(1.0, abs=1e-6)
