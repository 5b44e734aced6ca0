"""CFG rescale: the formula, and the same rescale reaching all four pipelines."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler, ZTSNRFlowMatchScheduler
from diffusers_ztsnr.guidance import _GuidanceRescaleHook, generate_with_guidance_rescale, rescale_guided_prediction
from diffusers_ztsnr.testing.tiny import make_tiny_pipeline


def test_formula_matches_diffusers_and_the_paper():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 3, 4, 8, 8, generator=g)
    guided = u + 7.5 * (c - u)
    ours = rescale_guided_prediction(guided, c, 0.7)
    torch.testing.assert_close(ours, rescale_noise_cfg(guided, c, guidance_rescale=0.7))
    # phi = 1: per-sample std equals the conditional prediction's
    full = rescale_guided_prediction(guided, c, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_guided_prediction(guided, c, 0.0), guided)
    with pytest.raises(ValueError, match=r"guidance_rescale=1.5 must lie in \[0, 1\]"):
        rescale_guided_prediction(guided, c, 1.5)


def test_constant_prediction_is_finite_in_half_precision():
    zeros = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    out = rescale_guided_prediction(zeros, zeros, 0.7)
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())


def test_hook_rewrites_unconditional_so_the_pipeline_combination_is_the_rescaled_one():
    g = torch.Generator().manual_seed(1)
    u, c = torch.randn(2, 2, 16, generator=g)
    target = rescale_guided_prediction(u + 5.0 * (c - u), c, 0.7)
    batched = _GuidanceRescaleHook(0.7, 5.0, "batched")
    new_u, new_c = batched(None, (), {}, (torch.cat([u, c]),))[0].chunk(2)
    torch.testing.assert_close(new_u + 5.0 * (new_c - new_u), target)
    sequential = _GuidanceRescaleHook(0.7, 5.0, "sequential")
    assert sequential(None, (), {}, (c,)) is None  # conditional call passes through
    new_u = sequential(None, (), {}, (u,))[0]
    torch.testing.assert_close(new_u + 5.0 * (c - new_u), target)


def sd_kwargs(seed=0, **extra):
    return dict(prompt="a red square", num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed), **extra)


def test_sd_native_rescale_equals_our_hook_path():
    """The hook trick in batched mode reproduces diffusers' own guidance_rescale exactly."""
    pipe = make_tiny_pipeline("sd15")
    pipe.scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True
    )
    native = generate_with_guidance_rescale(pipe, 0.7, **sd_kwargs(guidance_scale=6.0)).images
    plain = pipe(**sd_kwargs(guidance_scale=6.0)).images
    handle = pipe.unet.register_forward_hook(_GuidanceRescaleHook(0.7, 6.0, "batched"), with_kwargs=True)
    try:
        hooked = pipe(**sd_kwargs(guidance_scale=6.0)).images
    finally:
        handle.remove()
    np.testing.assert_allclose(hooked, native, atol=5e-5)  # float32 rounding of the u' algebra
    assert np.abs(native - plain).max() > 1e-4


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_pipelines_get_a_rescale(kind):
    pipe = make_tiny_pipeline(kind)
    pipe.scheduler = ZTSNRFlowMatchScheduler.from_config(pipe.scheduler.config)
    if kind == "sd3":
        kw = dict(guidance_scale=6.0, negative_prompt="blurry")
    else:
        kw = dict(true_cfg_scale=6.0, negative_prompt="blurry", guidance_scale=3.5)
    plain = pipe(**sd_kwargs(**kw)).images
    zero = generate_with_guidance_rescale(pipe, 0.0, **sd_kwargs(**kw)).images
    rescaled = generate_with_guidance_rescale(pipe, 0.7, **sd_kwargs(**kw)).images
    np.testing.assert_allclose(zero, plain, atol=1e-5)  # phi = 0 is plain CFG
    assert np.isfinite(rescaled).all() and np.abs(rescaled - plain).max() > 1e-4
    assert not pipe.transformer._forward_hooks  # the hook is gone after the call
    without_cfg = dict(kw, negative_prompt=None) if kind == "flux" else dict(kw, guidance_scale=1.0)
    np.testing.assert_array_equal(generate_with_guidance_rescale(pipe, 0.7, **sd_kwargs(**without_cfg)).images,
                                  pipe(**sd_kwargs(**without_cfg)).images)


def test_unknown_pipeline_is_refused():
    class Other:
        pass

    with pytest.raises(ValueError, match="Other is not supported"):
        generate_with_guidance_rescale(Other(), 0.7)
