"""Tiny flow pipelines beyond SD3 and FLUX.1: SD3.5, FLUX.1 Kontext, Chroma, Lumina 2, Z-Image, FLUX.2 Klein,
Qwen-Image and Sana, random weights, offline.

Each is the real diffusers pipeline class around small models of the real architectures: SD3.5's transformer
adds RMS-normed queries and keys and dual-attention (MMDiT-X) blocks to SD3's; Kontext is FLUX.1's transformer in
``FluxKontextPipeline`` (which packs a reference image's latents beside the noisy ones when one is given); Chroma
is a FLUX.1-style transformer without CLIP and without guidance embedding, conditioned on T5 alone, its
modulations computed by a small approximator network; Lumina 2 is a single-stream DiT conditioned on a Gemma 2
decoder's hidden states (a locally made character-level Gemma tokenizer here); Z-Image is a single-stream DiT
conditioned on a Qwen3 decoder's hidden states of the chat-formatted prompt (a character-level Qwen tokenizer with
a ChatML template here); FLUX.2 Klein conditions FLUX.2's transformer on three hidden layers of a Qwen3 decoder,
stacked, and decodes with FLUX.2's batch-normalised VAE; Qwen-Image conditions its MMDiT on the last hidden layer
of Qwen2.5-VL (its language half; the vision tower is built but not used for text-to-image) and decodes with a
causal 3D VAE; Sana is a linear-attention DiT on Gemma 2 states and a deep-compression autoencoder, sampled by
DPM-Solver++ with flow sigmas.
"""

from __future__ import annotations

import string

from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DPMSolverMultistepScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5EncoderModel,
)

from .tiny_builders import _build_flux, _build_sd3, _scheduler, _seeded, _t5_config, _text_components, _vae
from .tokenizers import build_t5_tokenizer


def build_sd35(seed: int) -> StableDiffusion3Pipeline:
    """SD3's tiny pipeline with an SD3.5-style transformer: ``qk_norm="rms_norm"`` and dual attention in block 0
    (SD3.5 medium uses both; large uses the norm only)."""
    pipe = _build_sd3(seed)
    config = dict(pipe.transformer.config)
    keep = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
            "pos_embed_max_size")
    transformer = _seeded(seed, "transformer", lambda: SD3Transformer2DModel(
        **{k: config[k] for k in keep}, qk_norm="rms_norm", dual_attention_layers=(0,)))
    return StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer})


def build_flux_kontext(seed: int) -> FluxKontextPipeline:
    """FLUX.1 Kontext: FLUX.1's tiny components in the editing pipeline."""
    components = {k: v for k, v in _build_flux(seed).components.items() if v is not None}
    return FluxKontextPipeline(**components)


def build_chroma(seed: int) -> ChromaPipeline:
    """Chroma: T5 only; Flux's scheduler config (the pipeline passes sigmas and ``mu`` as FluxPipeline does)."""
    t5_width, latent_channels = 64, 16
    text = _text_components(seed, (build_t5_tokenizer(), lambda t: T5EncoderModel(_t5_config(t, t5_width))))
    transformer = _seeded(seed, "transformer", lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, axes_dims_rope=(4, 6, 6),
        approximator_hidden_dim=32, approximator_layers=1))
    vae = _seeded(seed, "vae", lambda: _vae(latent_channels, 0.3611, 0.1159, quant_conv=False))
    return ChromaPipeline(**text, transformer=transformer, vae=vae, scheduler=_scheduler("flux"))


def build_gemma_tokenizer(max_length: int = 256) -> GemmaTokenizer:
    """A character-level :class:`~transformers.GemmaTokenizer` (Gemma's special tokens, the space marker and the
    printable ASCII characters): no download, no SentencePiece model."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for piece in "\u2581" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(piece, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _gemma2(seed: int, tokenizer: GemmaTokenizer, width: int) -> Gemma2Model:
    return _seeded(seed, "text_encoder", lambda: Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)))


def build_lumina2(seed: int) -> Lumina2Pipeline:
    """Lumina 2: Gemma 2 text states, a VAE of spatial factor 8 (the pipeline assumes 8) with FLUX.1's latent
    normalisation, and Flux's scheduler config (the pipeline passes sigmas and ``mu`` as FluxPipeline does)."""
    tokenizer, width = build_gemma_tokenizer(), 32
    text_encoder = _gemma2(seed, tokenizer, width)
    transformer = _seeded(seed, "transformer", lambda: Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, hidden_size=64, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12), axes_lens=(300, 64, 64),
        cap_feat_dim=width))
    vae = _seeded(seed, "vae", lambda: AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=16,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False))
    return Lumina2Pipeline(transformer=transformer, scheduler=_scheduler("flux"), vae=vae,
                           text_encoder=text_encoder, tokenizer=tokenizer)


#: ChatML, the chat format of Qwen's instruction-tuned models
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """A character-level :class:`~transformers.Qwen2Tokenizer` with Qwen's special tokens and a ChatML template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for piece in " \n\u0120" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(piece, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_z_image(seed: int) -> ZImagePipeline:
    """Z-Image: Qwen3 text states of the chat-formatted prompt; Flux's VAE normalisation and scheduler config (the
    pipeline passes sigmas and ``mu``)."""
    tokenizer, width = build_qwen_tokenizer(), 32
    text_encoder = _seeded(seed, "text_encoder", lambda: Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16)))
    transformer = _seeded(seed, "transformer", lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=width, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64]))
    vae = _seeded(seed, "vae", lambda: _vae(16, 0.3611, 0.1159, quant_conv=False))
    return ZImagePipeline(scheduler=_scheduler("flux"), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


#: the Qwen3 layers FLUX.2 Klein stacks (the pipeline's ``text_encoder_out_layers``; its default is (9, 18, 27))
FLUX2_KLEIN_TEXT_LAYERS = (1, 2, 3)


def build_flux2_klein(seed: int) -> Flux2KleinPipeline:
    """FLUX.2 Klein: a 3-layer Qwen3 (call the pipeline with ``text_encoder_out_layers=FLUX2_KLEIN_TEXT_LAYERS``),
    FLUX.2's transformer without guidance embedding (the undistilled base), FLUX.2's VAE with 8 latent channels
    (32 after its 2x2 patching), and Flux's scheduler config (the pipeline passes sigmas and ``mu``)."""
    tokenizer, width = build_qwen_tokenizer(), 16
    text_encoder = _seeded(seed, "text_encoder", lambda: Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=len(FLUX2_KLEIN_TEXT_LAYERS), num_attention_heads=2, num_key_value_heads=1, head_dim=8)))
    transformer = _seeded(seed, "transformer", lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=len(FLUX2_KLEIN_TEXT_LAYERS) * width, timestep_guidance_channels=16,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False))
    vae = _seeded(seed, "vae", lambda: AutoencoderKLFlux2(
        block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=8, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False))
    return Flux2KleinPipeline(scheduler=_scheduler("flux"), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)


def build_qwen_image(seed: int) -> QwenImagePipeline:
    """Qwen-Image: a 2-layer Qwen2.5-VL (1-block vision tower), a causal 3D VAE of spatial factor 2, and Flux's
    scheduler config (the pipeline passes sigmas and ``mu``)."""
    tokenizer, width = build_qwen_tokenizer(), 32
    special = len(tokenizer)  # the vision token ids: past the vocabulary, never produced by this tokenizer
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=special + 4, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width),
        image_token_id=special, video_token_id=special + 1, vision_start_token_id=special + 2,
        vision_end_token_id=special + 3)
    text_encoder = _seeded(seed, "text_encoder", lambda: Qwen2_5_VLForConditionalGeneration(config))
    transformer = _seeded(seed, "transformer", lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=width, axes_dims_rope=(4, 6, 6)))
    vae = _seeded(seed, "vae", lambda: AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]))
    return QwenImagePipeline(scheduler=_scheduler("flux"), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def build_sana(seed: int) -> SanaPipeline:
    """Sana: Gemma 2 states, a 2-stage deep-compression autoencoder (spatial factor 2 here), and DPM-Solver++
    with ``use_flow_sigmas=True`` and ``flow_shift=3``, the kind of scheduler config Sana ships."""
    tokenizer, width = build_gemma_tokenizer(300), 32
    text_encoder = _gemma2(seed, tokenizer, width)
    vae = _seeded(seed, "vae", lambda: AutoencoderDC(
        latent_channels=8, attention_head_dim=8, encoder_block_types=("ResBlock",) * 2,
        decoder_block_types=("ResBlock",) * 2, encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407))
    transformer = _seeded(seed, "transformer", lambda: SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=width,
        sample_size=16))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, flow_shift=3.0,
                                            prediction_type="flow_prediction", use_flow_sigmas=True)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
