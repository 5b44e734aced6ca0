"""A tiny FLUX.2 dev (``Flux2Pipeline``), random weights, offline.

FLUX.2 dev conditions FLUX.2's transformer on three hidden layers of Mistral Small 3.1
(``Mistral3ForConditionalGeneration``, its language half; the Pixtral vision tower is built but not used for
text-to-image), stacked along the features:
the pipeline reads ``hidden_states[10]``, ``[20]`` and ``[30]``, so the tiny decoder has 30 layers of width 8. The
prompt reaches it through Mistral's chat template over the pipeline's ``format_input`` messages (a system turn, then
the user turn, each a list of ``{"type": "text"}`` parts), padded to ``max_sequence_length``. The released model's
``tokenizer`` is a ``PixtralProcessor``, whose module imports torchvision in transformers 5; text-to-image only calls
its ``apply_chat_template`` (with ``padding``, ``truncation``, ``max_length``), which the tokenizer itself has with
the same arguments and result, so the tiny pipeline's ``tokenizer`` is the character-level Llama-style tokenizer
(Mistral's special tokens, a local vocabulary) carrying the template. Only prompt upsampling
(``caption_upsample_temperature``), which decodes through the processor's ``tokenizer`` attribute, needs the
processor. Unlike Klein the transformer has FLUX.2 dev's guidance embedding
(``guidance_embeds=True``: the distilled guidance is an input, as for FLUX.1-dev). VAE and scheduler are Klein's.
"""

from __future__ import annotations

import string

from diffusers import Flux2Pipeline, Flux2Transformer2DModel
from transformers import LlamaTokenizer, Mistral3Config, Mistral3ForConditionalGeneration

from .tiny_builders import _scheduler, _seeded
from .tiny_flow_builders import build_flux2_klein

__all__ = ["FLUX2_TEXT_LAYERS", "MISTRAL_TEMPLATE", "build_flux2", "build_mistral_tokenizer"]

#: the Mistral hidden layers ``Flux2Pipeline`` stacks (its ``text_encoder_out_layers`` default)
FLUX2_TEXT_LAYERS = (10, 20, 30)

#: Mistral Small 3.1's turn markers over content lists; ``format_input`` gives one system and one user turn
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")

_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
             "[IMG_BREAK]", "[IMG_END]")


def build_mistral_tokenizer() -> LlamaTokenizer:
    """A character-level Llama-style tokenizer (Mistral's special tokens, ``\u2581`` for spaces, no merges) with
    :data:`MISTRAL_TEMPLATE` as its chat template."""
    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for piece in "\u2581\n" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(piece, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", add_prefix_space=False,
                               additional_special_tokens=list(_SPECIALS[4:]))
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def _mistral3(seed: int, vocab_size: int, width: int) -> Mistral3ForConditionalGeneration:
    special = vocab_size  # the image token id: past the vocabulary, never produced by this tokenizer
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=special + 1, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=max(FLUX2_TEXT_LAYERS), num_attention_heads=2, num_key_value_heads=1,
                         head_dim=4, max_position_embeddings=1024),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=64, patch_size=16),
        image_token_index=special, spatial_merge_size=2)
    return _seeded(seed, "text_encoder", lambda: Mistral3ForConditionalGeneration(config))


def build_flux2(seed: int) -> Flux2Pipeline:
    """FLUX.2 dev: a 30-layer Mistral 3 (width 8) and its chat-templated tokenizer, FLUX.2's transformer with the
    guidance embedding, and Klein's VAE (8 latent channels, 32 after 2x2 patching) and scheduler config (the
    pipeline passes sigmas and ``mu``)."""
    tokenizer, width = build_mistral_tokenizer(), 8
    text_encoder = _mistral3(seed, len(tokenizer), width)
    klein = build_flux2_klein(seed)
    transformer = _seeded(seed, "transformer", lambda: Flux2Transformer2DModel.from_config(
        klein.transformer.config, joint_attention_dim=len(FLUX2_TEXT_LAYERS) * width, guidance_embeds=True))
    return Flux2Pipeline(scheduler=_scheduler("flux"), vae=klein.vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
