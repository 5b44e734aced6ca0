"""Module names of the kohya / sd-scripts LoRA format, and how diffusers' modules map onto them.

The format (kohya-ss/sd-scripts ``networks/lora.py``, ``networks/lora_sd3.py``, ``networks/lora_flux.py``): one LoRA
module is named ``<prefix>_<module path in sd-scripts' own model, "." replaced by "_">`` and stored as
``<name>.lora_down.weight`` ``[rank, in]``, ``<name>.lora_up.weight`` ``[out, rank]`` and ``<name>.alpha`` (a scalar);
the weight delta is ``lora_up @ lora_down * alpha / rank`` with ``rank = lora_down.shape[0]``. ComfyUI
(``comfy/lora.py`` ``load_lora``), diffusers' kohya converters and sd-scripts' own loader all apply it so.

Prefixes: ``lora_unet`` for the denoiser of every family (sd-scripts' SD3 / Flux scripts keep it "to make ComfyUI
compatible"); ``lora_te`` for the SD 1.x / 2.x text encoder; ``lora_te1`` / ``lora_te2`` for SDXL's and SD3's CLIP-L /
CLIP-G; ``lora_te1`` for Flux's CLIP-L. ComfyUI's ``model_lora_keys_clip`` maps exactly these, followed by
``text_model_encoder_layers_N_{self_attn_q_proj, ..., mlp_fc1, mlp_fc2}``: the transformers CLIP layout with its
``text_model.`` level, which transformers 5's ``CLIPTextModel`` no longer has, so it is restored here.

Module paths of the denoiser, i.e. the names ComfyUI's ``model_lora_keys_unet`` accepts as ``lora_unet_<native key>``:

* SD 1.x / 2.x: diffusers' UNet names (sd-scripts trains its ``original_unet.py``, which mirrors them; ComfyUI maps
  them through ``comfy/utils.py`` ``unet_to_diffusers``; diffusers reads them back unchanged).
* SDXL: the sgm UNet of sd-scripts' ``sdxl_original_unet.py``: ``input_blocks.{1 + level * (layers_per_block + 1)
  + layer}.1`` for ``down_blocks.level.attentions.layer``, ``middle_block.1``, ``output_blocks.{level *
  (layers_per_block + 1) + layer}.1``; inside a transformer the names are diffusers' (``unet_to_diffusers``; diffusers'
  ``_maybe_map_sgm_blocks_to_diffusers`` reads them back).
* SD3: MMDiT (``joint_blocks.N.{x_block, context_block}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
  adaLN_modulation.1}``), as ``comfy/utils.py`` ``mmdit_to_diffusers`` pairs them with diffusers' names.
* Flux: BFL (``double_blocks.N.{img, txt}_{attn.qkv, attn.proj, mlp.0, mlp.2, mod.lin}``, ``single_blocks.N.{linear1,
  linear2, modulation.lin}``), as ``comfy/utils.py`` ``flux_to_diffusers`` pairs them.

Where the native model has one fused projection (``qkv``; Flux's ``linear1`` = q, k, v and the MLP input) and diffusers
has several, the LoRA of the parts is written as one LoRA of rank ``parts * rank``: ``lora_down`` stacks the parts'
``lora_A`` (zeros for a part that was not trained), ``lora_up`` is block diagonal in the parts' ``lora_B``, and
``alpha`` is multiplied by ``parts`` so that ``alpha / rank`` stays the trained scale. This is the layout sd-scripts
writes for its split-qkv Flux LoRAs and the one diffusers' ``_convert_kohya_flux_lora_to_diffusers`` splits back
exactly (its "sparse" case). Outputs that the native model orders (shift, scale) where diffusers has (scale, shift)
(``norm_out.linear``; SD3's last ``norm1_context.linear``) get their ``lora_up`` halves swapped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .lora_keys_flux_like import PIPELINE_FAMILIES, chroma_global_name

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "chroma")
FLOW_FAMILIES = ("sd3", "flux", "chroma")
UNET_PREFIX = "lora_unet"
#: sd-scripts' prefix per text-encoder component of each family (T5 is never trained here)
TEXT_ENCODER_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": "lora_te"},
    "sd2": {"text_encoder": "lora_te"},
    "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "sd3": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "flux": {"text_encoder": "lora_te1"},
    "chroma": {},
}
#: the CLIP projections ComfyUI's ``LORA_CLIP_MAP`` knows
_CLIP_LAYER = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")

# diffusers path inside a block -> (native path, part, parts); comfy/utils.py MMDIT_MAP_BLOCK and its qkv slices
_SD3_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0, 3), "attn.to_k": ("x_block.attn.qkv", 1, 3),
    "attn.to_v": ("x_block.attn.qkv", 2, 3), "attn.to_out.0": ("x_block.attn.proj", 0, 1),
    "attn.add_q_proj": ("context_block.attn.qkv", 0, 3), "attn.add_k_proj": ("context_block.attn.qkv", 1, 3),
    "attn.add_v_proj": ("context_block.attn.qkv", 2, 3), "attn.to_add_out": ("context_block.attn.proj", 0, 1),
    "attn2.to_q": ("x_block.attn2.qkv", 0, 3), "attn2.to_k": ("x_block.attn2.qkv", 1, 3),
    "attn2.to_v": ("x_block.attn2.qkv", 2, 3), "attn2.to_out.0": ("x_block.attn2.proj", 0, 1),
    "ff.net.0.proj": ("x_block.mlp.fc1", 0, 1), "ff.net.2": ("x_block.mlp.fc2", 0, 1),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", 0, 1), "ff_context.net.2": ("context_block.mlp.fc2", 0, 1),
    "norm1.linear": ("x_block.adaLN_modulation.1", 0, 1),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", 0, 1),
}
_SD3_GLOBAL = {
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# comfy/utils.py flux_to_diffusers: block maps and the qkv / linear1 slices
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3), "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3), "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.to_add_out": ("txt_attn.proj", 0, 1), "ff.net.0.proj": ("img_mlp.0", 0, 1), "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1), "ff_context.net.2": ("txt_mlp.2", 0, 1),
    "norm1.linear": ("img_mod.lin", 0, 1), "norm1_context.linear": ("txt_mod.lin", 0, 1),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation.lin", 0, 1),
}
_FLUX_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


@dataclass(frozen=True)
class KohyaSlot:
    """Where one diffusers module's LoRA goes in the kohya file: module ``name``, ``part`` of ``parts`` (a fused
    native projection has several), and whether its output halves are swapped ((scale, shift) -> (shift, scale))."""

    name: str
    part: int = 0
    parts: int = 1
    swap_halves: bool = False


def model_family(pipeline_class_name: str, denoiser_config: Mapping) -> str:
    """``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux`` (FLUX.1 and Kontext) or ``chroma``; an SD 2.x UNet is told
    by its 1024-wide cross-attention (OpenCLIP ViT-H), where SD 1.x has 768 (CLIP ViT-L)."""
    families = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
                **PIPELINE_FAMILIES}
    if pipeline_class_name in families:
        return families[pipeline_class_name]
    if pipeline_class_name != "StableDiffusionPipeline":
        raise ValueError(f"no kohya naming for {pipeline_class_name}")
    return "sd2" if denoiser_config.get("cross_attention_dim") == 1024 else "sd1"


def _sgm_unet_path(path: str, config: Mapping) -> str | None:
    """sgm name of a module inside a diffusers SDXL UNet attention block, or None outside those."""
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        return None
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"output_blocks.{int(m[1]) * (layers + 1) + int(m[2])}.1.{m[3]}"
    return None


def _transformer_slot(family: str, path: str, config: Mapping) -> KohyaSlot | None:
    """Native (MMDiT / BFL) slot of a flow-transformer module, or None when the convention has no name for it."""
    if family == "sd3":
        blocks = (("transformer_blocks", "joint_blocks", _SD3_BLOCK),)
        global_map = _SD3_GLOBAL
        last = f"transformer_blocks.{config.get('num_layers', 0) - 1}.norm1_context.linear"
        swapped = ("norm_out.linear", last)
    else:
        blocks = (("transformer_blocks", "double_blocks", _FLUX_DOUBLE),
                  ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE))
        global_map, swapped = _FLUX_GLOBAL, ("norm_out.linear",)
        if family == "chroma":  # FLUX.1's blocks; its own modules outside them (lora_keys_flux_like)
            native = chroma_global_name(path, config)
            global_map, swapped = ({path: native} if native else {}), ()
    for diffusers_prefix, native_prefix, block_map in blocks:
        m = re.fullmatch(rf"{diffusers_prefix}\.(\d+)\.(.+)", path)
        if m and m[2] in block_map:
            native, part, parts = block_map[m[2]]
            return KohyaSlot(f"{native_prefix}.{m[1]}.{native}", part, parts, path in swapped)
    if path in global_map:
        return KohyaSlot(global_map[path], swap_halves=path in swapped)
    return None


def kohya_slot(family: str, component: str, path: str, denoiser_config: Mapping) -> KohyaSlot:
    """The kohya module (name with its prefix) that holds the LoRA of diffusers module ``path`` of pipeline
    component ``component``; ValueError when sd-scripts / ComfyUI have no name for it."""
    if component in ("unet", "transformer"):
        if family in ("sd1", "sd2"):
            slot = KohyaSlot(path)
        elif family == "sdxl":
            native = _sgm_unet_path(path, denoiser_config)
            slot = KohyaSlot(native) if native else None
        else:
            slot = _transformer_slot(family, path, denoiser_config)
        prefix = UNET_PREFIX
    else:
        prefix = TEXT_ENCODER_PREFIXES[family].get(component)
        inner = path.removeprefix("text_model.")
        slot = KohyaSlot(f"text_model.{inner}") if prefix and _CLIP_LAYER.fullmatch(inner) else None
    if slot is None:
        raise ValueError(f"{component}.{path} has no name in the kohya / ComfyUI convention for {family}")
    return KohyaSlot(f"{prefix}_{slot.name.replace('.', '_')}", slot.part, slot.parts, slot.swap_halves)


def fused_part_rows(name: str, denoiser_config: Mapping) -> list[int]:
    """Output rows of each part of fused kohya module ``name``: q, k, v of ``inner`` rows each, and Flux's MLP input
    of ``4 * inner`` rows (``mlp_ratio`` 4, fixed in diffusers' and BFL's Flux)."""
    inner = int(denoiser_config["num_attention_heads"]) * int(denoiser_config["attention_head_dim"])
    return [inner] * 3 + ([4 * inner] if name.endswith("_linear1") else [])


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({key.rsplit(".lora_A.", 1)[0] for key in state if ".lora_A." in key})


def _fuse(parts: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_down`` / ``lora_up`` of one fused module from its parts' ``(lora_A, lora_B)`` (missing parts: zero)."""
    a0, _ = next(iter(parts.values()))
    rank, n = a0.shape[0], len(rows)
    down = a0.new_zeros(n * rank, a0.shape[1])
    up = a0.new_zeros(sum(rows), n * rank)
    for j, (a, b) in parts.items():
        if a.shape[0] != rank or b.shape[0] != rows[j]:
            raise ValueError(f"part {j}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit rank {rank} and "
                             f"{rows[j]} output rows")
        down[j * rank:(j + 1) * rank] = a
        start = sum(rows[:j])
        up[start:start + rows[j], j * rank:(j + 1) * rank] = b
    return down, up


def to_kohya_state_dict(family: str, states: Mapping[str, Mapping[str, torch.Tensor]], alpha: float,
                        denoiser_config: Mapping) -> dict[str, torch.Tensor]:
    """The kohya state dict of peft LoRA states (``{component: {"<path>.lora_A.weight": ...}}``) trained with
    ``lora_alpha = alpha``: every module named by :func:`kohya_slot`, fused parts joined as the module docstring
    says, so that each consumer applies exactly the trained ``lora_B @ lora_A * alpha / rank``."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; allowed: {', '.join(FAMILIES)}")
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    sizes: dict[str, int] = {}
    for component, state in states.items():
        for path in _lora_modules(state):
            slot = kohya_slot(family, component, path, denoiser_config)
            a, b = state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]
            groups.setdefault(slot.name, {})[slot.part] = (a, _swap_halves(b) if slot.swap_halves else b)
            sizes[slot.name] = slot.parts
    out: dict[str, torch.Tensor] = {}
    for name, parts in sorted(groups.items()):
        if sizes[name] == 1:
            down, up = parts[0]
        else:
            down, up = _fuse(parts, fused_part_rows(name, denoiser_config))
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha) * sizes[name])
    return out


def _slots_of(family: str, components: Mapping[str, torch.nn.Module], denoiser_config: Mapping) -> dict[str, list]:
    """``{kohya module name: [(component, path, slot), ...]}`` for every Linear of ``components`` that has one."""
    slots: dict[str, list] = {}
    for component, model in components.items():
        for path, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            try:
                slot = kohya_slot(family, component, path, denoiser_config)
            except ValueError:
                continue
            slots.setdefault(slot.name, []).append((component, path, slot))
    return slots


def _split(down: torch.Tensor, up: torch.Tensor, rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per part ``(lora_A, lora_B)`` of a fused LoRA: the diagonal blocks when ``lora_up`` is block diagonal, else the
    whole ``lora_down`` with the part's rows of ``lora_up`` (the same delta either way)."""
    n, ups = len(rows), up.split(rows, dim=0)
    if down.shape[0] % n == 0:
        r = down.shape[0] // n
        blocks = [(down[j * r:(j + 1) * r], ups[j][:, j * r:(j + 1) * r]) for j in range(n)]
        if all(torch.count_nonzero(ups[j]) == torch.count_nonzero(b) for j, (_, b) in enumerate(blocks)):
            return blocks
    return [(down, u) for u in ups]


def from_kohya_state_dict(family: str, kohya: Mapping[str, torch.Tensor], components: Mapping[str, torch.nn.Module],
                          denoiser_config: Mapping) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_kohya_state_dict` for the modules of ``components`` (``{pipeline component name:
    model}``): peft names ``<component>.<path>.lora_A.weight`` / ``.lora_B.weight``, ``alpha / rank`` folded into
    ``lora_A`` (a state dict without adapter metadata plays back at scale 1 in diffusers), fused parts written as
    zeros (untrained) left out. ValueError naming the kohya modules that ``components`` do not have."""
    slots = _slots_of(family, components, denoiser_config)
    names = sorted({key.split(".", 1)[0] for key in kohya})
    unknown = [name for name in names if name not in slots]
    if unknown:
        raise ValueError(f"{len(unknown)} kohya modules have no {family} module here: {', '.join(unknown[:5])}")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        down, up = kohya[f"{name}.lora_down.weight"].float(), kohya[f"{name}.lora_up.weight"].float()
        alpha = float(kohya.get(f"{name}.alpha", down.shape[0]))
        down = down * (alpha / down.shape[0])
        members = slots[name]
        parts = _split(down, up, fused_part_rows(name, denoiser_config)) if members[0][2].parts > 1 else [(down, up)]
        for component, path, slot in members:
            a, b = parts[slot.part]
            if slot.parts > 1 and not a.any():
                continue  # a part written as zeros: not trained
            out[f"{component}.{path}.lora_A.weight"] = a.contiguous()
            out[f"{component}.{path}.lora_B.weight"] = (_swap_halves(b) if slot.swap_halves else b).contiguous()
    return out
