"""LoRA module names for Qwen-Image, Z-Image and FLUX.2 in the kohya layout, as ComfyUI maps them.

Every module is stored as ``<name>.lora_down.weight`` ``[rank, in]``, ``<name>.lora_up.weight`` ``[out, rank]`` and
``<name>.alpha``; the delta is ``lora_up @ lora_down * alpha / rank`` (:mod:`diffusers_ztsnr.lora_keys`). The names,
per ComfyUI's ``comfy/lora.py`` ``model_lora_keys_unet``:

* ``qwen-image``: ``lora_unet_<native key, "." -> "_">``, the generic rule for every weight of the loaded model;
  ComfyUI's Qwen-Image model keeps diffusers' module names, so the native key is the diffusers path (musubi-tuner
  writes these names; diffusers' ``_convert_non_diffusers_qwen_lora_to_diffusers`` reads them back).
* ``z-image``: ``diffusion_model.<diffusers path>``, which ComfyUI's Lumina2 branch maps through ``comfy/utils.py``
  ``z_image_to_diffusers`` (q, k and v as row slices of the native fused ``attention.qkv``; ``to_out.0`` ->
  ``attention.out``; ``all_x_embedder.2-1`` -> ``x_embedder``; ...). ComfyUI's ``lora_unet_`` names would be the
  native fused ones, which diffusers' Z-Image converter does not read; these names are read by both.
* ``flux2-klein`` and ``flux2`` (FLUX.2 dev, the same transformer class): BFL names
  ``lora_unet_double_blocks_N_{img,txt}_{attn_qkv,attn_proj,mlp_0,mlp_2}``,
  ``lora_unet_single_blocks_N_{linear1,linear2}`` and the global ``img_in``, ``txt_in``, ``time_in_*``,
  ``double_stream_modulation_{img,txt}_lin``, ``single_stream_modulation_lin``, ``final_layer_*`` (ComfyUI's Flux2 is
  its Flux model; the generic ``lora_unet_`` rule applies). Separate q, k, v LoRAs are joined into one of rank
  ``3 * rank`` on the fused ``qkv`` (block-diagonal ``lora_up``, ``alpha * 3``; the layout diffusers'
  ``_convert_kohya_flux2_lora_to_diffusers`` splits back exactly); ``norm_out.linear`` has its output halves swapped
  ((scale, shift) in diffusers, (shift, scale) in BFL's ``final_layer.adaLN_modulation.1``). diffusers' converter
  reads the attention, MLP, embedder and ``final_layer.linear`` names; ComfyUI all of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .lora_keys import KohyaSlot, _fuse, _swap_halves
from .markers import marker_metadata

DIT_FAMILIES = ("qwen-image", "z-image", "flux2-klein", "flux2")
_Z_IMAGE_MODULE = re.compile(
    r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123]"
    r"|adaLN_modulation\.0)|all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|all_x_embedder\.2-1|cap_embedder\.1"
    r"|t_embedder\.mlp\.[02]")
_FLUX2_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3), "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3), "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.to_add_out": ("txt_attn.proj", 0, 1), "ff.linear_in": ("img_mlp.0", 0, 1),
    "ff.linear_out": ("img_mlp.2", 0, 1), "ff_context.linear_in": ("txt_mlp.0", 0, 1),
    "ff_context.linear_out": ("txt_mlp.2", 0, 1),
}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_FLUX2_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def _flux2_slot(path: str) -> KohyaSlot | None:
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path):
        if m[2] in _FLUX2_DOUBLE:
            native, part, parts = _FLUX2_DOUBLE[m[2]]
            return KohyaSlot(f"lora_unet_double_blocks_{m[1]}_{native.replace('.', '_')}", part, parts)
        return None
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", path):
        native = _FLUX2_SINGLE.get(m[2])
        return KohyaSlot(f"lora_unet_single_blocks_{m[1]}_{native}") if native else None
    native = _FLUX2_GLOBAL.get(path)
    return KohyaSlot(f"lora_unet_{native.replace('.', '_')}", swap_halves=path == "norm_out.linear") if native else None


def comfyui_slot(family: str, path: str) -> KohyaSlot:
    """Where the LoRA of transformer module ``path`` goes (name, fused part); ValueError when ComfyUI has no name for
    it in ``family``."""
    slot = None
    if family == "qwen-image":
        slot = KohyaSlot(f"lora_unet_{path.replace('.', '_')}")
    elif family == "z-image":
        slot = KohyaSlot(f"diffusion_model.{path}") if _Z_IMAGE_MODULE.fullmatch(path) else None
    elif family in ("flux2-klein", "flux2"):
        slot = _flux2_slot(path)
    else:
        raise ValueError(f"family={family!r}; allowed: {', '.join(DIT_FAMILIES)}")
    if slot is None:
        raise ValueError(f"transformer.{path} has no name in ComfyUI's LoRA keys for {family}")
    return slot


def comfyui_state_dict(family: str, state: Mapping[str, torch.Tensor], alpha: float,
                       denoiser_config: Mapping) -> dict[str, torch.Tensor]:
    """The kohya-layout state dict of the transformer's peft LoRA ``state`` (trained with ``lora_alpha = alpha``) in
    ComfyUI's names for ``family``; fused parts joined as the module docstring says."""
    inner = int(denoiser_config.get("num_attention_heads", 0)) * int(denoiser_config.get("attention_head_dim", 0))
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    sizes: dict[str, int] = {}
    for path in sorted({k.rsplit(".lora_A.", 1)[0] for k in state if ".lora_A." in k}):
        slot = comfyui_slot(family, path)
        a, b = state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]
        groups.setdefault(slot.name, {})[slot.part] = (a, _swap_halves(b) if slot.swap_halves else b)
        sizes[slot.name] = slot.parts
    out: dict[str, torch.Tensor] = {}
    for name, parts in sorted(groups.items()):
        down, up = parts[0] if sizes[name] == 1 else _fuse(parts, [inner] * sizes[name])
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha) * sizes[name])
    return out


def save_comfyui_lora(path: Path, family: str, state: Mapping[str, torch.Tensor], alpha: float,
                      denoiser_config: Mapping, base_model: str = "") -> Path:
    """Write :func:`comfyui_state_dict` with sd-scripts' metadata (rank, alpha, base model, ``modelspec.architecture``
    as :func:`diffusers_ztsnr.markers.marker_metadata` names the family)."""
    tensors = comfyui_state_dict(family, state, alpha, denoiser_config)
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(min(ranks)),
                "ss_network_alpha": str(alpha), "ss_sd_model_name": base_model,
                **marker_metadata("flow_prediction", False, family)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
