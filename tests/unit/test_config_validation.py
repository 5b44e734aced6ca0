"""Every training flag and CLI argument with an invalid value or an impossible combination: a clear error that
names the flag, the value given and what is allowed (table-driven; parsing only, no model is loaded).

Scheduler constructors and ``set_timesteps`` have their own tables in ``tests/unit/test_schedulers.py``
(``BAD_CONSTRUCTIONS``, config keys a class cannot honour, bad ``set_timesteps`` arguments); model-dependent
combinations (``--guidance_scale`` on a model without guidance embedding, ``--lora_layers`` naming no module, an
epsilon target with ZTSNR, a UNet pipeline given to the flow script) are in ``tests/integration/test_train_*.py``.
"""

import pytest

from diffusers_ztsnr.cli import main as cli_main
from diffusers_ztsnr.training.flow import parse_args as flow_args
from diffusers_ztsnr.training.unet import parse_args as unet_args

BASE = ["--pretrained_model_name_or_path", "model", "--train_data_dir", "data"]

# (flags, message fragments that must all appear): each names the flag, the value and what is allowed
COMMON = [
    (["--train_batch_size", "0"], ["--train_batch_size must be >= 1 (got 0)"]),
    (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps must be >= 1 (got 0)"]),
    (["--resolution", "0"], ["--resolution must be >= 1 (got 0)"]),
    (["--resolution", "100"], ["--resolution must be a multiple of", "got 100"]),
    (["--checkpointing_steps", "0"], ["--checkpointing_steps must be >= 1 (got 0)"]),
    (["--validation_steps", "-1"], ["--validation_steps must be >= 1 (got -1)"]),
    (["--num_train_epochs", "0"], ["--num_train_epochs must be >= 1 (got 0)"]),
    (["--validation_inference_steps", "0"], ["--validation_inference_steps must be >= 1 (got 0)"]),
    (["--num_validation_images", "0"], ["--num_validation_images must be >= 1 (got 0)"]),
    (["--rank", "0"], ["--rank must be >= 1 (got 0)"]),
    (["--max_consecutive_bad_losses", "0"], ["--max_consecutive_bad_losses must be >= 1 (got 0)"]),
    (["--max_train_steps", "0"], ["--max_train_steps must be >= 1 (got 0)"]),
    (["--max_train_samples", "0"], ["--max_train_samples must be >= 1 (got 0)"]),
    (["--checkpoints_total_limit", "0"], ["--checkpoints_total_limit must be >= 1 (got 0)"]),
    (["--lr_warmup_steps", "-5"], ["--lr_warmup_steps must be >= 0 (got -5)"]),
    (["--dataloader_num_workers", "-1"], ["--dataloader_num_workers must be >= 0 (got -1)"]),
    (["--adam_weight_decay", "-0.1"], ["--adam_weight_decay must be >= 0", "(got -0.1; 1e-2 is usual)"]),
    (["--adam_weight_decay", "2e4"], ["--learning_rate x --adam_weight_decay < 1 (got 20000"]),
    (["--adam_epsilon=-1e-8"], ["--adam_epsilon must lie in (0, 1] (got -1e-08"]),
    (["--adam_epsilon", "0"], ["--adam_epsilon must lie in (0, 1] (got 0;", "divides by zero"]),
    (["--adam_beta1", "1.0"], ["--adam_beta1 must lie in [0, 1) (got 1.0)"]),
    (["--adam_beta2", "-0.5"], ["--adam_beta2 must lie in [0, 1) (got -0.5)"]),
    (["--max_grad_norm", "0"], ["--max_grad_norm must be a finite number > 0 (got 0.0)"]),
    (["--max_grad_norm", "inf"], ["--max_grad_norm must be a finite number > 0 (got inf)"]),
    (["--learning_rate=-1e-4"], ["--learning_rate must lie in (0, 1] (got -0.0001"]),
    (["--learning_rate", "nan"], ["--learning_rate must lie in (0, 1] (got nan"]),
    (["--learning_rate", "1e38"], ["--learning_rate must lie in (0, 1] (got 1e+38; LoRA fine-tuning usually"]),
    (["--learning_rate", "1e4"], ["--learning_rate must lie in (0, 1] (got 10000"]),
    (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
     ["--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would resume"]),
    (["--lora_alpha", "0"], ["--lora_alpha must be > 0 (got 0.0)"]),
    (["--ema_decay", "1.5"], ["--ema_decay must lie in (0, 1) (got 1.5)"]),
    (["--caption_dropout", "1.5"], ["--caption_dropout is a probability: it must lie in [0, 1] (got 1.5)"]),
    (["--caption_dropout=-0.1"], ["--caption_dropout is a probability: it must lie in [0, 1] (got -0.1)"]),
    (["--report_to", "wandb"], ["--report_to: invalid choice: 'wandb'", "tensorboard", "none"]),
    (["--cache_latents", "--train_text_encoder", "--center_crop"],
     ["--cache_latents", "cannot train the text encoder"]),
    (["--cache_latents"], ["--cache_latents freezes the random crop: add --center_crop"]),
    (["--cache_latents", "--bucketing"], ["--cache_latents freezes the random crop: add --center_crop"]),
    (["--lr_scheduler", "cosine_annealing"], ["--lr_scheduler: invalid choice: 'cosine_annealing'", "constant"]),
    (["--mixed_precision", "fp8"], ["--mixed_precision: invalid choice: 'fp8'", "bf16"]),
    (["--rank", "four"], ["--rank: invalid int value: 'four'"]),
    (["--learning_rate", "fast"], ["--learning_rate: invalid float value: 'fast'"]),
]
# these replace BASE entirely
MISSING = [
    (["--pretrained_model_name_or_path", "m"], ["pass exactly one of --train_data_dir and --dataset_name"]),
    (["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--dataset_name", "x"],
     ["pass exactly one of --train_data_dir and --dataset_name"]),
    (["--train_data_dir", "d"], ["--pretrained_model_name_or_path is required"]),
]
UNET_ONLY = [
    (["--prediction_type", "x0"], ["--prediction_type: invalid choice: 'x0'", "v_prediction"]),
    (["--objective", "rectified"], ["--objective: invalid choice: 'rectified'", "flow"]),
    (["--objective", "flow"], ["--objective flow", "add --zero_terminal_snr"]),
    (["--objective", "flow", "--zero_terminal_snr", "--snr_gamma", "5"], ["--snr_gamma", "use --weighting_scheme"]),
    (["--precondition_outputs", "1"], ["--precondition_outputs", "add --objective flow"]),
    (["--weighting_scheme", "sigma_sqrt"], ["--weighting_scheme", "add --objective flow"]),
    (["--objective", "flow", "--zero_terminal_snr", "--logit_std", "-1"], ["logit_std > 0", "logit_std=-1.0"]),
    (["--objective", "flow", "--zero_terminal_snr", "--weighting_scheme", "mode", "--mode_scale", "5"],
     ["mode_scale must lie in [-1, 2/(pi-2)", "got 5.0"]),
]
FLOW_ONLY = [
    (["--weighting_scheme", "uniform"], ["--weighting_scheme: invalid choice: 'uniform'", "logit_normal"]),
    (["--weighting_scheme", "mode", "--mode_scale", "2"], ["mode_scale must lie in [-1, 2/(pi-2)", "got 2.0"]),
    (["--logit_std", "0"], ["logit_normal' needs a finite logit_mean and logit_std > 0", "logit_std=0.0"]),
    (["--logit_mean", "inf"], ["logit_std > 0", "logit_mean=inf"]),
    (["--timestep_shift", "0"], ["--timestep_shift must be 'auto', 'dynamic' or a number > 0 (got '0')"]),
    (["--timestep_shift", "static"], ["--timestep_shift must be 'auto', 'dynamic' or a number > 0 (got 'static')"]),
    (["--resolution", "40"], ["--resolution must be a multiple of 16", "got 40"]),
    (["--precondition_outputs", "2"], ["--precondition_outputs: invalid choice: 2 (choose from 0, 1)"]),
    (["--max_sequence_length", "0"], ["--max_sequence_length must be >= 1 (got 0)"]),
    (["--guidance_scale", "-1"], ["--guidance_scale must be >= 0 (got -1.0)"]),
]
CASES = ([("unet", *c) for c in COMMON + MISSING + UNET_ONLY] + [("flow", *c) for c in COMMON + MISSING + FLOW_ONLY])


def message_of(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        parse(argv)
    return f"{caught.value} {capsys.readouterr().err}"  # our checks raise the text; argparse prints its own


@pytest.mark.parametrize("script,flags,fragments", CASES, ids=lambda v: v if isinstance(v, str) else " ".join(v)[:50])
def test_every_bad_flag_names_flag_value_and_what_is_allowed(script, flags, fragments, capsys):
    parse = unet_args if script == "unet" else flow_args
    argv = flags if (flags, fragments) in MISSING else BASE + flags
    text = message_of(parse, argv, capsys)
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_several_problems_are_reported_at_once(capsys):
    text = message_of(unet_args, [*BASE, "--rank", "0", "--learning_rate", "0", "--train_batch_size", "0"], capsys)
    assert "--rank must be >= 1 (got 0)" in text and "--learning_rate must lie in (0, 1]" in text
    assert "--train_batch_size must be >= 1" in text


def test_config_file_keys_are_checked_like_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("pretrained_model_name_or_path: m\ntrain_data_dir: d\nrank: 0\n")
    assert "--rank must be >= 1 (got 0)" in message_of(unet_args, ["--config", str(config)], capsys)
    config.write_text("- not\n- a mapping\n")
    assert "must hold a mapping of flag names to values" in message_of(flow_args, ["--config", str(config)], capsys)
    assert "does not exist" in message_of(flow_args, ["--config", str(tmp_path / "missing.yaml")], capsys)


CLI = [
    (["demo", "--train_steps", "0"], "--train_steps must be >= 1 (got 0)"),
    (["demo", "--steps", "-2"], "--steps must be >= 1 (got -2)"),
    (["demo", "--num_images", "0"], "--num_images must be >= 1 (got 0)"),
    (["make-tiny", "sd99", "out"], "unknown kind 'sd99'; allowed: sd15, sdxl, sd3, flux"),
    (["lighting", "--steps", "a,b"], "invalid value 'a,b': comma-separated integers >= 1"),
    (["lighting", "--steps", "10,0"], "invalid value '10,0': every step count must be >= 1"),
    (["inspect", "no/such/folder"], "no scheduler config at no/such/folder"),
    (["inspect", "diffusers_ztsnr/testing/scheduler_configs/sd15.json", "--steps", "0"],
     "num_inference_steps=0 must lie in [1, num_train_timesteps=1000]"),
    (["inspect", "diffusers_ztsnr/testing/scheduler_configs/sd15.json", "--spacing", "even"],
     "spacing='even'; allowed: linspace, leading, trailing, logsnr, logsnr_warped, flow"),
    (["checkpoint-settings", "missing.safetensors"], "no checkpoint file at missing.safetensors"),
    (["train"], "invalid choice: 'train'"),
]


@pytest.mark.parametrize("argv,fragment", CLI, ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None)
def test_cli_bad_arguments_are_one_line_errors(argv, fragment, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    with pytest.raises(SystemExit) as caught:
        cli_main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and fragment in err, err
    assert "Traceback" not in err
