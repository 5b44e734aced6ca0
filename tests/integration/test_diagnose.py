"""`diffusers-ztsnr inspect` on the real configs, and the lighting curse computed exactly."""

import math

import pytest
from safetensors.torch import save_file

from diffusers_ztsnr.cli import main
from diffusers_ztsnr.diagnose import inspect_scheduler_config, load_scheduler_config
from diffusers_ztsnr.lighting import CONFIGURATIONS, brightness_data, collapse_limit, lighting_table
from diffusers_ztsnr.markers import with_markers
from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.testing.released_schedulers import SCHEDULER_CONFIGS_DIR

CONFIGS = SCHEDULER_CONFIGS_DIR
SD_TERMINAL_SNR = 0.0046819  # alphabar_999 / (1 - alphabar_999) of SD's scaled_linear schedule


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_inspect_vp_configs(name):
    report = inspect_scheduler_config(load_scheduler_config(CONFIGS / f"{name}.json"), 10)
    assert report.terminal_snr == pytest.approx(SD_TERMINAL_SNR, rel=1e-3)
    assert report.sigma_max == pytest.approx(1 / math.sqrt(SD_TERMINAL_SNR), rel=1e-3)
    assert not report.is_zero_terminal_snr
    assert report.timesteps == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]  # leading + steps_offset 1
    assert any("lighting curse" in w for w in report.warnings)
    assert report.prediction_type == ("v_prediction" if name == "sd21" else "epsilon")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_inspect_flow_configs(name):
    report = inspect_scheduler_config(load_scheduler_config(CONFIGS / f"{name}.json"), 4)
    assert report.terminal_snr == 0.0 and report.sigma_max == math.inf and report.is_zero_terminal_snr
    assert report.prediction_type == "flow_prediction" and report.warnings == []
    assert report.timesteps[0] == 1000.0


def test_inspect_warns_about_known_bad_combinations(tmp_path):
    sd15 = load_scheduler_config(CONFIGS / "sd15.json")
    eps_zsnr = inspect_scheduler_config(dict(sd15, _class_name="DDIMScheduler", rescale_betas_zero_snr=True,
                                             timestep_spacing="trailing"), 4)
    assert eps_zsnr.is_zero_terminal_snr and eps_zsnr.terminal_snr == 0.0 and eps_zsnr.sigma_max == math.inf
    assert any("epsilon prediction on a zero-terminal-SNR schedule" in w for w in eps_zsnr.warnings)
    heun = inspect_scheduler_config(dict(sd15, _class_name="HeunDiscreteScheduler", rescale_betas_zero_snr=True), 4)
    assert any("HeunDiscreteScheduler has no such option and silently ignores it" in w for w in heun.warnings)
    assert not heun.is_zero_terminal_snr  # what Heun really samples
    leading = inspect_scheduler_config(dict(sd15, _class_name="DDIMScheduler", rescale_betas_zero_snr=True,
                                            prediction_type="v_prediction"), 4)
    assert any("starts at t = 751, not at the zero-SNR" in w for w in leading.warnings)
    lora = tmp_path / "lora.safetensors"
    save_file(with_markers({"w": __import__("torch").zeros(1)}, "v_prediction", True), lora)
    assert main(["inspect", str(CONFIGS / "sd15.json"), "--lora", str(lora), "--steps", "4"]) == 0


def test_inspect_cli_prints_and_plots(tmp_path, capsys):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text((CONFIGS / "sd15.json").read_text())
    lora = tmp_path / "lora.safetensors"
    save_file(with_markers({"w": __import__("torch").zeros(1)}, "v_prediction", True), lora)
    assert main(["inspect", str(tmp_path), "--steps", "5", "--spacing", "trailing", "--lora", str(lora),
                 "--plot", str(tmp_path / "snr.png")]) == 0
    out = capsys.readouterr().out
    assert "terminal SNR:       0.00468192" in out and "[999, 799, 599, 399, 199]" in out
    assert "the LoRA's markers say v_prediction, but this scheduler samples epsilon" in out
    assert "pass rescale_betas_zero_snr=True" in out
    assert (tmp_path / "snr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        load_scheduler_config(tmp_path / "nowhere")


# Monte-Carlo tolerance of a std ratio from 4000 samples: 1/sqrt(2*4000) = 1.1%; 4 standard errors.
TOL = 4 / math.sqrt(2 * 4000)


def test_lighting_curse_exact_numbers():
    rows = {r.label: r.ratios for r in lighting_table((50, 100))}
    labels = list(CONFIGURATIONS)
    data = brightness_data()
    schedule = VPSchedule.from_config(1000, 0.00085, 0.012, "scaled_linear")
    # SD1.5 as shipped: 50 leading steps start at t = 981; the ODE maps N(0, 1) to the closed-form collapse
    limit = collapse_limit(*(float(v) for v in schedule.alpha_sigma(981)), data)
    assert limit < 0.4  # brightness std collapses to under 40% of the data's
    assert rows[labels[0]][50] == pytest.approx(limit, abs=TOL + 0.01)  # + first-order discretisation
    trailing_limit = collapse_limit(*(float(v) for v in schedule.alpha_sigma(999)), data)
    assert rows[labels[1]][100] == pytest.approx(trailing_limit, abs=TOL + 0.01)
    # a zero-SNR start has no such limit: our default recovers the data's brightness std
    assert rows[labels[3]][50] == pytest.approx(1.0, abs=TOL + 0.01)
    assert rows[labels[2]][100] > rows[labels[2]][50] > 3 * rows[labels[0]][50] / 2  # ZTSNR + trailing converges


def test_lighting_cli(tmp_path, capsys):
    assert main(["lighting", "--output_dir", str(tmp_path), "--steps", "5,10"]) == 0
    assert "SD default, epsilon, leading" in (tmp_path / "lighting.md").read_text()
    assert (tmp_path / "lighting.png").stat().st_size > 1000
    assert "brightness std" in capsys.readouterr().out
