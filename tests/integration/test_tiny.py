"""Tiny offline pipelines: end-to-end runs, determinism, save / reload round trips and tokenizers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from diffusers_ztsnr.testing.released_schedulers import (  # noqa: E402
    RELEASED_SCHEDULER_NAMES,
    SCHEDULER_CONFIGS_DIR,
    released_scheduler_config,
)
from diffusers_ztsnr.testing.tiny import (  # noqa: E402
    TINY_KINDS,
    load_tiny_pipeline,
    make_tiny_pipeline,
    save_tiny_pipeline,
    tiny_pipeline_class,
)
from diffusers_ztsnr.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer  # noqa: E402

SIZE = 64
PROMPT = "a photo of a cat"

EXPECTED_CLASSES = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
}
# output_type="latent" at 64 x 64 px (Flux returns its packed 2x2 token sequence)
EXPECTED_LATENT_SHAPES = {
    "sd15": (1, 4, 32, 32),
    "sdxl": (1, 4, 32, 32),
    "sd3": (1, 16, 32, 32),
    "flux": (1, 256, 64),
}


def _run(pipe: DiffusionPipeline, seed: int = 0, output_type: str = "np", **kwargs):
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        output_type=output_type,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


def _modules(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _tokenizers(pipe: DiffusionPipeline) -> dict:
    return {k: v for k, v in pipe.components.items() if k.startswith("tokenizer") and v is not None}


def _assert_same_weights(a: DiffusionPipeline, b: DiffusionPipeline) -> None:
    ma, mb = _modules(a), _modules(b)
    assert ma.keys() == mb.keys()
    for name in ma:
        sa, sb = ma[name].state_dict(), mb[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def _public_config(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def tiny_pipes() -> dict[str, DiffusionPipeline]:
    return {kind: make_tiny_pipeline(kind) for kind in TINY_KINDS}


@pytest.fixture(scope="module")
def reference_images(tiny_pipes) -> dict[str, np.ndarray]:
    return {kind: _run(pipe) for kind, pipe in tiny_pipes.items()}


def test_kinds():
    assert TINY_KINDS == ("sd15", "sdxl", "sd3", "flux")
    for kind in TINY_KINDS:
        assert tiny_pipeline_class(kind) is EXPECTED_CLASSES[kind]


@pytest.mark.parametrize("bad", ["sd2", "SD15", "", "flux-dev"])
def test_unknown_kind_raises(bad, tmp_path):
    with pytest.raises(ValueError, match="sd15, sdxl, sd3, flux"):
        make_tiny_pipeline(bad)
    with pytest.raises(ValueError, match="allowed kinds"):
        save_tiny_pipeline(bad, tmp_path)
    with pytest.raises(ValueError, match="allowed kinds"):
        tiny_pipeline_class(bad)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_end_to_end_runs_and_is_deterministic(kind, tiny_pipes, reference_images):
    pipe = tiny_pipes[kind]
    assert type(pipe) is EXPECTED_CLASSES[kind]
    assert pipe.vae_scale_factor == 2
    image = reference_images[kind]
    assert image.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.01  # not a constant image
    np.testing.assert_array_equal(_run(pipe), image)  # same generator seed -> identical
    assert not np.array_equal(_run(pipe, seed=1), image)  # the noise matters


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_latent_shapes(kind, tiny_pipes):
    latents = _run(tiny_pipes[kind], output_type="latent")
    assert tuple(latents.shape) == EXPECTED_LATENT_SHAPES[kind]
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_weights_are_seeded(kind, tiny_pipes):
    state = torch.random.get_rng_state()
    again = make_tiny_pipeline(kind, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    _assert_same_weights(tiny_pipes[kind], again)
    other = make_tiny_pipeline(kind, seed=1)
    name, module = next(iter(_modules(other).items()))
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            module.state_dict().values(), _modules(again)[name].state_dict().values(), strict=True
        )
    )
    for module in _modules(again).values():
        assert not module.training
        assert next(module.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_vocab_sizes_cover_tokenizers(kind, tiny_pipes):
    pipe = tiny_pipes[kind]
    encoders = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2", "tokenizer_3": "text_encoder_3"}
    tokenizers = _tokenizers(pipe)
    assert tokenizers
    for tok_name, tokenizer in tokenizers.items():
        encoder = getattr(pipe, encoders[tok_name])
        assert len(tokenizer) <= encoder.config.vocab_size, tok_name
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        assert max(ids) < encoder.config.vocab_size


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_save_and_reload_offline(kind, tiny_pipes, reference_images, tmp_path):
    path = save_tiny_pipeline(kind, tmp_path / kind)
    assert path == tmp_path / kind
    assert (path / "model_index.json").is_file()
    assert list(path.rglob("*.safetensors"))
    assert not list(path.rglob("*.bin"))

    loaded = tiny_pipeline_class(kind).from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    original = tiny_pipes[kind]
    assert type(loaded) is type(original)
    _assert_same_weights(original, loaded)
    assert type(loaded.scheduler) is type(original.scheduler)
    assert _public_config(loaded.scheduler.config) == _public_config(original.scheduler.config)
    for name, tokenizer in _tokenizers(original).items():
        reloaded = getattr(loaded, name)
        assert type(reloaded) is type(tokenizer)
        assert len(reloaded) == len(tokenizer)
        assert reloaded.model_max_length == tokenizer.model_max_length
        for text in (PROMPT, "Hello, World! 123 é", ""):
            assert reloaded(text).input_ids == tokenizer(text).input_ids

    # A plain from_pretrained leaves the weights at unaligned offsets of the safetensors buffer, and MKL
    # may then round differently in the last bit: equal to float32 round-off.
    image = _run(loaded)
    np.testing.assert_allclose(image, reference_images[kind], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(_run(loaded), image)

    # load_tiny_pipeline re-allocates the weights: bitwise identical to the freshly built pipeline.
    exact = load_tiny_pipeline(kind, path)
    np.testing.assert_array_equal(_run(exact), reference_images[kind])

    # The generic entry point resolves the same class from model_index.json.
    generic = DiffusionPipeline.from_pretrained(path)
    assert type(generic) is EXPECTED_CLASSES[kind]


def test_default_schedulers(tiny_pipes):
    sd15 = tiny_pipes["sd15"].scheduler
    assert isinstance(sd15, PNDMScheduler)
    expected = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        clip_sample=False,
    )
    assert {k: sd15.config[k] for k in expected} == expected
    # keys the class ignores survive, so a scheduler swap sees the checkpoint's values
    assert DDIMScheduler.from_config(sd15.config).config.clip_sample is False

    sdxl = tiny_pipes["sdxl"].scheduler
    assert isinstance(sdxl, EulerDiscreteScheduler)
    expected = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
        prediction_type="epsilon",
    )
    assert {k: sdxl.config[k] for k in expected} == expected

    sd3 = tiny_pipes["sd3"].scheduler
    assert isinstance(sd3, FlowMatchEulerDiscreteScheduler)
    assert sd3.config.shift == 3.0 and not sd3.config.use_dynamic_shifting

    flux = tiny_pipes["flux"].scheduler
    assert isinstance(flux, FlowMatchEulerDiscreteScheduler)
    expected = dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    assert {k: flux.config[k] for k in expected} == expected


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_schedulers_are_built_from_the_shipped_released_configs(kind, tiny_pipes):
    shipped = json.loads((SCHEDULER_CONFIGS_DIR / f"{kind}.json").read_text(encoding="utf-8"))
    assert shipped.pop("_diffusers_version")  # which diffusers wrote the file: not carried into the scheduler
    assert released_scheduler_config(kind) == shipped
    config = tiny_pipes[kind].scheduler.config
    assert {key: config[key] for key in shipped} == shipped


def test_every_released_config_is_shipped():
    assert sorted(path.stem for path in SCHEDULER_CONFIGS_DIR.glob("*.json")) == sorted(RELEASED_SCHEDULER_NAMES)
    with pytest.raises(ValueError, match="unknown released scheduler 'sd99'"):
        released_scheduler_config("sd99")


def test_architecture_invariants(tiny_pipes):
    sdxl = tiny_pipes["sdxl"]
    te1, te2 = sdxl.text_encoder.config, sdxl.text_encoder_2.config
    assert sdxl.unet.config.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert (
        sdxl.unet.config.projection_class_embeddings_input_dim
        == 6 * sdxl.unet.config.addition_time_embed_dim + te2.projection_dim
    )

    sd3 = tiny_pipes["sd3"]
    clip_width = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    t5_width = sd3.text_encoder_3.config.d_model
    assert sd3.transformer.config.joint_attention_dim == t5_width
    assert t5_width > clip_width  # the pipeline zero-pads the CLIP states up to the T5 width
    assert sd3.transformer.config.pooled_projection_dim == (
        sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    )

    flux = tiny_pipes["flux"]
    assert flux.transformer.config.in_channels == 4 * flux.vae.config.latent_channels
    assert flux.transformer.config.pooled_projection_dim == flux.text_encoder.config.hidden_size
    assert sum(flux.transformer.config.axes_dims_rope) == flux.transformer.config.attention_head_dim
    assert flux.vae.config.shift_factor is not None and sd3.vae.config.shift_factor is not None


def test_clip_pooling_uses_eos(tiny_pipes):
    pipe = tiny_pipes["sd15"]
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos_pos = ids[0].tolist().index(tokenizer.eos_token_id)
    assert eos_pos > 1 and ids[0, eos_pos + 1] == tokenizer.pad_token_id
    with torch.no_grad():
        out = encoder(ids)
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, eos_pos], rtol=0, atol=0)


def test_torch_dtype():
    pipe = make_tiny_pipeline("sd15", torch_dtype=torch.bfloat16)
    for module in _modules(pipe).values():
        assert next(module.parameters()).dtype == torch.bfloat16


def test_clip_tokenizer(tmp_path):
    tokenizer = build_clip_tokenizer(tmp_path / "clip")
    assert (tmp_path / "clip" / "vocab.json").is_file()
    assert (tmp_path / "clip" / "merges.txt").is_file()
    vocab = json.loads((tmp_path / "clip" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == len(tokenizer)
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id

    ids = tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "photo</w>", "of</w>"]  # merges apply
    text = "Any Text, even ünïcödé & emoji 🐱!"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]  # byte-level: nothing is unknown
    # CLIP decoding turns every "</w>" into a space, so compare without spaces
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")

    in_memory = build_clip_tokenizer()
    assert in_memory(text).input_ids == ids
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = type(tokenizer).from_pretrained(tmp_path / "saved")
    assert reloaded(text).input_ids == ids
    assert reloaded.model_max_length == 77


def test_t5_tokenizer(tmp_path):
    tokenizer = build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert not any("extra_id" in tok for tok in tokenizer.get_vocab())
    assert tokenizer.model_max_length == 512
    ids = tokenizer("The cat, and 3 dogs.", padding="max_length", max_length=24).input_ids
    assert len(ids) == 24
    assert ids[ids.index(1) + 1 :] == [0] * (23 - ids.index(1))
    assert tokenizer.unk_token_id not in ids
    assert "\u2581cat" in tokenizer.convert_ids_to_tokens(ids)

    saved = build_t5_tokenizer(tmp_path / "t5")
    assert (tmp_path / "t5" / "tokenizer.json").is_file()
    assert len(saved) == len(tokenizer)
    reloaded = type(tokenizer).from_pretrained(tmp_path / "t5")
    for text in ("The cat, and 3 dogs.", "ünknown ☃", ""):
        assert saved(text).input_ids == tokenizer(text).input_ids == reloaded(text).input_ids
