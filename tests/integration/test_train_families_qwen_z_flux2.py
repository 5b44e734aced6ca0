"""train_lora_flow.py on tiny Qwen-Image, Z-Image, FLUX.2 Klein and FLUX.2 dev models (CPU): one run per family
trains, its LoRA loads in diffusers and in ComfyUI's names with the trained deltas, a resumed run is bitwise the
same, and the task's transformer call is the pipeline's own."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_ztsnr import ZTSNRFlowMatchScheduler
from diffusers_ztsnr.markers import load_lora_weights, scheduler_settings_from_checkpoint
from diffusers_ztsnr.testing.tiny_flow_builders import build_flux2_klein, build_qwen_image, build_z_image
from diffusers_ztsnr.testing.tiny_flux2_builders import build_flux2
from diffusers_ztsnr.training.checkpointing import load_tensor_state
from diffusers_ztsnr.training.config import InputError
from diffusers_ztsnr.training.families.registry import flow_task_class
from diffusers_ztsnr.training.flow import main as flow_main
from diffusers_ztsnr.training.flow import parse_args as flow_args
from tests.integration.interop.support import count, diffusers_applied, max_error
from tests.train_utils import RES, fixed_batch_flow_loss, whole_dataset_batch

pytestmark = pytest.mark.usefixtures("quiet_loading")
BUILDERS = {"qwen-image": build_qwen_image, "z-image": build_z_image, "flux2-klein": build_flux2_klein,
            "flux2": build_flux2}
#: FLUX.2 dev's system message alone is ~230 tokens of the character-level tokenizer: room for the caption after it
SEQ = {"flux2": 288}
STEPS, RANK, ALPHA = 40, 8, 4.0
LORA = "pytorch_lora_weights.safetensors"  # alpha != rank: the files must carry the scale alpha / rank = 0.5


def argv(assets, kind, out, steps=STEPS, *extra):
    return ["--pretrained_model_name_or_path", str(assets[kind]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--train_batch_size", "4", "--max_train_steps", str(steps), "--center_crop",
            "--output_dir", str(out), "--learning_rate", "3e-2", "--rank", str(RANK), "--lora_alpha", str(ALPHA),
            "--report_to", "none", "--checkpointing_steps", "30", "--max_sequence_length", str(SEQ.get(kind, 48)),
            *extra]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers_ztsnr.testing.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("dit")
    out = {"data": make_demo_dataset(root / "data", num_images=4, size=RES)}
    for kind, build in BUILDERS.items():
        with torch.random.fork_rng(devices=[]):
            build(0).save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """One training run per family (checkpoints at 30 and 40 steps, validation images at the end)."""
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for kind in BUILDERS:
        out = root / kind
        result = flow_main(argv(assets, kind, out, STEPS, "--validation_prompt", "a red disc",
                                "--num_validation_images", "1", "--validation_inference_steps", "2",
                                "--validation_steps", "1000"))
        done[kind] = (out, result)
    return done


def load_task(assets, kind, *extra):
    args = flow_args(argv(assets, kind, "unused", 1, *extra))
    pipe_class = json.loads((assets[kind] / "model_index.json").read_text())["_class_name"]
    return flow_task_class(pipe_class)(args)


def trained_deltas(out) -> dict:
    """``{"transformer": {module: lora_B @ lora_A * alpha / rank}}`` of the weights the run trained (its last
    checkpoint's adapter state, not the files under test)."""
    state, _ = load_tensor_state(out / f"checkpoint-{STEPS}" / "lora_0.safetensors")
    deltas = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.rsplit(".lora_A.", 1)[0]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            deltas[module] = b.double() @ a.double() * (ALPHA / a.shape[0])
    return {"transformer": deltas}


@pytest.mark.parametrize("kind", BUILDERS)
def test_training_lowers_the_loss_and_diffusers_applies_every_trained_delta(kind, assets, runs):
    out, result = runs[kind]
    assert result["global_step"] == STEPS and np.isfinite(result["losses"]).all()
    task = load_task(assets, kind)
    batch = whole_dataset_batch(assets["data"])
    before = fixed_batch_flow_loss(task, batch, draws=6)
    trained = trained_deltas(out)
    applied, patched = diffusers_applied(task.pipe, out, ["transformer"])
    after = fixed_batch_flow_loss(task, batch, draws=6)  # the fused LoRA
    # measured (seed 0, 40 steps at 3e-2): qwen-image 1.508 -> 1.183, z-image 1.374 -> 1.208,
    # flux2-klein 1.371 -> 1.220, flux2 1.458 -> 1.171
    assert after < 0.93 * before, (before, after)
    # every module the run trained, and only those, is patched, each with its trained delta
    assert patched["transformer"] == set(trained["transformer"]) and count(patched) == count(trained) >= 4
    assert set(applied["transformer"]) == set(trained["transformer"])
    assert max_error(applied, trained) < 1e-6
    assert scheduler_settings_from_checkpoint(out)["prediction_type"] == "flow_prediction"
    grid = np.asarray(Image.open(out / "samples.png"), dtype=np.float64)  # sampled with our flow scheduler
    assert grid.shape[-1] == 3 and grid.std() > 1.0 and (out / "validation").is_dir()
    card = (out / "README.md").read_text()
    assert f"in the names ComfyUI maps for {TITLES[kind]}" in card and "sd-scripts' key format" not in card
    assert ("guidance_scale=4.0" in card) == (kind == "flux2")  # FLUX.2 dev's distilled guidance: the pipeline's
    assert f"max_sequence_length={SEQ.get(kind, 48)}" in card  # trained on that many tokens, not the default 512
    assert ZTSNRFlowMatchScheduler.from_pretrained(out, subfolder="scheduler").config.use_dynamic_shifting


def test_the_default_targets_are_diffusers_examples(runs):
    modules = {kind: {re.sub(r"\.\d+\.", ".N.", m) for m in trained_deltas(out)["transformer"]}
               for kind, (out, _) in runs.items()}
    attention = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"}
    assert modules["qwen-image"] == {f"transformer_blocks.N.{m}" for m in attention}
    assert modules["z-image"] == {f"{block}.N.{m.replace('attn', 'attention')}" for m in attention
                                  for block in ("layers", "noise_refiner", "context_refiner")}
    assert modules["flux2"] == {f"transformer_blocks.N.{m}" for m in attention}
    assert modules["flux2-klein"] == {*(f"transformer_blocks.N.{m}" for m in attention),
                                      "single_transformer_blocks.N.attn.to_qkv_mlp_proj",
                                      "single_transformer_blocks.N.attn.to_out"}


@pytest.mark.parametrize("kind", BUILDERS)
def test_a_resumed_run_ends_bitwise_equal(kind, assets, runs, tmp_path):
    out, full = runs[kind]
    resumed = flow_main(argv(assets, kind, tmp_path / "resumed", STEPS, "--resume_from_checkpoint",
                             str(out / "checkpoint-30")))
    assert resumed["global_step"] == STEPS and len(resumed["losses"]) == STEPS - 30
    np.testing.assert_array_equal(resumed["losses"], full["losses"][30:])
    a, b = load_file(out / "pytorch_lora_weights.safetensors"), load_file(tmp_path / "resumed" / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- ComfyUI: comfy/lora.py model_lora_keys_unet, restated for these models -------------------------------------
# Qwen-Image: the native model keeps diffusers' names; every weight maps from lora_unet_<key, "." -> "_">.
# Z-Image (Lumina2 branch): diffusion_model.<diffusers key> -> the native key of comfy/utils.py z_image_to_diffusers,
# q / k / v as row slices of attention.qkv. FLUX.2 (a Flux model): lora_unet_<BFL key, "." -> "_">, BFL's fused qkv.
Z_NATIVE = {"attention.to_out.0": "attention.out", "all_x_embedder.2-1": "x_embedder",
            "all_final_layer.2-1.linear": "final_layer.linear"}
BFL_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
              "txt_attn.proj": ("attn.to_add_out",), "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
              "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
BFL_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}


def comfyui_patches(kind, lora, transformer) -> tuple[dict, set]:
    """What ComfyUI adds to each native weight (``{native key: delta}``; a sliced key adds into its rows) for the
    kohya file ``lora``, and the keys it leaves unused ("lora key not loaded")."""
    def delta(name):
        down, up = lora[f"{name}.lora_down.weight"].double(), lora[f"{name}.lora_up.weight"].double()
        return up @ down * (float(lora[f"{name}.alpha"]) / down.shape[0])

    names = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in lora}
    names |= {k.removesuffix(".alpha") for k in lora if k.endswith(".alpha")}
    patches, used = {}, set()
    qwen_keys = {m.replace(".", "_"): m for m, _ in transformer.named_modules()}
    for name in sorted(names):
        if kind == "qwen-image":
            target = qwen_keys.get(name.removeprefix("lora_unet_"))
            if not name.startswith("lora_unet_") or target is None:
                continue
            patches[target] = delta(name)
        elif kind == "z-image":
            path = name.removeprefix("diffusion_model.")
            block = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.attention\.to_([qkv])", path)
            if block:
                rows = int(transformer.config.dim)
                qkv = patches.setdefault(f"{block[1]}.attention.qkv", torch.zeros(3 * rows, rows, dtype=torch.float64))
                start = "qkv".index(block[2]) * rows
                qkv[start:start + rows] += delta(name)
            else:
                native = re.sub(r"\.attention\.to_out\.0$", ".attention.out", path)
                patches[Z_NATIVE.get(native, native)] = delta(name)
        else:
            m = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(.+)", name)
            table = BFL_DOUBLE if m and m[1] == "double" else BFL_SINGLE
            native = {k.replace(".", "_"): k for k in table}.get(m[3]) if m else None
            if native is None:
                continue
            patches[f"{m[1]}_blocks.{m[2]}.{native}"] = delta(name)
        used |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    return patches, set(lora) - used


def expected_native(kind, trained: dict, transformer) -> dict:
    """The trained diffusers deltas in the native layout (fused parts stacked along the rows, zero if untrained)."""
    if kind == "qwen-image":
        return dict(trained)
    out = {}
    if kind == "z-image":
        for path, d in trained.items():
            if block := re.fullmatch(r"(.+)\.attention\.to_([qkv])", path):
                rows = d.shape[0]
                qkv = out.setdefault(f"{block[1]}.attention.qkv", torch.zeros(3 * rows, rows, dtype=torch.float64))
                qkv["qkv".index(block[2]) * rows:("qkv".index(block[2]) + 1) * rows] = d
            else:
                out[Z_NATIVE.get(path, path.replace(".attention.to_out.0", ".attention.out"))] = d
        return out
    for prefix, native_prefix, table in (("transformer_blocks", "double_blocks", BFL_DOUBLE),
                                         ("single_transformer_blocks", "single_blocks", BFL_SINGLE)):
        for index in range(len(getattr(transformer, prefix))):
            for native, parts in table.items():
                paths = [f"{prefix}.{index}.{p}" for p in parts]
                if any(p in trained for p in paths):
                    zero = [torch.zeros(transformer.get_submodule(p).weight.shape, dtype=torch.float64) for p in paths]
                    out[f"{native_prefix}.{index}.{native}"] = torch.cat(
                        [trained.get(p, z) for p, z in zip(paths, zero, strict=True)])
    return out


@pytest.mark.parametrize("kind", BUILDERS)
def test_the_comfyui_file_applies_the_trained_deltas(kind, assets, runs):
    out, _ = runs[kind]
    kohya = load_file(out / "lora_kohya.safetensors")
    trained = trained_deltas(out)
    task = load_task(assets, kind)
    patches, unused = comfyui_patches(kind, kohya, task.pipe.transformer)
    expected = expected_native(kind, trained["transformer"], task.pipe.transformer)
    assert not unused and set(patches) == set(expected) and len(patches) >= 2
    assert max(float((patches[k] - expected[k]).abs().max()) for k in expected) < 1e-6
    with safe_open(str(out / "lora_kohya.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_alpha"] == str(ALPHA) and metadata["ss_network_dim"] == str(RANK)
    assert scheduler_settings_from_checkpoint(out / "lora_kohya.safetensors")["prediction_type"] == "flow_prediction"
    # diffusers' own converters for these names read the same file back to the trained deltas (through our loader,
    # which leaves these families' files to diffusers)
    applied, patched = diffusers_applied(task.pipe, out / "lora_kohya.safetensors", ["transformer"],
                                         load=lambda pipe, lora: load_lora_weights(pipe, lora))
    assert patched["transformer"] == set(trained["transformer"]) and max_error(applied, trained) < 1e-5


def pipeline_step(kind, task, noise, prompt):
    """One sampling step of the stock pipeline from ``noise`` (the task's latent layout): the latent it returns, in
    the task's layout, and the step's sigmas ``(s0, s1)``."""
    pipe, pipe_class = task.pipe, task.pipeline_class
    kwargs = dict(prompt=prompt, num_inference_steps=1, height=RES, width=RES, output_type="latent",
                  max_sequence_length=task.max_sequence_length)
    if kind == "z-image":
        out = pipe(latents=noise, guidance_scale=0.0, **kwargs).images
    elif kind == "qwen-image":
        b, c, h, w = noise.shape
        packed = pipe(latents=pipe_class._pack_latents(noise, b, c, h, w), **kwargs).images
        out = pipe_class._unpack_latents(packed, RES, RES, pipe.vae_scale_factor)[:, :, 0]
    elif kind == "flux2":  # the pipeline returns its packed, normalised patches
        patches = pipe_class._patchify_latents(noise)
        raw = pipe(latents=patches, guidance_scale=task.guidance, text_encoder_out_layers=task.text_layers,
                   **kwargs).images
        out = pipe_class._unpatchify_latents(pipe_class._unpack_latents_with_ids(
            raw, pipe_class._prepare_latent_ids(patches)))
    else:  # the pipeline returns the VAE's latent: normalise and unpatchify it back
        raw = pipe(latents=pipe_class._patchify_latents(noise), guidance_scale=1.0,
                   text_encoder_out_layers=task.text_layers, **kwargs).images
        mean, std = task._batch_norm(raw)
        out = pipe_class._unpatchify_latents((pipe_class._patchify_latents(raw) - mean) / std)
    s0, s1 = (float(x) for x in pipe.scheduler.sigmas[:2])
    return out, (s0, s1)


@pytest.mark.parametrize("kind", BUILDERS)
def test_the_task_calls_the_transformer_as_the_pipeline_does(kind, assets):
    """The pipeline's own Euler step equals ``x + (s1 - s0) * predict(x, s0)`` with the task's prompt encoding,
    packing, ids, time and sign (and FLUX.2 dev's guidance): training and sampling see the same model."""
    task = load_task(assets, kind, *(["--guidance_scale", "2.5"] if kind == "flux2" else []))
    task.pipe.set_progress_bar_config(disable=True)
    prompt = "a red disc on a dark background"
    shape = task.encode_images(torch.zeros(1, 3, RES, RES)).shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stepped, (s0, s1) = pipeline_step(kind, task, noise, prompt)
        cond = task.encode_prompts([prompt], "cpu")
        velocity = task.predict(task.pipe.transformer, noise, torch.tensor([s0]), cond, torch.float32)
    assert s0 > 0.5 and stepped.shape == noise.shape
    torch.testing.assert_close(stepped, noise + (s1 - s0) * velocity, rtol=0, atol=1e-4)
    assert float((stepped - noise).abs().max()) > 0.1  # the step moved: the comparison is not of two no-ops


TITLES = {"qwen-image": "Qwen-Image", "z-image": "Z-Image", "flux2-klein": "FLUX.2 Klein", "flux2": "FLUX.2 dev"}
BAD = [(["--guidance_scale", "3.5"], "--guidance_scale 3.5: {title} ({pipe}) takes no guidance embedding"),
       (["--train_text_encoder"], "--train_text_encoder: {title}'s text encoder stays frozen"),
       (["--lora_layers", "attn.nonexistent"], "--lora_layers attn.nonexistent")]


CASES = ([(kind, *BAD[0]) for kind in BUILDERS if kind != "flux2"] + [("z-image", *bad) for bad in BAD[1:]]
         + [("qwen-image", ["--max_sequence_length", "2000"], "--max_sequence_length 2000: {pipe} encodes at most "
             "1024 prompt tokens")])


@pytest.mark.parametrize("kind,extra,message", CASES, ids=[*BUILDERS][:3] + ["text_encoder", "lora_layers", "length"])
def test_bad_flags_give_one_line_errors(kind, extra, message, assets, tmp_path):
    pipe = json.loads((assets[kind] / "model_index.json").read_text())["_class_name"]
    with pytest.raises(InputError) as caught:
        flow_main(argv(assets, kind, tmp_path / "out", 1, *extra))
    assert message.format(title=TITLES[kind], pipe=pipe) in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out" / LORA).exists()


ATTENTION = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out"}
PRESET_MODULES = {  # per family: attn, the feed-forward layers attn+ff adds, what all-linear adds to those
    "qwen-image": ({f"transformer_blocks.N.{m}" for m in ATTENTION},
                   {f"transformer_blocks.N.{s}_mlp.net.{p}" for s in ("img", "txt") for p in ("0.proj", "2")},
                   {"transformer_blocks.N.img_mod.1", "transformer_blocks.N.txt_mod.1"}),
    "z-image": ({f"{b}.N.attention.{m}" for b in ("layers", "noise_refiner", "context_refiner")
                 for m in ("to_q", "to_k", "to_v", "to_out.0")},
                {f"{b}.N.feed_forward.w{i}" for b in ("layers", "noise_refiner", "context_refiner") for i in (1, 2, 3)},
                {"layers.N.adaLN_modulation.0", "noise_refiner.N.adaLN_modulation.0"}),
    "flux2-klein": ({*(f"transformer_blocks.N.{m}" for m in ATTENTION),
                     "single_transformer_blocks.N.attn.to_qkv_mlp_proj", "single_transformer_blocks.N.attn.to_out"},
                    {f"transformer_blocks.N.{f}.linear_{d}" for f in ("ff", "ff_context") for d in ("in", "out")},
                    set()),
}
PRESET_MODULES["flux2"] = PRESET_MODULES["flux2-klein"]


@pytest.mark.parametrize("kind", BUILDERS)
def test_lora_layer_presets_select_the_blocks_linears(kind, assets):
    task = load_task(assets, kind)
    attention, feed_forward, rest = PRESET_MODULES[kind]
    for preset, expected in (("attn", attention), ("attn+ff", attention | feed_forward),
                             ("all-linear", attention | feed_forward | rest)):
        modules, label = task.resolve_lora_layers(preset)
        assert label == preset and {re.sub(r"\.\d+\.", ".N.", m, count=1) for m in modules} == expected
        assert all(isinstance(task.denoiser.get_submodule(m), torch.nn.Linear) for m in modules)
    assert task.resolve_lora_layers(" to_q, to_k ") == (("to_q", "to_k"), "to_q,to_k")
    with pytest.raises(InputError, match="--lora_layers ','"):
        task.resolve_lora_layers(",")


def pipeline_format(kind, task, latents):
    """``latents`` (the task's layout) as the pipeline holds them during sampling."""
    if kind == "qwen-image":
        return task.pipeline_class._pack_latents(latents, *latents.shape)
    if kind in ("flux2-klein", "flux2"):
        return task.pipeline_class._pack_latents(task.pipeline_class._patchify_latents(latents))
    return latents


@pytest.mark.parametrize("kind", BUILDERS)
def test_encoded_latents_decode_through_the_pipeline_as_the_vae_decodes_the_image(kind, assets):
    """The normalisation of ``encode_images`` is the inverse of the pipeline's own decode: latents swapped in at the
    end of sampling come out as the VAE's decode of the image's raw mean latent."""
    task = load_task(assets, kind)
    pipe = task.pipe
    pipe.set_progress_bar_config(disable=True)
    pixels = whole_dataset_batch(assets["data"])["pixel_values"][:1]
    vae = pipe.vae
    with torch.no_grad():
        ours = task.encode_images(pixels)
        raw = vae.encode(pixels.unsqueeze(2) if kind == "qwen-image" else pixels).latent_dist.mean
        decoded = vae.decode(raw).sample
        expected = pipe.image_processor.postprocess(decoded[:, :, 0] if kind == "qwen-image" else decoded,
                                                    output_type="np")
        extra = {"text_encoder_out_layers": task.text_layers} if kind in ("flux2-klein", "flux2") else {}
        image = pipe(prompt="a red disc", num_inference_steps=1, height=RES, width=RES, output_type="np",
                     max_sequence_length=task.max_sequence_length,
                     callback_on_step_end=lambda *_: {"latents": pipeline_format(kind, task, ours)}, **extra).images
    assert image.shape == expected.shape and float(np.std(expected)) > 0.01
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-4)



def test_a_module_comfyui_cannot_name_keeps_the_diffusers_file(assets, tmp_path):
    from diffusers_ztsnr.lora_keys_dit import comfyui_slot

    slot = comfyui_slot("flux2-klein", "transformer_blocks.3.attn.add_k_proj")
    assert (slot.name, slot.part, slot.parts) == ("lora_unet_double_blocks_3_txt_attn_qkv", 1, 3)
    with pytest.raises(ValueError, match="transformer.siglip_embedder.1 has no name in ComfyUI's LoRA keys"):
        comfyui_slot("z-image", "siglip_embedder.1")
    task = load_task(assets, "z-image")
    state = {"siglip_embedder.1.lora_A.weight": torch.ones(RANK, 4),
             "siglip_embedder.1.lora_B.weight": torch.ones(4, RANK)}
    with pytest.warns(UserWarning, match="no lora_kohya.safetensors written: transformer.siglip_embedder.1"):
        paths = task.save_lora(tmp_path, {"transformer": state}, flow_args(argv(assets, "z-image", tmp_path, 1)))
    assert set(paths) == {"lora"} and (tmp_path / LORA).is_file() and not (tmp_path / "lora_kohya.safetensors").exists()
