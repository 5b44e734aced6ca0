"""probe-conversion: x0 at the first step ignores the noise exactly when the model is converted, and the verdict."""

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.probe import ProbeResult, data_brightness_range, first_step_x0, probe, verdict
from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.testing.demo_data import make_demo_dataset
from diffusers_ztsnr.testing.tiny import make_tiny_pipeline


def converted_pipeline(mean: float):
    """A tiny SD 1.5-style pipeline whose UNet is the exact v-prediction model of data that is the constant latent
    ``mean``, sampled with our scheduler on the zero-terminal-SNR schedule."""
    pipe = make_tiny_pipeline("sd15")
    pipe.scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="logsnr")
    schedule = VPSchedule.from_scheduler_config(dict(pipe.scheduler.config))

    def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[:1]
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(t))
        x0 = torch.full_like(sample, mean)
        eps = (sample - alpha * x0) / sigma
        v = alpha * eps - sigma * x0
        return UNet2DConditionOutput(sample=v) if return_dict else (v,)

    pipe.unet.forward = forward
    return pipe


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_exact_converted_model_ignores_the_noise_and_an_unconverted_one_follows_it(seed):
    spread, share = first_step_x0(converted_pipeline(0.3), "a dark scene", draws=6, resolution=32, seed=seed)
    assert spread < 1e-6 and share < 1e-10  # x0 = -v = the mean at SNR 0, whatever the noise
    base_spread, base_share = first_step_x0(make_tiny_pipeline("sd15"), "a dark scene", draws=6, resolution=32,
                                            seed=seed)
    assert base_share > 0.5 and base_spread > 1.0  # epsilon at SNR 0.0047: x0 = (x - sigma eps) / alpha
    random_v = make_tiny_pipeline("sd15")  # an untrained network read as a v model on the ZTSNR schedule
    random_v.scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(
        random_v.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert first_step_x0(random_v, "a dark scene", draws=6, resolution=32, seed=seed)[1] > 0.2


def test_probe_reports_every_prompt_and_the_verdict_follows_the_thresholds(tmp_path):
    prompts = ("a dark scene", "a bright scene")
    converted = probe(converted_pipeline(0.3), prompts, draws=4, resolution=32, steps=3, images=1)
    base = probe(make_tiny_pipeline("sd15"), prompts, draws=4, resolution=32, steps=3, images=1)
    assert set(converted.noise_share) == set(converted.brightness) == set(prompts)
    assert all(0 <= b <= 1 for b in converted.brightness.values())
    ok, lines = verdict(converted, base)
    assert ok and "of the base's" in lines[0]
    assert not verdict(base, base)[0]  # an unchanged model is not converted
    wide = ProbeResult({"d": 0.0, "b": 0.0}, {"d": 0.0, "b": 0.0}, {"d": 0.1, "b": 0.9})
    narrow = ProbeResult({"d": 0.0, "b": 0.0}, {"d": 0.0, "b": 0.0}, {"d": 0.45, "b": 0.55})
    assert verdict(wide, base, data_range=0.8)[0] and not verdict(narrow, base, data_range=0.8)[0]
    assert "covers 13%" in verdict(narrow, base, data_range=0.8)[1][1]  # 0.55 - 0.45 of 0.8


def test_the_data_range_is_the_5th_to_95th_percentile_of_image_brightness(tmp_path):
    folder = make_demo_dataset(tmp_path / "data", num_images=20, size=16)
    assert 0.2 < data_brightness_range(folder) < 0.95  # the demo's backgrounds run from 0.03 to 0.97
    (tmp_path / "data" / "missing").mkdir()
    with pytest.raises(ValueError, match=r"--data .*: no \.png / \.jpg / \.jpeg / \.webp images in it"):
        data_brightness_range(tmp_path / "data" / "missing")
