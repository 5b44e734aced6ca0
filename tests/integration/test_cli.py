"""The command line helpers (the demo has tests/campaigns/test_demo.py)."""

import json

import pytest
from safetensors.torch import save_file

from diffusers_ztsnr.cli import main
from diffusers_ztsnr.markers import with_markers


def test_make_tiny_and_checkpoint_settings(tmp_path, capsys):
    assert main(["make-tiny", "sd15", str(tmp_path / "sd15")]) == 0
    assert (tmp_path / "sd15" / "model_index.json").is_file()
    with pytest.raises(SystemExit):
        main(["make-tiny", "sd9", str(tmp_path / "x")])
    assert "unknown kind 'sd9'" in capsys.readouterr().err
    save_file(with_markers({"w": __import__("torch").zeros(1)}, "v_prediction", True), tmp_path / "m.safetensors")
    capsys.readouterr()
    assert main(["checkpoint-settings", str(tmp_path / "m.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out) == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}


def test_every_command_and_flag_has_help_and_no_flag_is_abbreviated(capsys):
    import argparse

    from diffusers_ztsnr.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"demo", "inspect", "lighting", "grade", "export-checkpoint", "checkpoint-settings",
                                     "make-tiny", "audit-weights", "probe-conversion"}
    assert all(name in parser.description for name in commands.choices)
    for name, sub in commands.choices.items():
        assert sub.allow_abbrev is False and sub.description, name
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}"
    with pytest.raises(SystemExit):
        main(["demo", "--train_step", "3"])
    assert "unrecognized arguments: --train_step" in capsys.readouterr().err


def test_audit_weights_flags_min_snr_with_a_v_target_and_draws_the_plot(tmp_path, capsys):
    assert main(["make-tiny", "sd15", str(tmp_path / "sd15")]) == 0
    capsys.readouterr()
    flags = ["--pretrained_model_name_or_path", str(tmp_path / "sd15"), "--prediction_type", "v_prediction",
             "--zero_terminal_snr"]
    assert main(["audit-weights", "--plot", str(tmp_path / "w.png"), "--", *flags, "--snr_gamma", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train_lora_unet.py: effective loss weight in x0 space per log-SNR bin")
    assert "SNR 0 (pure noise)" in out and "warning: the effective x0 weight at SNR 0 is zero" in out
    assert (tmp_path / "w.png").stat().st_size > 1000
    assert main(["audit-weights", "--", *flags, "--debiased_estimation"]) == 0
    assert "SNR 0 is zero" not in capsys.readouterr().out


def test_probe_conversion_reports_each_prompt_and_calls_an_untrained_lora_not_converted(tmp_path, capsys):
    from diffusers_ztsnr.testing.demo_data import make_demo_dataset
    from diffusers_ztsnr.training.unet import main as train

    assert main(["make-tiny", "sd15", str(tmp_path / "sd15")]) == 0
    data = make_demo_dataset(tmp_path / "data", num_images=4, size=32)
    train(["--pretrained_model_name_or_path", str(tmp_path / "sd15"), "--train_data_dir", str(data),
           "--resolution", "32", "--center_crop", "--max_train_steps", "1", "--report_to", "none",
           "--prediction_type", "v_prediction", "--zero_terminal_snr", "--output_dir", str(tmp_path / "lora")])
    capsys.readouterr()
    assert main(["probe-conversion", str(tmp_path / "sd15"), str(tmp_path / "lora"), "--data", str(data),
                 "--resolution", "32", "--steps", "2", "--draws", "3", "--images", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:3]] == ["'a dark scene at night'", "'a scene in grey light'",
                                                        "'a bright scene in daylight'"]
    assert out[3].startswith("x0 noise share at the first step: converted ")
    assert out[4].startswith("generated brightness range: converted ")
    assert out[-1] == "verdict: not converted"  # one step of training converts nothing
