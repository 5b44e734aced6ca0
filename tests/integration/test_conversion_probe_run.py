"""The conversion probe at the end of a zero-terminal-SNR run: it probes the files the run wrote, on a fresh copy
of the base, and its numbers reach conversion_probe.json and the model card; off, or not applicable, it is absent."""

import json

import pytest

from diffusers_ztsnr.probe import BRIGHTNESS_COVERAGE, DEFAULT_PROMPTS, NOISE_SHARE_RATIO
from diffusers_ztsnr.training.conversion_probe import skip_reason
from diffusers_ztsnr.training.unet import main, parse_args
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("probe-run"), "sd15")


def argv(assets, out, *extra):
    return ["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--train_batch_size", "4", "--max_train_steps", "2", "--center_crop",
            "--output_dir", str(out), "--learning_rate", "1e-3", "--rank", "4", "--report_to", "none",
            "--prediction_type", "v_prediction", *extra]


def test_a_ztsnr_run_probes_its_own_files_and_writes_the_numbers_to_the_card(assets, tmp_path):
    out = tmp_path / "run"
    result = main(argv(assets, out, "--zero_terminal_snr"))
    numbers = json.loads((out / "conversion_probe.json").read_text())
    assert result["conversion_probe"] == out / "conversion_probe.json"
    assert set(numbers["base"]["noise_share"]) == set(DEFAULT_PROMPTS)
    # the tiny base is an epsilon model: its x0 at the first step (SNR 0.0047) follows the noise
    assert min(numbers["base"]["noise_share"].values()) > 0.5
    assert 0 < numbers["data_range"] <= 1  # the training folder is local: its brightness range is measured
    share = sum(numbers["converted"]["noise_share"].values()) / len(DEFAULT_PROMPTS)
    base_share = sum(numbers["base"]["noise_share"].values()) / len(DEFAULT_PROMPTS)
    bright = numbers["converted"]["brightness"].values()
    coverage = (max(bright) - min(bright)) / numbers["data_range"]
    assert numbers["converted_ok"] == (share / base_share < NOISE_SHARE_RATIO and coverage >= BRIGHTNESS_COVERAGE)
    card = (out / "README.md").read_text()
    assert "## Conversion probe" in card
    verdict = "**converted**" if numbers["converted_ok"] else "**not converted**"
    assert verdict in card and f"{base_share:.3f}" in card


def test_off_and_runs_without_zero_terminal_snr_write_no_probe(assets, tmp_path):
    main(argv(assets, tmp_path / "off", "--zero_terminal_snr", "--conversion_probe", "off"))
    main(argv(assets, tmp_path / "plain"))
    for name in ("off", "plain"):
        assert not (tmp_path / name / "conversion_probe.json").exists()
        assert "## Conversion probe" not in (tmp_path / name / "README.md").read_text()


@pytest.mark.parametrize("flags,family,expected", [
    ([], "sd1", "off"),
    (["--zero_terminal_snr"], "sd1", None),
    (["--zero_terminal_snr"], "sd2", None),
    (["--zero_terminal_snr"], "sdxl", "the probe reads SD 1.x / 2.x pipelines, not sdxl"),
    (["--zero_terminal_snr", "--adapter", "lokr"], "sd1", "diffusers cannot load --adapter lokr files"),
    (["--zero_terminal_snr", "--conversion_probe", "off"], "sd1", "off"),
])
def test_when_the_probe_runs(tmp_path, flags, family, expected):
    args = parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path),
                       "--output_dir", str(tmp_path / "o"), "--prediction_type", "v_prediction", *flags])
    assert skip_reason(args, family) == expected
