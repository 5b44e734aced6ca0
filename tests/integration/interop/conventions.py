"""The kohya-format consumers other than diffusers, restated from their documented conventions.

Each consumer is a key map (LoRA module name -> a module of *its* model) plus the rule it applies a LoRA with.

* ComfyUI v0.8 ``comfy/lora.py``: ``model_lora_keys_unet`` maps ``lora_unet_<native state-dict key, "." -> "_">`` for
  every module of the loaded model, and diffusers-named UNet modules through ``comfy/utils.py`` ``unet_to_diffusers``;
  ``model_lora_keys_clip`` maps ``lora_te_text_model_encoder_layers_{b}_{c}`` (CLIP-L / CLIP-H, also as ``lora_te1_``)
  and, with CLIP-L present, ``lora_te2_...`` for CLIP-G, ``c`` from ``LORA_CLIP_MAP``. ``load_lora`` patches a module
  with ``lora_up @ lora_down * alpha / rank`` (``rank = lora_down.shape[0]``; scale 1 without alpha) and logs
  "lora key not loaded" for every key it did not use.
* kohya-ss/sd-scripts ``networks/lora.py`` (SD 1.x / 2.x / SDXL), ``lora_sd3.py``, ``lora_flux.py``: LoRA modules are
  the Linear / Conv2d children of its target blocks (``Transformer2DModel`` in the UNet; ``SingleDiTBlock`` =
  ``x_block`` / ``context_block`` in SD3; ``DoubleStreamBlock`` / ``SingleStreamBlock`` in Flux; ``CLIPAttention`` /
  ``CLIPMLP`` in text encoders), named ``<prefix>_<path in its model, "." -> "_">``; ``create_network_from_weights``
  reads rank and alpha per module from the file and ``load_state_dict(strict=False)`` ignores names it lacks; merging
  adds ``lora_up @ lora_down * alpha / rank``.

The native models are the original layouts (sgm UNet for SDXL, MMDiT for SD3, BFL for Flux; sd-scripts trains SD
1.x / 2.x on a UNet with diffusers' names). Their modules are described here by the diffusers modules they are made of
(``comfy/utils.py`` ``unet_to_diffusers``, ``mmdit_to_diffusers``, ``flux_to_diffusers``): fused q / k / v (and
Flux's ``linear1`` = q, k, v, MLP input) are stacked along the output rows; ``norm_out.linear`` (and SD3's last
``norm1_context.linear``) are stored (shift, scale) where diffusers has (scale, shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.integration.interop.support import Deltas, plain_path

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}
MMDIT_BLOCK = {  # comfy/utils.py MMDIT_MAP_BLOCK and the qkv slices of mmdit_to_diffusers
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.proj": ("attn.to_out.0",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",), "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",), "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",), "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
    # SD3.5's MMDiT-X second image attention (diffusers' SD3 single-file converter: x_block.attn2.{qkv, proj})
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.proj": ("attn2.to_out.0",),
}
BFL_DOUBLE = {  # comfy/utils.py flux_to_diffusers, double blocks
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",), "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",), "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
}
# modules outside the blocks, diffusers name -> native name (comfy/utils.py mmdit_to_diffusers / flux_to_diffusers;
# final_layer.adaLN_modulation.1 is stored (shift, scale))
MMDIT_GLOBAL = {"context_embedder": "context_embedder", "proj_out": "final_layer.linear",
                "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
                "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
                "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
                "norm_out.linear": "final_layer.adaLN_modulation.1"}
BFL_GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "norm_out.linear": "final_layer.adaLN_modulation.1"}
BFL_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
              "modulation.lin": ("norm.linear",)}


@dataclass
class NativeModule:
    """A module of the consumer's model (``key``: its name there), made of the diffusers modules
    ``(component, path)`` stacked along its rows."""

    key: str
    parts: tuple[tuple[str, str], ...]
    swap_halves: bool = False


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {plain_path(n): m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _sgm_attention_blocks(config) -> dict[str, str]:
    """diffusers attention block -> sgm block (comfy/utils.py unet_to_diffusers: input block ``1 + (layers + 1) * x
    + i``, ``middle_block.1``, output block ``(layers + 1) * x + i``)."""
    layers = config["layers_per_block"]
    out = {"mid_block.attentions.0": "middle_block.1"}
    for x in range(len(config["down_block_types"])):
        for i in range(layers):
            out[f"down_blocks.{x}.attentions.{i}"] = f"input_blocks.{1 + (layers + 1) * x + i}.1"
        for i in range(layers + 1):
            out[f"up_blocks.{x}.attentions.{i}"] = f"output_blocks.{(layers + 1) * x + i}.1"
    return out


def _unet_modules(unet, sgm: bool) -> dict[str, NativeModule]:
    """Linear / Conv2d children of the UNet's transformers (sd-scripts' ``Transformer2DModel`` targets)."""
    blocks = _sgm_attention_blocks(unet.config) if sgm else {}
    out = {}
    for name, module in unet.named_modules():
        if ".attentions." not in name or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        block, rest = name.split(".attentions.")[0], name.split(".attentions.")[1].split(".", 1)
        if len(rest) < 2:
            continue
        diffusers_block = f"{block}.attentions.{rest[0]}"
        native = f"{blocks[diffusers_block]}.{rest[1]}" if sgm else name
        out[f"lora_unet_{native.replace('.', '_')}"] = NativeModule(native, (("unet", name),))
    return out


def _block_modules(transformer, blocks: list[tuple[str, str, dict]]) -> dict[str, NativeModule]:
    linears = _linears(transformer)
    out = {}
    for diffusers_prefix, native_prefix, table in blocks:
        for index in range(len(getattr(transformer, diffusers_prefix))):
            for native, parts in table.items():
                paths = tuple(f"{diffusers_prefix}.{index}.{p}" for p in parts)
                if any(p in linears for p in paths):
                    key = f"{native_prefix}.{index}.{native}"
                    parts_of = tuple(("transformer", p) for p in paths)
                    out[f"lora_unet_{key.replace('.', '_')}"] = NativeModule(key, parts_of)
    return out


def _mmdit_modules(transformer) -> dict[str, NativeModule]:
    out = _block_modules(transformer, [("transformer_blocks", "joint_blocks", MMDIT_BLOCK)])
    last = f"lora_unet_joint_blocks_{len(transformer.transformer_blocks) - 1}_context_block_adaLN_modulation_1"
    if last in out:
        out[last].swap_halves = True
    return out


def _bfl_modules(transformer) -> dict[str, NativeModule]:
    return _block_modules(transformer, [("transformer_blocks", "double_blocks", BFL_DOUBLE),
                                        ("single_transformer_blocks", "single_blocks", BFL_SINGLE)])


def _global_modules(transformer, table: dict[str, str]) -> dict[str, NativeModule]:
    """ComfyUI's names of the modules outside the blocks that ``transformer`` has (``lora_unet_<native key>``)."""
    linears = _linears(transformer)
    return {f"lora_unet_{key.replace('.', '_')}": NativeModule(key, (("transformer", path),),
                                                               swap_halves=key == "final_layer.adaLN_modulation.1")
            for path, key in table.items() if path in linears}


def _chroma_modules(transformer) -> dict[str, NativeModule]:
    """ComfyUI's Chroma (comfy/ldm/chroma/model.py): FLUX.1's blocks without their modulation layers, ``img_in``,
    ``txt_in``, ``final_layer.linear`` and the ``distilled_guidance_layer`` Approximator (``in_proj``,
    ``layers.N.{in_layer, out_layer}``, ``out_proj``)."""
    out = _bfl_modules(transformer)
    names = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
             "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj"}
    layers = "distilled_guidance_layer.layers"
    for n in range(len(transformer.distilled_guidance_layer.layers)):
        for diffusers_name, native in (("linear_1", "in_layer"), ("linear_2", "out_layer")):
            names[f"{layers}.{n}.{diffusers_name}"] = f"{layers}.{n}.{native}"
    for path, key in names.items():
        out[f"lora_unet_{key.replace('.', '_')}"] = NativeModule(key, (("transformer", path),))
    return out


def _clip_modules(pipe, prefixes: dict[str, tuple[str, ...]]) -> dict[str, NativeModule]:
    out = {}
    for component, names in prefixes.items():
        model = getattr(pipe, component)
        for b in range(model.config.num_hidden_layers):
            for module, lora_name in LORA_CLIP_MAP.items():
                path = f"encoder.layers.{b}.{module}"
                native = NativeModule(f"{component}.text_model.{path}", ((component, path),))
                for prefix in names:  # aliases of one module
                    out[f"{prefix}_text_model_encoder_layers_{b}_{lora_name}"] = native
    return out


def comfyui_key_map(family: str, pipe) -> dict[str, NativeModule]:
    """ComfyUI's map for the model of ``pipe`` (model_lora_keys_unet + model_lora_keys_clip)."""
    if family in ("sd1", "sd2"):  # lora_unet_<diffusers name> via unet_to_diffusers; CLIP-L/H as lora_te_ or lora_te1_
        return {**_unet_modules(pipe.unet, sgm=False), **_clip_modules(pipe, {"text_encoder": ("lora_te", "lora_te1")})}
    if family == "sdxl":
        clips = {"text_encoder": ("lora_te", "lora_te1"), "text_encoder_2": ("lora_te2",)}
        return {**_unet_modules(pipe.unet, sgm=True), **_clip_modules(pipe, clips)}
    if family == "sd3":
        clips = {"text_encoder": ("lora_te", "lora_te1"), "text_encoder_2": ("lora_te2",)}
        return {**_mmdit_modules(pipe.transformer), **_global_modules(pipe.transformer, MMDIT_GLOBAL),
                **_clip_modules(pipe, clips)}
    if family == "chroma":  # T5 only: no CLIP keys
        return _chroma_modules(pipe.transformer)
    return {**_bfl_modules(pipe.transformer), **_global_modules(pipe.transformer, BFL_GLOBAL),
            **_clip_modules(pipe, {"text_encoder": ("lora_te", "lora_te1")})}


def sd_scripts_names(family: str, pipe) -> dict[str, NativeModule]:
    """The LoRA module names sd-scripts creates for the model of ``pipe`` (its prefixes: ``lora_te`` for SD 1.x /
    2.x, ``lora_te1`` / ``lora_te2`` for SDXL and SD3, ``lora_te1`` for Flux's CLIP-L)."""
    if family in ("sd1", "sd2"):
        return {**_unet_modules(pipe.unet, sgm=False), **_clip_modules(pipe, {"text_encoder": ("lora_te",)})}
    clips = {"text_encoder": ("lora_te1",)} | ({} if family == "flux" else {"text_encoder_2": ("lora_te2",)})
    denoiser = {"sdxl": lambda: _unet_modules(pipe.unet, sgm=True), "sd3": lambda: _mmdit_modules(pipe.transformer),
                "flux": lambda: _bfl_modules(pipe.transformer)}[family]()
    return {**denoiser, **_clip_modules(pipe, clips)}


def apply_kohya(lora: dict[str, torch.Tensor], names: dict[str, NativeModule]) -> tuple[dict[str, torch.Tensor], set]:
    """``{native module key: lora_up @ lora_down * alpha / rank}`` for every LoRA module named in ``names`` (a later
    alias of the same module replaces an earlier one, as in ComfyUI's patch dict), and the keys of ``lora`` left
    unused (ComfyUI's "lora key not loaded")."""
    patches, used = {}, set()
    for name, native in names.items():
        if f"{name}.lora_up.weight" not in lora:
            continue
        down, up = lora[f"{name}.lora_down.weight"].double(), lora[f"{name}.lora_up.weight"].double()
        alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else down.shape[0]
        patches[native.key] = up @ down * (alpha / down.shape[0])
        used |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
    return patches, set(lora) - used


def _swap(delta: torch.Tensor) -> torch.Tensor:
    first, second = delta.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def expected_native(trained: Deltas, names: dict[str, NativeModule], pipe) -> dict[str, torch.Tensor]:
    """The native deltas that apply ``trained`` (diffusers modules): parts stacked along the rows, untrained
    parts zero, halves swapped where the native layout swaps them; only modules with a trained part."""
    out = {}
    for native in names.values():
        if not any(p in trained.get(c, {}) for c, p in native.parts):
            continue
        rows = []
        for component, path in native.parts:
            module = _linears(getattr(pipe, component))[path]
            zero = torch.zeros(module.out_features, module.in_features, dtype=torch.float64)
            rows.append(trained.get(component, {}).get(path, zero))
        delta = torch.cat(rows, dim=0)
        out[native.key] = _swap(delta) if native.swap_halves else delta
    return out


def native_error(applied: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name in set(applied) | set(expected):
        if name not in applied or name not in expected:
            return float("inf")
        worst = max(worst, float((applied[name] - expected[name]).abs().max()))
    return worst
