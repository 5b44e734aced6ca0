"""train_lora_flow.py on tiny SD3- and Flux-style models, and the UNet script's --objective flow (CPU)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_ztsnr import ZTSNRFlowMatchScheduler, ZTSNRUniPCMultistepScheduler
from diffusers_ztsnr.adapters import PathTransformedModel
from diffusers_ztsnr.markers import scheduler_settings_from_checkpoint
from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.training import objectives, step
from diffusers_ztsnr.training.flow import FlowTask
from diffusers_ztsnr.training.flow import main as flow_main
from diffusers_ztsnr.training.flow import parse_args as flow_args
from diffusers_ztsnr.training.objectives import flow_matching
from diffusers_ztsnr.training.unet import UNetTask
from diffusers_ztsnr.training.unet import main as unet_main
from diffusers_ztsnr.training.unet import parse_args as unet_args
from tests.train_utils import fixed_batch_flow_loss, tiny_assets, two_process_run, whole_dataset_batch

RES = 32
REPO = Path(__file__).resolve().parents[2]
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


pytestmark = pytest.mark.usefixtures("quiet_loading")  # diffusers' and transformers' loading chatter


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("flow"), "sd3", "flux", "sd15")


def argv(assets, out, model, steps, *extra):
    return ["--pretrained_model_name_or_path", str(assets[model]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--train_batch_size", "4", "--max_train_steps", str(steps), "--center_crop",
            "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "8", "--report_to", "none",
            "--checkpointing_steps", "1000", *extra]


def run(assets, out, model="sd3", steps=4, *extra):
    return flow_main(argv(assets, out, model, steps, *extra))


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_training_lowers_the_flow_loss_and_the_lora_loads(assets, tmp_path, model):
    out = tmp_path / "out"
    result = run(assets, out, model, 30, "--validation_prompt", "a red disc", "--num_validation_images", "2",
                 "--validation_inference_steps", "3", "--validation_steps", "100")
    assert result["global_step"] == 30 and np.isfinite(result["losses"]).all()
    batch = whole_dataset_batch(assets["data"])
    # the script's own encoders and predict(), on the base transformer and then with the LoRA
    before = fixed_batch_flow_loss(FlowTask(flow_args(argv(assets, "unused", model, 1))), batch)
    after = fixed_batch_flow_loss(FlowTask(flow_args(argv(assets, "unused", model, 1))), batch, out)
    # measured on this fixed batch, seeds 0 and 1, ATen's default and AVX2 kernels: sd3 0.907-0.914, flux 0.778-0.779
    assert after < 0.95 * before, (before, after)
    # the LoRA loads with diffusers' own loader and changes the pipeline's output
    pipe = PIPELINES[model].from_pretrained(assets[model])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ZTSNRFlowMatchScheduler.from_pretrained(out, subfolder="scheduler")
    kw = dict(prompt="a red disc", num_inference_steps=3, height=RES, width=RES, output_type="np")
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out)
    tuned = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(tuned).all() and np.abs(tuned - plain).max() > 1e-3
    # output folder: kohya export in the native (MMDiT / BFL) names with flow metadata, card, samples, summary
    kohya = load_file(out / "lora_kohya.safetensors")
    blocks = {"sd3": "lora_unet_joint_blocks_", "flux": ("lora_unet_double_blocks_", "lora_unet_single_blocks_")}
    assert kohya and all(k.startswith(blocks[model]) for k in kohya)
    assert "v_pred" not in kohya and "ztsnr" not in kohya
    with safe_open(str(out / "lora_kohya.safetensors"), "pt") as f:
        assert "modelspec.prediction_type" not in f.metadata()  # sd-scripts states none for flow models
    assert scheduler_settings_from_checkpoint(out / "lora_kohya.safetensors")["prediction_type"] == "flow_prediction"
    card = (out / "README.md").read_text()
    assert "train_lora_flow.py" in card and "flow matching" in card and (out / "samples.png").is_file()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 30 and summary["skipped_steps"] == 0


SCHEMES = [
    ("sd3", ["--weighting_scheme", "logit_normal", "--logit_mean", "0.5", "--logit_std", "0.8"]),
    ("sd3", ["--weighting_scheme", "mode", "--mode_scale", "1.29"]),
    ("sd3", ["--weighting_scheme", "none", "--timestep_shift", "1.0"]),
    ("sd3", ["--weighting_scheme", "sigma_sqrt", "--precondition_outputs", "1"]),
    ("sd3", ["--weighting_scheme", "cosmap", "--timestep_shift", "dynamic"]),
    ("flux", ["--weighting_scheme", "logit_normal"]),  # auto shift: Flux's resolution-dependent mu
    ("flux", ["--weighting_scheme", "none", "--timestep_shift", "3.0", "--guidance_scale", "1.0"]),
    ("flux", ["--weighting_scheme", "mode", "--mode_scale", "0.5"]),
    ("flux", ["--weighting_scheme", "sigma_sqrt", "--precondition_outputs", "1"]),
    ("flux", ["--weighting_scheme", "cosmap", "--timestep_shift", "dynamic"]),
]


def _expected_shift(model: str, flags: dict) -> str:
    value = flags.get("--timestep_shift", "auto")
    if value == "dynamic" or (value == "auto" and model == "flux"):
        return "mu"  # Flux's resolution-dependent shift
    return "3.0" if value == "auto" else value  # SD3's config: static 3.0


@pytest.mark.parametrize("model,extra", SCHEMES, ids=lambda v: v if isinstance(v, str) else "_".join(v[1::2]))
def test_every_time_sampling_scheme_trains(assets, tmp_path, model, extra, monkeypatch):
    """Each scheme's flags reach the time density, the shift, the loss weight and the preconditioning of every
    step, and the update changes the LoRA."""
    seen = {"draws": [], "weights": [], "precondition": []}
    used = flow_matching  # the names the flow-matching objective calls
    draw, weigh, loss = used.sample_flow_sigmas, used.flow_loss_weights, used.flow_matching_loss

    def spy_draw(batch_size, generator, scheme, logit_mean, logit_std, mode_scale, shift=1.0, mu=None):
        seen["draws"].append((scheme, logit_mean, logit_std, mode_scale, "mu" if mu is not None else str(shift)))
        return draw(batch_size, generator, scheme, logit_mean, logit_std, mode_scale, shift=shift, mu=mu)

    monkeypatch.setattr(used, "sample_flow_sigmas", spy_draw)
    monkeypatch.setattr(used, "flow_loss_weights", lambda s, scheme: seen["weights"].append(scheme) or
                        weigh(s, scheme))
    monkeypatch.setattr(used, "flow_matching_loss",
                        lambda *a, **k: seen["precondition"].append(a[-1]) or loss(*a, **k))
    result = run(assets, tmp_path / "out", model, 2, *extra)
    assert result["global_step"] == 2 and np.isfinite(result["losses"]).all() and result["skipped_steps"] == 0
    flags = dict(zip(extra[::2], extra[1::2], strict=True))
    scheme = flags["--weighting_scheme"]
    expected = (scheme, float(flags.get("--logit_mean", 0.0)), float(flags.get("--logit_std", 1.0)),
                float(flags.get("--mode_scale", 1.29)), _expected_shift(model, flags))
    assert seen["draws"] == [expected] * 2 and seen["weights"] == [scheme] * 2
    assert seen["precondition"] == [flags.get("--precondition_outputs", "0") == "1"] * 2
    # lora_B starts at zero: every one moved, but the context query of SD3's last block, whose context output that
    # block discards (no gradient reaches it)
    unused = {"transformer.transformer_blocks.1.attn.add_q_proj"} if model == "sd3" else set()
    lora_up = {k.split(".lora")[0]: w for k, w in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
               .items() if "lora_B" in k or "lora.up" in k}
    assert len(lora_up) >= 8 and {k for k, w in lora_up.items() if float(w.abs().max()) == 0} == unused


def test_shift_follows_the_base_scheduler(assets):
    latents = torch.zeros(1, 16, 64, 64)  # 32 x 32 = 1024 tokens of 2 x 2 patches
    def objective(*flags):
        args = flow_args(argv(assets, "x", *flags))
        return FlowTask(args).build_objective(args)

    assert objective("sd3", 1).shift_and_mu(latents) == (3.0, None)  # SD3's config: static shift 3.0
    flux = objective("flux", 1)
    assert flux.shift_and_mu(latents) == (1.0, pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840))  # Flux: mu(tokens)
    assert objective("flux", 1, "--timestep_shift", "2.5").shift_and_mu(latents) == (2.5, None)


def test_resume_latest_equals_an_uninterrupted_run(assets, tmp_path):
    common = ["--checkpointing_steps", "2", "--train_batch_size", "2"]
    full = run(assets, tmp_path / "a", "flux", 5, *common)
    run(assets, tmp_path / "b", "flux", 3, *common)
    resumed = run(assets, tmp_path / "b", "flux", 5, *common, "--resume_from_checkpoint", "latest")
    assert resumed["global_step"] == 5 and len(resumed["losses"]) == 5 - 3  # from the final step-3 checkpoint
    np.testing.assert_array_equal(resumed["losses"], full["losses"][3:])
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_encodings_train_the_same_objective(assets, tmp_path):
    cache = ["--cache_latents", "--cache_latents_dir", str(tmp_path / "cache")]
    first = run(assets, tmp_path / "a", "sd3", 2, *cache)
    second = run(assets, tmp_path / "b", "sd3", 2, *cache)
    plain = run(assets, tmp_path / "c", "sd3", 2)
    assert first["cache"] == {"hits": 0, "misses": 4} and second["cache"] == {"hits": 4, "misses": 0}
    np.testing.assert_allclose(second["losses"], plain["losses"], rtol=1e-4)


def test_text_encoder_lora_loads(assets, tmp_path):
    out = tmp_path / "out"
    run(assets, out, "sd3", 2, "--train_text_encoder")
    pipe = StableDiffusion3Pipeline.from_pretrained(assets["sd3"])
    pipe.load_lora_weights(out)
    assert any("lora" in name for name, _ in pipe.text_encoder.named_parameters())


BAD = [
    (["--weighting_scheme", "uniform"], SystemExit, "--weighting_scheme: invalid choice: 'uniform' (choose from"),
    (["--weighting_scheme", "mode", "--mode_scale", "3"], SystemExit, "mode_scale must lie in [-1, 2/(pi-2)"),
    (["--weighting_scheme", "logit_normal", "--logit_std", "0"], SystemExit, "logit_std > 0, got logit_mean=0.0"),
    (["--timestep_shift", "-1"], SystemExit, "--timestep_shift must be 'auto', 'dynamic' or a number > 0"),
    (["--resolution", "40"], SystemExit, "multiple of 16"),
    (["--precondition_outputs", "2"], SystemExit, "--precondition_outputs: invalid choice: 2 (choose from 0, 1)"),
    (["--guidance_scale", "3.5"], ValueError, "has no guidance embedding"),
    (["--lora_layers", "attn.nonexistent"], ValueError, "--lora_layers attn.nonexistent"),
    (["--learning_rate", "0"], SystemExit, "--learning_rate must lie in (0, 1] (got 0"),
]


@pytest.mark.parametrize("extra,error,message", BAD, ids=lambda v: str(v)[:40])
def test_bad_input_gives_a_clear_error(assets, tmp_path, capsys, extra, error, message):
    args = argv(assets, tmp_path / "out", "sd3", 1, *extra)
    with pytest.raises(error) as caught:
        flow_main(args)
    assert message in str(caught.value) + capsys.readouterr().err  # argparse prints its own errors


def test_a_unet_pipeline_is_sent_to_the_other_script(assets, tmp_path):
    with pytest.raises(ValueError, match="use train_lora_unet.py"):
        run(assets, tmp_path / "out", "sd15", 1)
    with pytest.raises(ValueError, match="use train_lora_flow.py"):
        unet_main(argv(assets, tmp_path / "out2", "sd3", 1))


def test_two_processes_hold_identical_weights(assets, tmp_path):
    out = tmp_path / "ddp"
    args = argv(assets, out, "flux", 3, "--train_batch_size", "2", "--checkpointing_steps", "2")
    summary = two_process_run("train_lora_flow.py", args, out)
    assert summary["global_step"] == 3 and (out / "pytorch_lora_weights.safetensors").is_file()


# --- the UNet trained as a rectified flow ---------------------------------------------------------------


def test_flow_loss_of_a_vp_model_is_its_vp_loss_reweighted_at_equal_snr():
    """Where both formulations apply, the flow loss through the adapter is the VP v-loss times (alpha+sigma)^2."""
    schedule = VPSchedule.from_config(1000, 0.00085, 0.012, "scaled_linear", rescale_betas_zero_snr=True)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    s = torch.tensor([0.999, 0.9, 0.6, 0.4, 0.2, 0.05], dtype=torch.float64)
    v_model = lambda sample, timestep: torch.tanh(sample) * 0.3 + timestep.reshape(-1, 1, 1, 1) / 1000  # noqa: E731
    adapter = PathTransformedModel.vp_as_flow(v_model, schedule, "v_prediction")
    x_s = objectives.noisy_latents(x0, noise, 1 - s, s)
    velocity = adapter(x_s, 1000 * s)
    flow_per_sample = objectives.flow_matching_loss(velocity, "flow_prediction", x_s, x0, noise, 1 - s, s)
    alpha, sigma, scale, t = adapter.vp_levels(s)
    x_t = objectives.noisy_latents(x0, noise, alpha, sigma)
    torch.testing.assert_close(x_t, x_s * scale.reshape(-1, 1, 1, 1).float(), rtol=1e-5, atol=1e-5)
    v_pred = v_model(x_t, t.float())
    vp_per_sample = objectives.diffusion_loss(v_pred, objectives.training_target(x0, noise, alpha, sigma,
                                                                                 "v_prediction"), reduction="none")
    weights = (alpha + sigma) ** 2
    torch.testing.assert_close(flow_per_sample, (vp_per_sample * weights).mean().float(), rtol=1e-4, atol=1e-6)


def unet_fixed_batch_flow_loss(assets, lora_dir, draws=16):
    """Rectified-flow loss of the SD-style UNet (+ LoRA) through the adapter, with the script's own task (its
    encoders, its ZTSNR schedule, v_prediction)."""
    task = UNetTask(unet_args(argv(assets, "unused", "sd15", 1, "--objective", "flow", "--zero_terminal_snr")))
    if lora_dir:
        task.pipe.load_lora_weights(lora_dir)
    model = PathTransformedModel.vp_as_flow(task.denoiser, task.schedule, task.prediction_type)
    batch = whole_dataset_batch(assets["data"])
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        latents = task.encode_images(batch["pixel_values"])
        embeds = task.encode_prompts(batch["caption"], "cpu")["encoder_hidden_states"]
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=g)
            s = objectives.sample_flow_sigmas(len(latents), g, "none").clamp(min=0.03)
            x_s = objectives.noisy_latents(latents, noise, 1 - s, s)
            u = model(x_s, 1000 * s, encoder_hidden_states=embeds).sample
            total += objectives.flow_matching_loss(u, "flow_prediction", x_s, latents, noise, 1 - s, s).item()
    return total / draws


def test_unet_objective_flow_trains_and_samples_consistently(assets, tmp_path):
    out = tmp_path / "out"
    result = unet_main(argv(assets, out, "sd15", 60, "--objective", "flow", "--zero_terminal_snr",
                            "--weighting_scheme", "logit_normal"))
    assert np.isfinite(result["losses"]).all()
    before, after = unet_fixed_batch_flow_loss(assets, None), unet_fixed_batch_flow_loss(assets, out)
    assert after < 0.95 * before, (before, after)  # measured: 0.82-0.87 (seeds 0, 1; default and AVX2 kernels)
    card = (out / "README.md").read_text()
    assert "rectified flow" in card and "PathTransformedModel.vp_as_flow" in card
    # the shipped VP scheduler (v_prediction + ZTSNR) and the flow scheduler through the adapter sample the
    # same ODE: as steps grow the images agree
    pipe = StableDiffusionPipeline.from_pretrained(assets["sd15"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    vp_scheduler = ZTSNRUniPCMultistepScheduler.from_pretrained(out, subfolder="scheduler")
    assert vp_scheduler.config.prediction_type == "v_prediction" and vp_scheduler.config.rescale_betas_zero_snr
    kw = dict(prompt="a red disc", height=RES, width=RES, output_type="np", guidance_scale=1.0)
    pipe.scheduler = vp_scheduler
    native = pipe(**kw, num_inference_steps=60, generator=torch.Generator().manual_seed(0)).images
    unet = pipe.unet
    pipe.unet = PathTransformedModel.vp_as_flow_from_scheduler_config(unet, vp_scheduler.config)
    pipe.scheduler = ZTSNRFlowMatchScheduler(shift=1.0)
    flow = pipe(**kw, num_inference_steps=60, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(flow - native).max() < 0.03


UNET_BAD = [
    (["--objective", "flow"], "--objective flow starts its paths at pure noise"),
    (["--objective", "flow", "--zero_terminal_snr", "--snr_gamma", "5"], "use --weighting_scheme"),
    (["--precondition_outputs", "1"], "apply to the flow-matching objective: add --objective flow"),
    (["--weighting_scheme", "cosmap"], "apply to the flow-matching objective"),
]


@pytest.mark.parametrize("extra,message", UNET_BAD, ids=lambda v: str(v)[:40])
def test_unet_flow_objective_bad_combinations(assets, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        unet_main(argv(assets, tmp_path / "out", "sd15", 1, *extra))


def test_unet_flow_objective_with_an_epsilon_model_is_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="epsilon"):
        unet_main(argv(assets, tmp_path / "out", "sd15", 1, "--objective", "flow", "--zero_terminal_snr",
                       "--prediction_type", "epsilon"))


def test_a_nan_flow_loss_is_skipped_and_counted(assets, tmp_path, monkeypatch):
    """The shared loop's fault handling holds for the flow script too (the campaigns run the UNet script)."""
    calls = {"n": 0}
    original = step.batch_loss

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(step, "batch_loss", sometimes_nan)
    result = run(assets, tmp_path / "out", "flux", 3)
    assert result["skipped_steps"] == 1 and np.isnan(result["losses"][1]) and np.isfinite(result["losses"][2])
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["skipped_steps"] == 1


@pytest.mark.parametrize("model", ["sd3", "flux", "sd15"])
def test_bf16_mixed_precision_trains_and_validates(assets, tmp_path, model):
    """bf16 autocast (what users run on GPUs; CPU autocast here): finite losses, LoRA saved in fp32, samples."""
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; earlier in-process runs fixed mixed_precision="no"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        bf16_run(assets, tmp_path, model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def bf16_run(assets, tmp_path, model):
    extra = ["--mixed_precision", "bf16", "--validation_prompt", "a disc", "--num_validation_images", "1",
             "--validation_inference_steps", "2"]
    if model == "sd15":
        result = unet_main(argv(assets, tmp_path / "out", model, 3, *extra, "--objective", "flow",
                                "--zero_terminal_snr"))
    else:
        result = run(assets, tmp_path / "out", model, 3, *extra)
    assert np.isfinite(result["losses"]).all() and result["skipped_steps"] == 0
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert (tmp_path / "out" / "samples.png").is_file()


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_aspect_ratio_buckets_train_non_square_latents(assets, tmp_path, model):
    """Landscape and portrait images in their own buckets: SD3 patches and Flux packs non-square latents."""
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    rows = []
    for i, size in enumerate([(48, 32), (48, 32), (32, 48), (32, 48)]):
        Image.new("RGB", size, (40 * i, 200 - 40 * i, 90)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a flat colour {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    args = argv(assets, tmp_path / "out", model, 4, "--bucketing", "--train_batch_size", "2", "--cache_latents",
                "--cache_latents_dir", str(tmp_path / "cache"))
    args[args.index("--train_data_dir") + 1] = str(folder)
    result = flow_main(args)
    assert result["global_step"] == 4 and np.isfinite(result["losses"]).all()
    assert result["cache"]["misses"] == 4
