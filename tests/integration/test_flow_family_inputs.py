"""The flow families' inputs without a training run: family selection, ``--lora_layers`` presets, FLUX.1 Kontext's
reference tokens, Chroma's attention mask, and the one-line errors for flags a family cannot take."""

import pytest
import torch

from diffusers_ztsnr.lora_keys import kohya_slot
from diffusers_ztsnr.training.families.chroma import ChromaTask
from diffusers_ztsnr.training.families.flow_transformers import FlowTask
from diffusers_ztsnr.training.families.flux_kontext import FluxKontextTask
from diffusers_ztsnr.training.families.lora_presets import preset_modules, resolve_lora_layers
from diffusers_ztsnr.training.families.registry import FLOW_TASKS, flow_task_class, make_flow_task
from diffusers_ztsnr.training.flow import main as flow_main
from diffusers_ztsnr.training.flow import parse_args as flow_args
from tests.integration.test_train_families_flux_like import FAMILIES, RES, argv, family_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return family_assets(tmp_path_factory.mktemp("families"))


def task(assets, kind, *extra):
    return make_flow_task(flow_args(argv(assets, kind, "unused", 1, *extra)))


def test_each_family_is_picked_from_its_pipeline_class(assets):
    # SD3.5 is SD3's pipeline class, trained by SD3's task: the MMDiT-X blocks go through the same forward
    assert flow_task_class("StableDiffusion3Pipeline") is FlowTask and "StableDiffusion3Pipeline" in FLOW_TASKS
    assert flow_task_class("FluxKontextPipeline") is FluxKontextTask
    assert flow_task_class("ChromaPipeline") is ChromaTask
    sd35 = task(assets, "sd35")
    assert type(sd35) is FlowTask and sd35.denoiser.config.qk_norm == "rms_norm"
    assert list(sd35.denoiser.config.dual_attention_layers) == [0]
    assert type(task(assets, "kontext")) is FluxKontextTask and type(task(assets, "chroma")) is ChromaTask


#: Linear modules per preset in the tiny transformers (block 0 / 1 of SD3.5, one double and one single block)
PRESET_COUNTS = {
    # attn: 8 + 4 (attn2) in block 0, 7 in the last block; +ff: 4 + 2; all-linear: + norm1 / norm1_context linears
    "sd35": {"attn": 19, "attn+ff": 25, "all-linear": 29},
    # double: 8 attention + 4 ff (+2 modulations); single: q, k, v (+ proj_mlp, proj_out) (+ norm.linear)
    "kontext": {"attn": 11, "attn+ff": 17, "all-linear": 20},
    # Chroma's blocks have no modulation Linear: all-linear = attn+ff
    "chroma": {"attn": 11, "attn+ff": 17, "all-linear": 17},
}


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_layer_presets_select_block_linears_that_have_kohya_names(kind):
    build, _, family, _ = FAMILIES[kind]
    transformer = build(0).transformer
    for preset, expected in PRESET_COUNTS[kind].items():
        modules, label = resolve_lora_layers(preset, transformer, ("unused",))
        assert label == preset and len(modules) == len(set(modules)) == expected, (preset, modules)
        assert all(isinstance(transformer.get_submodule(m), torch.nn.Linear) for m in modules)
        assert all(kohya_slot(family, "transformer", m, transformer.config).name for m in modules)
    assert set(preset_modules("attn", transformer)) < set(preset_modules("attn+ff", transformer))
    assert resolve_lora_layers(" attn.to_q , attn.to_k ", transformer, ("x",)) == (("attn.to_q", "attn.to_k"),
                                                                                 "attn.to_q,attn.to_k")


def test_a_preset_trains_its_modules(assets, tmp_path):
    result = flow_main(argv(assets, "chroma", tmp_path / "out", 1, "--lora_layers", "attn+ff"))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert result["global_step"] == 1 and len([k for k in saved if "lora_A" in k]) == PRESET_COUNTS["chroma"]["attn+ff"]


def test_kontext_packs_reference_tokens_after_the_noisy_ones(assets):
    kontext = task(assets, "kontext")
    seen = {}
    model = kontext.denoiser

    def spy(**kwargs):
        seen.update(kwargs)
        return model(**kwargs)

    batch = {"cond_pixel_values": torch.rand(2, 3, RES, RES) * 2 - 1}
    cond = kontext.encode_prompts(["a", "b"], "cpu")
    noisy, s = torch.randn(2, 16, RES // 2, RES // 2), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        with_reference = kontext.predictor(spy, batch, torch.float32, "flow")(noisy, s, cond)
        plain = kontext.predictor(model, {}, torch.float32, "flow")(noisy, s, cond)
    tokens = (RES // 4) ** 2  # 2x2 patches of the RES/2 latents
    assert seen["hidden_states"].shape == (2, 2 * tokens, 64) and with_reference.shape == noisy.shape
    ids = seen["img_ids"]
    assert ids.shape == (2 * tokens, 3) and (ids[:tokens, 0] == 0).all() and (ids[tokens:, 0] == 1).all()
    assert torch.equal(ids[:tokens, 1:], ids[tokens:, 1:])  # the same grid, told apart by the first id
    assert (with_reference - plain).abs().max() > 1e-4  # the reference tokens are attended to


def _transformer_inputs(transformer, run) -> dict:
    """The keyword inputs of the first call of ``transformer`` while ``run()`` runs."""
    seen = []
    handle = transformer.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_chroma_feeds_the_transformer_what_its_pipeline_feeds_it(assets):
    """Same latents, time and prompt: our training forward passes the transformer ChromaPipeline's inputs, the text
    attention mask included (prompt tokens and the first padding token, then every image token)."""
    chroma = task(assets, "chroma")
    pipe, transformer = chroma.pipe, chroma.denoiser
    with torch.no_grad():
        sampled = _transformer_inputs(transformer, lambda: pipe(
            "a red disc", num_inference_steps=1, height=RES, width=RES, guidance_scale=1.0, output_type="latent",
            generator=torch.Generator().manual_seed(0)))
        scale = pipe.vae_scale_factor
        noisy = pipe._unpack_latents(sampled["hidden_states"], RES, RES, scale)
        cond = chroma.encode_prompts(["a red disc"], "cpu")
        trained = _transformer_inputs(transformer, lambda: chroma.predict(
            transformer, noisy, sampled["timestep"], cond, torch.float32))
    for key in ("hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids", "attention_mask"):
        torch.testing.assert_close(trained[key].float(), sampled[key].float(), msg=key, atol=0, rtol=0)
    mask = trained["attention_mask"][0]
    length = int(cond["prompt_attention_mask"][0].sum())  # the prompt's tokens and the first padding token
    text = cond["prompt_embeds"].shape[1]
    assert mask[:length].eq(1).all() and mask[length:text].eq(0).all() and mask[text:].eq(1).all()
    assert length < text


BAD = [
    ("chroma", ["--guidance_scale", "3.5"], "--guidance_scale 3.5:"),
    ("chroma", ["--train_text_encoder"], "--train_text_encoder: Chroma's only text encoder is T5"),
    ("sd35", ["--cond_image_column", "reference"], "--cond_image_column: a StableDiffusion3Pipeline takes no "
                                                   "reference image"),
    ("chroma", ["--validation_prompt", "x", "--validation_image", "__missing__.png"], "--validation_image "
                                                                                     "__missing__.png: no such file"),
    ("kontext", ["--validation_image", "{ref}"], "--validation_image needs --validation_prompt"),
    ("kontext", ["--cond_image_column", "nope"], "--cond_image_column nope: the dataset has no such column"),
    ("kontext", ["--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "p"],
     "--cond_image_column with --with_prior_preservation: the class images have no reference image"),
    ("kontext", ["--validation_prompt", "x"], "validation samples an edit, so name the image to edit with "
                                              "--validation_image"),
    ("kontext", ["--datasets", '[{"train_data_dir": "d"}]'], "--cond_image_column with a --config datasets: list"),
    ("kontext", ["--lora_layers", "attn+mlp"], "or a preset (attn, attn+ff, all-linear)"),
]


@pytest.mark.parametrize("kind,extra,message", BAD, ids=lambda v: str(v)[:30])
def test_bad_flags_give_one_line_errors(assets, tmp_path, capsys, kind, extra, message):
    extra = [x.replace("{ref}", str(assets["data"] / "ref" / "000.png")) for x in extra]
    with pytest.raises((ValueError, SystemExit)) as caught:
        flow_main(argv(assets, kind, tmp_path / "out", 1, *extra))
    text = str(caught.value) + capsys.readouterr().err
    assert message in text and "\n" not in str(caught.value).strip()
    if kind == "chroma" and "guidance" in message:
        assert "ChromaPipeline" in text and "drop --guidance_scale" in text


def test_a_row_without_its_reference_image_is_named(assets, tmp_path):
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(assets["data"], data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[2]["reference"] = "ref/gone.png"
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argv(assets, "kontext", tmp_path / "out", 1)
    args[args.index("--train_data_dir") + 1] = str(data)
    message = r"--cond_image_column reference: row 2's reference image 'ref/gone.png' cannot be read"
    with pytest.raises(ValueError, match=message):
        flow_main(args)


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_lora_on_every_linear_exports_under_comfyui_names(kind, tmp_path):
    """Every Linear of the transformer (blocks, embedders, SD3.5's attn2, Chroma's approximator) has a kohya name,
    and ComfyUI's convention applies each module's trained ``B @ A * alpha / rank`` from the file."""
    from safetensors.torch import load_file

    from diffusers_ztsnr.training.lora import add_lora, lora_state_dict, save_kohya_lora
    from tests.integration.interop.conventions import apply_kohya, comfyui_key_map, expected_native, native_error
    from tests.integration.interop.support import TOLERANCE, TrainedLora

    build, _, family, _ = FAMILIES[kind]
    pipe = build(0)
    transformer = pipe.transformer
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    add_lora(transformer, 4, 2.0, tuple(linears))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(transformer.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    state = lora_state_dict(transformer)
    path = save_kohya_lora(tmp_path / "lora_kohya.safetensors", {"transformer": state}, 2.0, "flow_prediction",
                           False, family=family, denoiser_config=dict(transformer.config))
    trained = TrainedLora(kind, {"transformer": state}, 2.0, tmp_path).deltas()
    assert len(trained["transformer"]) == len(linears)
    names = comfyui_key_map(family, build(0))
    patches, unused = apply_kohya(load_file(path), names)
    assert unused == set()
    expected = expected_native(trained, names, build(0))
    assert native_error(patches, expected) <= TOLERANCE and len(patches) == len(expected)


def test_a_reference_gets_its_targets_crop_flip_and_bucket(tmp_path):
    """Random crops, random flips and aspect buckets: a reference that is the target itself comes out identical to
    it, and one stored at twice the size matches it up to resampling (it is resized to the target's size first)."""
    import json

    import numpy as np
    from PIL import Image

    from diffusers_ztsnr.training.data import load_image_caption_dataset, make_buckets
    from diffusers_ztsnr.training.data.reference import ReferenceImageDataset

    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate([(40, 64), (64, 40), (48, 48), (36, 72)]):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        image.save(tmp_path / f"{i}.png")
        (tmp_path / "ref").mkdir(exist_ok=True)
        image.resize((2 * w, 2 * h), Image.Resampling.BICUBIC).save(tmp_path / "ref" / f"{i}.png")
        # "twin_file_name": datasets loads it as the image column "twin"
        rows.append({"file_name": f"{i}.png", "text": "x", "same": f"{i}.png", "big": f"ref/{i}.png",
                     "twin_file_name": f"{i}.png"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_image_caption_dataset(train_data_dir=tmp_path)
    options = dict(data_dir=tmp_path, resolution=32, center_crop=False, random_flip=True, buckets=make_buckets(32, 8))
    same = ReferenceImageDataset(raw, cond_image_column="same", **options)
    big = ReferenceImageDataset(raw, cond_image_column="big", **options)
    twin = ReferenceImageDataset(raw, cond_image_column="twin", **options)
    shapes = set()
    for epoch in range(3):
        same.set_epoch(epoch)
        big.set_epoch(epoch)
        twin.set_epoch(epoch)
        for i in range(len(same)):
            item, scaled = same[i], big[i]
            shapes.add(tuple(item["pixel_values"].shape))
            assert torch.equal(item["cond_pixel_values"], item["pixel_values"])
            assert torch.equal(twin[i]["cond_pixel_values"], item["pixel_values"])
            assert torch.equal(scaled["pixel_values"], item["pixel_values"])
            assert (scaled["cond_pixel_values"] - item["pixel_values"]).abs().mean() < 0.05
    assert len(shapes) > 1  # several buckets were exercised


def test_kontext_trains_the_same_from_cached_reference_latents(assets, tmp_path):
    cache = ["--cache_latents", "--cache_latents_dir", str(tmp_path / "cache")]
    first = flow_main(argv(assets, "kontext", tmp_path / "a", 2, *cache))
    second = flow_main(argv(assets, "kontext", tmp_path / "b", 2, *cache))
    plain = flow_main(argv(assets, "kontext", tmp_path / "c", 2))
    assert first["cache"] == {"hits": 0, "misses": 4} and second["cache"] == {"hits": 4, "misses": 0}
    import numpy as np

    np.testing.assert_allclose(second["losses"], plain["losses"], rtol=1e-4)
    # the references are part of the cache key: without them the same images are encoded anew
    text_to_image = argv(assets, "kontext", tmp_path / "d", 1, *cache)
    text_to_image = [a for a in text_to_image if a not in ("--cond_image_column", "reference")]
    assert flow_main(text_to_image)["cache"] == {"hits": 0, "misses": 4}


def test_kontext_feeds_the_transformer_what_its_pipeline_feeds_it_with_a_reference(assets):
    """Same latents, time, prompt and reference image: our training forward passes FluxKontextPipeline's inputs (the
    reference tokens after the noisy ones, their ids, the guidance value)."""
    from PIL import Image

    from diffusers_ztsnr.training.data import image_to_tensor

    kontext = task(assets, "kontext")
    pipe, transformer = kontext.pipe, kontext.denoiser
    with Image.open(assets["data"] / "ref" / "001.png") as image:
        reference = image.convert("RGB")
    with torch.no_grad():
        sampled = _transformer_inputs(transformer, lambda: pipe(
            image=reference, prompt="a red disc", num_inference_steps=1, height=RES, width=RES, max_area=RES ** 2,
            _auto_resize=False, output_type="latent", generator=torch.Generator().manual_seed(0)))
        tokens = sampled["hidden_states"].shape[1] // 2
        noisy = kontext.unpack(sampled["hidden_states"][:, :tokens], (1, 16, RES // 2, RES // 2))
        reference_latents = kontext.encode_images(image_to_tensor(reference)[None])
        cond = kontext.encode_prompts(["a red disc"], "cpu")
        trained = _transformer_inputs(transformer, lambda: kontext.predict(
            transformer, noisy, sampled["timestep"], cond, torch.float32, reference=reference_latents))
    for key in ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states", "txt_ids",
                "img_ids"):
        torch.testing.assert_close(trained[key].float(), sampled[key].float(), msg=key, atol=1e-5, rtol=1e-5)


def test_kontext_validation_samples_from_the_reference_at_the_training_size(assets):
    reference = assets["data"] / "ref" / "002.png"
    kontext = task(assets, "kontext", "--validation_prompt", "x", "--validation_image", str(reference))
    args = flow_args(argv(assets, "kontext", "unused", 1))
    kwargs = kontext.validation_kwargs(args)
    assert kwargs["image"].size == (RES, RES) and kwargs["_auto_resize"] is False
    assert kwargs["max_area"] == RES ** 2 and kwargs["guidance_scale"] == 3.5
    plain = task(assets, "kontext").validation_kwargs(args)
    assert "image" not in plain and plain["max_area"] == RES ** 2  # text-to-image validation at the training size


def test_kontext_trains_with_loss_masks_beside_the_references(assets, tmp_path):
    """``--masked_loss`` masks (``<stem>-masklabel.png`` beside each image) reach the reference dataset: a mask
    that ignores everything leaves no loss to train on, one that keeps everything trains as without masks."""
    import shutil

    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(assets["data"], data)
    for value, name in ((255, "keep"), (0, "drop")):
        for image in sorted(data.glob("*.png")):
            Image.new("L", (RES, RES), value).save(image.with_name(f"{image.stem}-masklabel.png"))
        args = argv(assets, "kontext", tmp_path / name, 1, "--masked_loss")
        args[args.index("--train_data_dir") + 1] = str(data)
        result = flow_main(args)
        if value:
            plain = flow_main(argv(assets, "kontext", tmp_path / "plain", 1))
            np.testing.assert_allclose(result["losses"], plain["losses"], rtol=1e-5)
        else:
            assert result["losses"][0] == 0.0
