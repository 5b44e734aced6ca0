"""train_lora_unet.py end to end on tiny SD1.5- and SDXL-style models (CPU, seconds per run)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_ztsnr import ZTSNRUniPCMultistepScheduler
from diffusers_ztsnr.markers import scheduler_settings_from_checkpoint
from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.training import objectives
from diffusers_ztsnr.training.unet import main
from tests.train_utils import teardown_reports, tiny_assets, two_process_run, whole_dataset_batch, worker_hook

RES = 32
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("quiet_loading")  # diffusers' and transformers' loading chatter


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("train"), "sd15", "sdxl")


def run(assets, out, *extra, model="sd15", steps=8, res=RES):
    argv = [
        "--pretrained_model_name_or_path", str(assets[model]), "--train_data_dir", str(assets["data"]),
        "--resolution", str(res), "--train_batch_size", "4", "--max_train_steps", str(steps), "--center_crop",
        "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "8", "--report_to", "none",
        "--checkpointing_steps", "1000", *extra,
    ]
    return main(argv)


def fixed_batch_loss(assets, lora_dir, prediction_type, zsnr, draws=16):
    """Loss of the base model (+ LoRA) on the whole dataset under fixed noise and timesteps."""
    pipe = StableDiffusionPipeline.from_pretrained(assets["sd15"], safety_checker=None, requires_safety_checker=False)
    if lora_dir:
        pipe.load_lora_weights(lora_dir)
    batch = whole_dataset_batch(assets["data"])
    schedule = VPSchedule.from_config(1000, 0.00085, 0.012, "scaled_linear", rescale_betas_zero_snr=zsnr)
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _ = pipe.encode_prompt(batch["caption"], "cpu", 1, False)
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (len(latents),), generator=g)
            alpha, sigma = schedule.alpha(t.double()), schedule.sigma(t.double())
            pred = pipe.unet(objectives.noisy_latents(latents, noise, alpha, sigma), t, encoder_hidden_states=embeds)
            target = objectives.training_target(latents, noise, alpha, sigma, prediction_type)
            total += objectives.diffusion_loss(pred.sample, target).item()
    return total / draws


# Learning is asserted where it has converged: 120 steps at lr 1e-2 bring a rank-8 attention LoRA to the plateau this
# tiny random UNet allows (mostly shrinking the random part of its output). Measured fixed-batch loss ratios, seeds 0-2,
# ATen's default and AVX2 kernels, 1 and 2 threads: v + ZTSNR 0.784-0.802, v 0.80-0.84, epsilon 0.889-0.912. After
# 40 steps the same runs stopped anywhere between 0.80 and 0.97 depending on the CPU's floating-point path.
LEARNING_STEPS, LEARNING_SEEDS = 120, (0, 1)


@pytest.mark.parametrize("prediction_type,zsnr,bound", [("epsilon", False, 0.95), ("v_prediction", False, 0.9),
                                                        ("v_prediction", True, 0.9)])
def test_training_lowers_the_loss_on_a_fixed_batch(assets, tmp_path, prediction_type, zsnr, bound):
    extra = ["--prediction_type", prediction_type, "--snr_gamma", "5.0"] + (["--zero_terminal_snr"] if zsnr else [])
    before = fixed_batch_loss(assets, None, prediction_type, zsnr)
    ratios = []
    for seed in LEARNING_SEEDS:  # two data orders and noise streams: no single trajectory decides
        out = tmp_path / f"seed{seed}"
        result = run(assets, out, *extra, "--seed", str(seed), steps=LEARNING_STEPS)
        assert result["global_step"] == LEARNING_STEPS and np.isfinite(result["losses"]).all()
        ratios.append(fixed_batch_loss(assets, out, prediction_type, zsnr) / before)
    assert max(ratios) < bound, ratios


def test_output_folder_loads_where_users_load_things(assets, tmp_path):
    out = tmp_path / "out"
    result = run(assets, out, "--prediction_type", "v_prediction", "--zero_terminal_snr",
                 "--validation_prompt", "a red disc", "--num_validation_images", "2", "--validation_steps", "4",
                 "--validation_inference_steps", "3")
    # the LoRA loads into the base pipeline and changes its output
    pipe = StableDiffusionPipeline.from_pretrained(assets["sd15"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ZTSNRUniPCMultistepScheduler.from_pretrained(out, subfolder="scheduler")
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr

    def sample():
        return pipe("a red disc", num_inference_steps=3, height=RES, width=RES, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain = sample()
    pipe.load_lora_weights(out)
    tuned = sample()
    assert np.isfinite(tuned).all() and np.abs(tuned - plain).max() > 1e-3
    # kohya / ComfyUI export: LoRA weights only, how to sample it in sd-scripts' metadata
    kohya = result["kohya"]
    assert scheduler_settings_from_checkpoint(kohya) == {"prediction_type": "v_prediction",
                                                         "rescale_betas_zero_snr": True}
    keys = load_file(kohya)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert all(float(v) == 8.0 for k, v in keys.items() if k.endswith(".alpha"))
    assert "v_pred" not in keys and "ztsnr" not in keys
    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v" and f.metadata()["ss_zero_terminal_snr"] == "True"
    # model card, sample grid, validation during training, summary
    card = (out / "README.md").read_text()
    assert str(assets["sd15"]) in card and "converted from epsilon to v_prediction" in card and "samples.png" in card
    assert (out / "samples.png").is_file() and (out / "validation" / "step-000004.png").is_file()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 8 and summary["skipped_images"] == []


def test_kohya_export_carries_the_trained_delta_with_alpha_other_than_rank(assets, tmp_path):
    """Consumers of the kohya format apply ``up @ down * alpha / rank``: that must equal the trained
    ``B @ A * lora_alpha / rank`` of every module (a dropped or default alpha doubles the delta here)."""
    out = tmp_path / "out"
    run(assets, out, "--prediction_type", "v_prediction", "--zero_terminal_snr", "--lora_alpha", "4", steps=2)
    trained = load_file(out / "pytorch_lora_weights.safetensors")
    kohya = load_file(out / "lora_kohya.safetensors")
    names = {".lora_A.weight": ".lora_B.weight", ".lora.down.weight": ".lora.up.weight"}  # peft / diffusers names
    pairs = {k[: -len(a)]: (a, b) for k in trained for a, b in names.items() if k.endswith(a)}
    assert len(pairs) > 4 and all(k.startswith("unet.") for k in pairs)
    for module, (a_suffix, b_suffix) in pairs.items():
        name = "lora_unet_" + module[len("unet."):].replace(".", "_")
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        assert float(kohya[f"{name}.alpha"]) == 4.0
        applied = up.flatten(1) @ down.flatten(1) * float(kohya[f"{name}.alpha"]) / down.shape[0]
        expected = trained[module + b_suffix].flatten(1) @ trained[module + a_suffix].flatten(1) * 4 / 8
        torch.testing.assert_close(applied, expected)
        assert float(expected.abs().max()) > 0


def test_sdxl_training_with_text_encoder_lora_and_loading(assets, tmp_path):
    out = tmp_path / "out"
    result = run(assets, out, "--prediction_type", "v_prediction", "--zero_terminal_snr", "--train_text_encoder",
                 model="sdxl", steps=6)
    assert np.isfinite(result["losses"]).all()
    pipe = StableDiffusionXLPipeline.from_pretrained(assets["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ZTSNRUniPCMultistepScheduler.from_pretrained(out, subfolder="scheduler")
    kw = dict(prompt="a blue square", num_inference_steps=3, height=RES, width=RES, output_type="np")
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out)
    tuned = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(tuned).all() and np.abs(tuned - plain).max() > 1e-4


# 4 images: 2 batches of 2 per epoch; or 4 micro-batches of 1 accumulated by 3, so that every epoch ends with an
# optimizer step of one micro-step (accelerate closes it at the end of the data) and step 5 resumes mid-epoch
BATCHING = {"batch 2": ["--train_batch_size", "2"],
            "accumulation 3, uneven epochs": ["--train_batch_size", "1", "--gradient_accumulation_steps", "3"]}


@pytest.mark.parametrize("batching", BATCHING)
def test_resume_latest_equals_an_uninterrupted_run(assets, tmp_path, batching):
    common = ["--prediction_type", "v_prediction", "--zero_terminal_snr", "--checkpointing_steps", "3",
              "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2", *BATCHING[batching]]
    full = run(assets, tmp_path / "a", *common, steps=8)
    first = run(assets, tmp_path / "b", *common, steps=5)
    assert first["global_step"] == 5 and (tmp_path / "b" / "checkpoint-3").is_dir()
    resumed = run(assets, tmp_path / "b", *common, "--resume_from_checkpoint", "latest", steps=8)
    assert resumed["global_step"] == 8
    assert len(resumed["losses"]) == 8 - 5  # continued from the step-5 checkpoint
    np.testing.assert_array_equal(resumed["losses"], full["losses"][5:])
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise on CPU


def test_latent_cache_hits_then_misses_when_resolution_changes(assets, tmp_path):
    cache = tmp_path / "cache"
    args = ["--prediction_type", "v_prediction", "--cache_latents", "--cache_latents_dir", str(cache)]
    first = run(assets, tmp_path / "a", *args, steps=2)
    second = run(assets, tmp_path / "b", *args, steps=2)
    assert first["cache"] == {"hits": 0, "misses": 4} and second["cache"] == {"hits": 4, "misses": 0}
    np.testing.assert_allclose(first["losses"], second["losses"], rtol=1e-6)
    third = run(assets, tmp_path / "c", *args, steps=1, res=48)
    assert third["cache"] == {"hits": 0, "misses": 4}


BAD = [
    (["--prediction_type", "epsilon", "--zero_terminal_snr"], ValueError, "v_prediction"),
    (["--caption_column", "prompt"], ValueError, "--caption_column"),
    (["--resume_from_checkpoint", "latest"], ValueError, "no intact checkpoint"),
]


@pytest.mark.parametrize("extra,error,message", BAD, ids=lambda v: str(v)[:40])
def test_bad_input_gives_a_clear_error(assets, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        run(assets, tmp_path / "out", *extra, steps=1)


def test_output_dir_of_a_different_run_is_refused(assets, tmp_path):
    run(assets, tmp_path / "out", "--prediction_type", "v_prediction", steps=1)
    with pytest.raises(ValueError, match=r"holds a different run \(--rank 8 -> 4\)\. Use a new --output_dir"):
        run(assets, tmp_path / "out", "--prediction_type", "v_prediction", "--rank", "4", steps=1)
    run(assets, tmp_path / "out", "--prediction_type", "v_prediction", "--rank", "4", "--overwrite_output_dir", steps=1)


def test_flag_errors_and_config_files(assets, tmp_path):
    with pytest.raises(SystemExit, match="pass exactly one of --train_data_dir and --dataset_name"):
        main(["--pretrained_model_name_or_path", str(assets["sd15"])])
    with pytest.raises(SystemExit, match="--resolution must be a multiple of 8"):
        main(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", "--resolution", "30"])
    with pytest.raises(SystemExit, match="cannot train the text encoder"):
        main(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", "--cache_latents",
              "--train_text_encoder", "--center_crop"])
    config = tmp_path / "run.yaml"
    config.write_text(f"pretrained_model_name_or_path: {assets['sd15']}\ntrain_data_dir: {assets['data']}\n"
                      f"resolution: {RES}\ncenter_crop: true\nmax_train_steps: 2\ntrain_batch_size: 4\n"
                      f"report_to: none\nprediction_type: v_prediction\noutput_dir: {tmp_path / 'out'}\n")
    result = main(["--config", str(config), "--max_train_steps", "3"])  # the command line wins
    assert result["global_step"] == 3
    assert json.loads((tmp_path / "out" / "training_args.json").read_text())["prediction_type"] == "v_prediction"
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(SystemExit, match=r"unknown keys \['learning_rat'\]"):
        main(["--config", str(config)])


def test_two_processes_hold_identical_weights(assets, tmp_path):
    """Two CPU processes, DDP over gloo (:func:`tests.train_utils.two_process_run`): equal LoRA on both ranks, one
    writer; each rank's DDP wrapper is freed before the process group is let go (a hang at exit otherwise)."""
    out = tmp_path / "ddp"
    args = ["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", "3",
            "--prediction_type", "v_prediction", "--zero_terminal_snr", "--report_to", "none",
            "--checkpointing_steps", "2", "--output_dir", str(out)]
    summary = two_process_run("train_lora_unet.py", args, out, **worker_hook(tmp_path))
    assert teardown_reports(tmp_path) == [{"held": True, "ddp_wrappers": 0}] * 2
    assert summary["global_step"] == 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_ema_weights_are_saved_and_resumed(assets, tmp_path):
    common = ["--prediction_type", "v_prediction", "--use_ema", "--ema_decay", "0.5", "--checkpointing_steps", "2"]
    run(assets, tmp_path / "plain", "--prediction_type", "v_prediction", "--checkpointing_steps", "2", steps=4)
    full = run(assets, tmp_path / "a", *common, steps=4)
    assert (tmp_path / "a" / "checkpoint-2" / "ema.safetensors").is_file()
    run(assets, tmp_path / "b", *common, steps=2)
    run(assets, tmp_path / "b", *common, "--resume_from_checkpoint", "latest", steps=4)
    plain = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA state resumes exactly
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # and what is saved is the average
    assert full["global_step"] == 4
