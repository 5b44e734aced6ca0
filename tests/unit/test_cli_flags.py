"""The training scripts' command line: no abbreviated flags, help for every flag with its default and choices,
``--config`` keys and values checked by the same parser, and errors that stay the last line the user reads --
run directly (exit status 2) and under ``accelerate launch`` (whose additions the ``--help`` epilog names)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_ztsnr.training import flow, unet

REPO = Path(__file__).resolve().parents[2]
BASE = ["--pretrained_model_name_or_path", "model", "--train_data_dir", "data"]
PARSERS = {"unet": unet.build_parser, "flow": flow.build_parser}
PARSE = {"unet": unet.parse_args, "flow": flow.parse_args}
# flags whose value is one of a fixed set: argparse lists the set in --help and refuses anything else
ENUM_FLAGS = {
    "unet": ["lr_scheduler", "mixed_precision", "report_to", "prediction_type", "objective", "weighting_scheme",
             "precondition_outputs", "export_dtype"],
    "flow": ["lr_scheduler", "mixed_precision", "report_to", "weighting_scheme", "precondition_outputs"],
}


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def usage_error(parse, argv, capsys) -> tuple[int | str, str]:
    """(exit code, the one-line message) of a refused command line, whether argparse or our checks refused it."""
    with pytest.raises(SystemExit) as caught:
        parse(argv)
    err = capsys.readouterr().err.strip()
    code = caught.value.code
    return code, err.splitlines()[-1] if code == 2 else str(code)


# --- flags ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", PARSE)
@pytest.mark.parametrize("typo,meant", [("--learning_rat", "--learning_rate"), ("--pretrained_model", None),
                                        ("--max_train_step", "--max_train_steps"), ("--rnak", "--rank")])
def test_a_shortened_or_misspelt_flag_is_refused_naming_the_flag_meant(script, typo, meant, capsys):
    code, line = usage_error(PARSE[script], [*BASE, typo, "3"], capsys)
    assert code == 2 and f"error: unrecognized arguments: {typo} 3" in line, line
    if meant:
        assert line.endswith(f"(did you mean {meant}?)"), line


def test_several_unknown_flags_are_named_together(capsys):
    _, line = usage_error(unet.parse_args, [*BASE, "--learning_rat=1e-4", "--snr_gama", "5"], capsys)
    assert "did you mean --learning_rate for --learning_rat, --snr_gamma for --snr_gama?" in line


@pytest.mark.parametrize("script", PARSERS)
def test_every_flag_has_help_text(script):
    parser = PARSERS[script]()
    assert not parser.allow_abbrev
    missing = [a.option_strings[0] for a in options(parser) if not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("script", PARSERS)
def test_help_shows_every_set_default(script):
    parser = PARSERS[script]()
    formatter = parser._get_formatter()
    for action in options(parser):
        if action.default is None or action.default is False or action.dest == "help":
            continue  # unset / off: the help text says what happens then
        shown = formatter._expand_help(action)
        if "default" not in (action.help or ""):
            assert shown.endswith(f"(default: {action.default})"), (action.dest, shown)
    text = " ".join(parser.format_help().split())
    assert "--learning_rate LEARNING_RATE AdamW learning rate. (default: 0.0001)" in text


@pytest.mark.parametrize("script", PARSERS)
def test_enum_flags_list_their_choices(script, capsys):
    parser = PARSERS[script]()
    text = " ".join(parser.format_help().split())
    for dest in ENUM_FLAGS[script]:
        action = next(a for a in options(parser) if a.dest == dest)
        assert action.choices, dest
        assert f"--{dest} {{{','.join(map(str, action.choices))}}}" in text, dest
    code, line = usage_error(PARSE[script], [*BASE, "--report_to", "wandb"], capsys)
    assert code == 2 and "--report_to: invalid choice: 'wandb'" in line and "tensorboard" in line, line


@pytest.mark.parametrize("script", PARSERS)
def test_help_epilog_says_what_accelerate_adds_and_how_to_avoid_it(script):
    text = " ".join(PARSERS[script]().format_help().split())
    for fragment in ("one line on stderr and exit status 2", "subprocess.CalledProcessError",
                     "`accelerate launch -q ...` (--quiet) leaves our line last and exits with status 1",
                     "torchrun prints its ChildFailedError report", "examples/configs/"):
        assert fragment in text, fragment


# --- --config files -------------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("key,meant", [("learning_rat", "learning_rate"), ("learning-rate", "learning_rate"),
                                       ("zero_terminal", "zero_terminal_snr"), ("prediction", "prediction_type")])
def test_config_unknown_or_shortened_keys_name_the_closest_flag(tmp_path, key, meant):
    config = write(tmp_path / "run.yaml", f"pretrained_model_name_or_path: m\ntrain_data_dir: d\n{key}: 1\n")
    with pytest.raises(SystemExit) as caught:
        unet.parse_args(["--config", str(config)])
    message = str(caught.value.code)
    assert message == (f"error: --config {config} has unknown keys ['{key}'] (did you mean {meant}?); keys are "
                       "the flags' names without the leading --.")


def test_config_values_are_checked_like_typed_flags_and_errors_name_the_file(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", "pretrained_model_name_or_path: m\ntrain_data_dir: d\n"
                                          "prediction_type: v_predictoin\n")
    code, line = usage_error(unet.parse_args, ["--config", str(config)], capsys)
    assert code == 2 and "--prediction_type: invalid choice: 'v_predictoin'" in line
    assert line.endswith(f"(in --config {config})"), line
    write(config, "pretrained_model_name_or_path: m\ntrain_data_dir: d\nrank: four\n")
    _, line = usage_error(unet.parse_args, ["--config", str(config)], capsys)
    assert "--rank: invalid int value: 'four'" in line and str(config) in line
    write(config, "pretrained_model_name_or_path: m\ntrain_data_dir: d\nzero_terminal_snr: 1\n")
    _, message = usage_error(unet.parse_args, ["--config", str(config)], capsys)
    assert "zero_terminal_snr is an on/off flag, give true or false (got 1)" in message
    write(config, "pretrained_model_name_or_path: m\ntrain_data_dir: [d, e]\n")
    _, message = usage_error(unet.parse_args, ["--config", str(config)], capsys)
    assert "train_data_dir takes one value (got ['d', 'e'])" in message
    write(config, "rank: [1\n")
    _, message = usage_error(unet.parse_args, ["--config", str(config)], capsys)
    assert message.startswith(f"error: --config {config} is not valid YAML (") and "\n" not in message


def test_config_values_convert_like_flags_and_the_command_line_wins(tmp_path):
    config = write(tmp_path / "run.json", '{"pretrained_model_name_or_path": "m", "train_data_dir": "d", '
                                          '"learning_rate": "1e-4", "logit_mean": -0.5, "rank": 8, '
                                          '"center_crop": true, "random_flip": false, "revision": null}')
    args = flow.parse_args(["--config", str(config), "--rank", "16"])
    assert args.learning_rate == 1e-4 and args.logit_mean == -0.5 and args.rank == 16
    assert args.center_crop is True and args.random_flip is False and args.revision is None


# --- the scripts as commands ----------------------------------------------------------------------------------


def launch(*cmd: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)


def test_errors_are_the_last_line_directly_and_under_accelerate_launch_quiet():
    """Three commands at once (each mostly imports torch and diffusers): the script itself, and under accelerate's
    single-process launcher with and without -q."""
    bad = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--learning_rat", "1e-4"]
    script = "train_scripts/train_lora_unet.py"
    accelerate = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = {"direct": launch(script, *bad), "quiet": launch(*accelerate, "-q", script, *bad),
            "loud": launch(*accelerate, script, *bad)}
    done = {name: (p.communicate(timeout=300), p.returncode) for name, p in runs.items()}
    ours = ("train_lora_unet.py: error: unrecognized arguments: --learning_rat 1e-4 (did you mean "
            "--learning_rate?)")
    (_, err), code = done["direct"]
    assert code == 2 and err.strip().splitlines()[-1] == ours, err
    assert len(err.strip().splitlines()) == 2 and err.startswith("usage: train_lora_unet.py [-h] [--config FILE]")
    (_, err), code = done["quiet"]
    assert code == 1 and err.strip().splitlines()[-1] == ours, err  # -q: accelerate exits 1 and adds nothing
    assert "Traceback" not in err
    (_, err), code = done["loud"]
    lines = err.strip().splitlines()
    assert code == 1 and ours in lines and lines[-1].startswith("subprocess.CalledProcessError: Command "), err
    assert "returned non-zero exit status 2." in lines[-1]
