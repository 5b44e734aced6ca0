"""The flow scheduler in the flow pipelines beyond SD3 and FLUX.1: SD3.5, FLUX.1 Kontext (with and without a
reference image), Chroma, Lumina 2, Z-Image, FLUX.2 Klein, FLUX.2 dev, Qwen-Image and Sana (whose own scheduler is
DPM-Solver++ with flow sigmas); tiny random models of the real architectures, offline."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ztsnr import ZTSNRFlowMatchScheduler
from diffusers_ztsnr.testing.tiny_flow_builders import (
    FLUX2_KLEIN_TEXT_LAYERS,
    build_chroma,
    build_flux2_klein,
    build_flux_kontext,
    build_lumina2,
    build_qwen_image,
    build_sana,
    build_sd35,
    build_z_image,
)
from diffusers_ztsnr.testing.tiny_flux2_builders import build_flux2

pytestmark = pytest.mark.usefixtures("quiet_loading")

BUILDERS = {"sd35": build_sd35, "flux-kontext": build_flux_kontext, "chroma": build_chroma, "lumina2": build_lumina2,
            "z-image": build_z_image, "flux2-klein": build_flux2_klein, "flux2": build_flux2,
            "qwen-image": build_qwen_image, "sana": build_sana}
#: pipelines that pass sigmas of their own (and mu) to set_timesteps
PASS_SIGMAS = {"flux-kontext", "chroma", "lumina2", "z-image", "flux2-klein", "flux2", "qwen-image"}
SIZE, STEPS = 32, 4


@pytest.fixture(scope="module")
def pipes():
    built = {}
    for kind, build in BUILDERS.items():
        with torch.random.fork_rng(devices=[]):
            built[kind] = build(0)
        built[kind].set_progress_bar_config(disable=True)
    return built


def run(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    if "image" in kwargs or type(pipe).__name__ == "FluxKontextPipeline":
        kwargs = {"max_area": SIZE * SIZE, "_auto_resize": False, **kwargs}
    if type(pipe).__name__ in ("ZImagePipeline", "Flux2KleinPipeline"):
        kwargs = {"max_sequence_length": 64, **kwargs}  # their default, 512, only costs time here
    if type(pipe).__name__ == "SanaPipeline":  # no system-prompt prefix, no snapping to its trained sizes
        kwargs = {"max_sequence_length": 64, "complex_human_instruction": None, "use_resolution_binning": False,
                  **kwargs}
    if type(pipe).__name__ == "Flux2KleinPipeline":
        kwargs = {"text_encoder_out_layers": FLUX2_KLEIN_TEXT_LAYERS, **kwargs}
    return pipe(prompt="a red disc on a dark background", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                output_type="np", generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("use_pipeline_sigmas", [True, False])
@pytest.mark.parametrize("kind", BUILDERS)
def test_one_line_swap_samples_finite_deterministic_images(kind, use_pipeline_sigmas, pipes):
    pipe = pipes[kind]
    stock = pipe.scheduler
    run(pipe)  # what the pipeline hands its own scheduler at this size and step count
    stock_sigmas = stock.sigmas.float().clone()
    try:
        pipe.scheduler = ZTSNRFlowMatchScheduler.from_config(stock.config, use_pipeline_sigmas=use_pipeline_sigmas)
        image = run(pipe)
        assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
        np.testing.assert_array_equal(run(pipe), image)
        assert not np.array_equal(run(pipe, seed=1), image)
        ours = pipe.scheduler.sigmas
    finally:
        pipe.scheduler = stock
    if kind in PASS_SIGMAS and use_pipeline_sigmas:  # the pipeline's grid, as given
        torch.testing.assert_close(ours, stock_sigmas, rtol=0, atol=1e-6)
    else:  # our grid: the first step lands next to pure noise
        assert float(ours[0]) == 1.0 and float(ours[1]) > 0.99 > float(stock_sigmas[1])


def test_kontext_edits_a_reference_image_with_our_scheduler(pipes):
    pipe = pipes["flux-kontext"]
    stock = pipe.scheduler
    reference = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    try:
        pipe.scheduler = ZTSNRFlowMatchScheduler.from_config(stock.config, use_pipeline_sigmas=False)
        edited = run(pipe, image=reference)
        text_only = run(pipe)
    finally:
        pipe.scheduler = stock
    assert edited.shape == (1, SIZE, SIZE, 3) and np.isfinite(edited).all()
    assert np.abs(edited - text_only).max() > 1e-3  # the reference image conditions the transformer


@pytest.mark.parametrize("kind", BUILDERS)
def test_pipeline_folder_with_our_scheduler_round_trips(kind, pipes, tmp_path):
    pipe = pipes[kind]
    stock = pipe.scheduler
    try:
        pipe.scheduler = ZTSNRFlowMatchScheduler.from_config(stock.config, use_pipeline_sigmas=False)
        image = run(pipe)
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.scheduler = stock
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, ZTSNRFlowMatchScheduler)
    assert loaded.scheduler.config.use_pipeline_sigmas is False
    np.testing.assert_allclose(run(loaded), image, rtol=0, atol=1e-5)
