"""``diffusers-ztsnr grade``: named schedules built by their formulas, graded exactly on the oracle."""

import math
import re

import numpy as np
import pytest
import torch

from diffusers_ztsnr import ZTSNRDPMSolverMultistepScheduler
from diffusers_ztsnr.cli import main
from diffusers_ztsnr.grade import grade, named_sigmas, sd_schedule

SD_SIGMA_MAX, SD_SIGMA_MIN = 14.6146, 0.0292  # sigma/alpha at SD's t = 999 and t = 0


def test_karras_and_exponential_follow_their_formulas_on_sds_schedule():
    karras = np.array(named_sigmas("karras", 10, zero_terminal_snr=False)[:-1])
    assert karras[0] == pytest.approx(SD_SIGMA_MAX, rel=1e-4) and karras[-1] == pytest.approx(SD_SIGMA_MIN, rel=1e-2)
    np.testing.assert_allclose(np.diff(karras ** (1 / 7)), np.diff(karras ** (1 / 7))[0], rtol=1e-9)  # rho = 7
    exponential = np.array(named_sigmas("exponential", 10, zero_terminal_snr=False)[:-1])
    np.testing.assert_allclose(np.diff(np.log(exponential)), np.diff(np.log(exponential))[0], rtol=1e-9)


def test_timestep_based_schedules_read_the_schedules_table():
    table = sd_schedule(False)
    simple = named_sigmas("simple", 10, zero_terminal_snr=False)
    assert simple[0] == pytest.approx(SD_SIGMA_MAX, rel=1e-4) and simple[-1] == 0.0 and len(simple) == 11
    t = 999 - 100 * 9  # the last of every 100th timestep from the top
    alpha = float(table.alpha(torch.tensor(float(t), dtype=torch.float64)))
    assert simple[-2] == pytest.approx(math.sqrt(1 - alpha**2) / alpha, rel=1e-9)
    sgm = named_sigmas("sgm_uniform", 10)
    assert all(a > b for a, b in zip(sgm[:-1], sgm[1:], strict=True))


def test_zero_terminal_snr_lists_start_at_snr_zero_and_logsnr_is_our_schedulers_grid():
    for name in ("karras", "exponential", "simple", "sgm_uniform", "logsnr"):
        sigmas = named_sigmas(name, 12)
        assert math.isinf(sigmas[0]) and sigmas[-1] == 0.0 and len(sigmas) == 13, name
    scheduler = ZTSNRDPMSolverMultistepScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    scheduler.set_timesteps(12)
    alpha = torch.tensor([level[0] for level in scheduler._levels[:-1]], dtype=torch.float64)
    expected = torch.where(alpha == 0, torch.tensor(math.inf, dtype=torch.float64), (1 - alpha**2).sqrt() / alpha)
    np.testing.assert_allclose(named_sigmas("logsnr", 12)[:-1], expected.numpy(), rtol=1e-9)


def test_grade_measures_the_lighting_curse_and_its_fix():
    curse = grade(named_sigmas("karras", 20, zero_terminal_snr=False), zero_terminal_snr=False)
    fixed = grade(named_sigmas("logsnr", 20))
    assert math.exp(float(curse[0])) < 0.5  # SD's schedule: less than half the brightness std comes out
    assert float(fixed.abs().max()) < 0.03  # every band within 3% on the ZTSNR schedule
    unipc = grade(named_sigmas("logsnr_warped", 20), sampler="unipc")
    assert float(unipc.abs().max()) < 0.01 < float(fixed.abs().max())  # UniPC's defaults: within 1% at 20
    with pytest.raises(ValueError, match="VP spacing"):
        named_sigmas("logsnr_warped", 10, path="flow")
    flow = grade(named_sigmas("logsnr", 10, path="flow"), path="flow")
    assert float(flow.abs().max()) <= 0.15
    assert float(grade(named_sigmas("simple", 10, path="flow"), path="flow").abs().max()) > 0.5


def test_cli_prints_every_band_and_refuses_bad_input(capsys):
    assert main(["grade", "--scheduler", "karras", "--steps", "20", "--no_zero_terminal_snr"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^b[0-7]\b", out, flags=re.M)) == 8 and "brightness kept: 41." in out
    assert main(["grade", "--sigmas", "1,0.5,0.1,0", "--path", "flow", "--sampler", "euler"]) == 0
    for argv in (["grade", "--sigmas", "1,x"], ["grade"], ["grade", "--sigmas", "1,0", "--scheduler", "karras"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "--sigmas" in capsys.readouterr().err
    with pytest.raises(ValueError, match="strictly decreasing"):
        grade([0.5, 1.0, 0.0], path="flow")
