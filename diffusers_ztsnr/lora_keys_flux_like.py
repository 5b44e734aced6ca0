"""Kohya / ComfyUI names of the FLUX.1-derived families beyond FLUX.1 itself (used by :mod:`diffusers_ztsnr.lora_keys`).

* FLUX.1 Kontext (``FluxKontextPipeline``) is FLUX.1's transformer: family ``flux``, BFL names (ComfyUI loads
  Kontext as a Flux model, ``comfy/model_base.py``).
* Chroma (``ChromaPipeline``): family ``chroma``. Its native model (ComfyUI ``comfy/ldm/chroma/model.py``) keeps
  FLUX.1's double and single stream blocks (``double_blocks.N.{img, txt}_{attn.qkv, attn.proj, mlp.0, mlp.2}``,
  ``single_blocks.N.{linear1, linear2}``: the block maps of :mod:`diffusers_ztsnr.lora_keys` apply), without their
  modulation layers (the modulations come from one network, ``distilled_guidance_layer``, an ``Approximator`` of
  ``in_proj``, ``layers.N.{in_layer, out_layer}`` and ``out_proj``, ``comfy/ldm/chroma/layers.py``), with ``img_in``,
  ``txt_in`` and ``final_layer.linear`` (no ``adaLN_modulation``: nothing is swapped). ComfyUI's
  ``model_lora_keys_unet`` maps ``lora_unet_<native key, "." -> "_">`` for every weight of that model.
  sd-scripts names Chroma's architecture ``chroma`` (``library/sai_model_spec.py`` ``ARCH_FLUX_1_CHROMA``) and trains
  it with ``networks/lora_flux.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: pipeline class -> family, for the pipelines of this module
PIPELINE_FAMILIES = {"FluxKontextPipeline": "flux", "ChromaPipeline": "chroma"}
#: Chroma's modules outside the blocks: diffusers name -> native name
_CHROMA_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
_APPROXIMATOR_LAYER = re.compile(r"distilled_guidance_layer\.layers\.(\d+)\.linear_([12])")


def chroma_global_name(path: str, config: Mapping) -> str | None:
    """Native name of a Chroma module outside the blocks (diffusers' approximator layer ``linear_1`` / ``linear_2``
    is ComfyUI's ``MLPEmbedder`` ``in_layer`` / ``out_layer``), or None."""
    if path in _CHROMA_GLOBAL:
        return _CHROMA_GLOBAL[path]
    m = _APPROXIMATOR_LAYER.fullmatch(path)
    if m and int(m[1]) < int(config.get("approximator_layers", 0)):
        return f"distilled_guidance_layer.layers.{m[1]}.{'in_layer' if m[2] == '1' else 'out_layer'}"
    return None
