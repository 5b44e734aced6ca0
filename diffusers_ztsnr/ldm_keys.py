"""diffusers -> original (LDM / CompVis, SGM) state-dict names for SD 1.x / 2.x / SDXL single-file checkpoints.

Single-file consumers (ComfyUI, A1111 / Forge, diffusers' ``from_single_file``) load a checkpoint by the module names of
the original training code, so those names are the contract followed here:

* UNet -- ``UNetModel`` of ``ldm/modules/diffusionmodules/openaimodel.py`` (CompVis/stable-diffusion,
  Stability-AI/stablediffusion for SD 2.x) and of ``sgm/modules/diffusionmodules/openaimodel.py``
  (Stability-AI/generative-models, SDXL), under ``model.diffusion_model.``: ``time_embed`` = [linear, SiLU, linear];
  SDXL's ``label_emb.0`` = [linear, SiLU, linear]; ``input_blocks`` (block 0 is the input conv; then, level by level,
  ``layers_per_block`` x [ResBlock, SpatialTransformer if the level attends] and a ``Downsample`` (``op`` conv) below
  every level but the last); ``middle_block`` = [ResBlock, SpatialTransformer, ResBlock]; ``output_blocks`` (deepest
  level first, ``layers_per_block + 1`` x [ResBlock, SpatialTransformer?, ``Upsample`` (``conv``) after the level's
  last block except at the top]); ``out`` = [GroupNorm, SiLU, conv]. A ResBlock holds ``in_layers`` = [norm, SiLU,
  conv], ``emb_layers`` = [SiLU, linear], ``out_layers`` = [norm, SiLU, dropout, conv] and ``skip_connection``. Inside a
  SpatialTransformer (``norm``, ``proj_in``, ``transformer_blocks.N.{attn1,attn2,ff,norm1..3}``, ``proj_out``) diffusers
  kept the original names, so those suffixes carry over unchanged.
* VAE -- ``Encoder`` / ``Decoder`` of ``ldm/modules/diffusionmodules/model.py`` under ``first_stage_model.``:
  ``down.I.block.J`` / ``down.I.downsample.conv`` (I = resolution level, highest first), ``up.I.block.J`` /
  ``up.I.upsample.conv`` (the decoder's ``up`` list is indexed by resolution level too, so diffusers' ``up_blocks.i``,
  lowest resolution first, is ``up.{n-1-i}``), ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``, ``norm_out``;
  ResBlocks name their 1x1 shortcut ``nin_shortcut``; ``AttnBlock`` has ``norm``, ``q``, ``k``, ``v``, ``proj_out`` as
  1x1 *convolutions* (4-D weights where diffusers has linear layers).
* CLIP ViT-L text encoder -- transformers' ``CLIPTextModel`` held by ``FrozenCLIPEmbedder`` as ``transformer``:
  ``cond_stage_model.transformer.text_model.*`` (SD 1.x), ``conditioner.embedders.0.transformer.text_model.*`` (SDXL).
* OpenCLIP text encoder (SD 2.x ViT-H ``cond_stage_model.model.*``, SDXL bigG ``conditioner.embedders.1.model.*``) --
  open_clip's text tower: ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection``. ``attn`` is ``torch.nn.MultiheadAttention``, whose
  ``in_proj_weight`` / ``in_proj_bias`` stack q, k, v along dim 0; ``text_projection`` is a matrix applied as
  ``x @ text_projection``, i.e. the transpose of the Linear weight transformers stores.

diffusers' ``loaders/single_file_utils.py`` reads these same names the other way (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), which the tests use
to check this map. Every key of a component must map, or :func:`rename` raises: nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def _add(module_map: dict[str, str], diffusers: str, ldm: str, inner: Mapping[str, str] | None = None) -> None:
    module_map[diffusers] = ldm
    for d, o in (inner or {}).items():
        module_map[f"{diffusers}.{d}"] = f"{ldm}.{o}"


def _layers_per_block(config: Mapping) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block={layers!r}: the original UNet layout has one count for every level")
    return layers


def unet_module_map(config: Mapping) -> dict[str, str]:
    """diffusers ``UNet2DConditionModel`` module path -> original ``UNetModel`` module path, from the UNet config."""
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    layers, levels = _layers_per_block(config), len(config["down_block_types"])
    index = 1
    for level in range(levels):
        for j in range(layers):
            _add(m, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET)
            m[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            m[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    _add(m, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    m["mid_block.attentions.0"] = "middle_block.1"
    _add(m, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    index = 0
    for level, block_type in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            _add(m, f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET)
            m[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if level < levels - 1:  # the Upsample follows the ResBlock and, where the level attends, the transformer
            slot = 2 if "CrossAttn" in block_type else 1
            m[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{slot}.conv"
    return m


def vae_module_map(config: Mapping) -> dict[str, str]:
    """diffusers ``AutoencoderKL`` module path -> original ``AutoencoderKL`` (Encoder / Decoder) module path."""
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    layers, levels = _layers_per_block(config), len(config["block_out_channels"])
    for part in ("encoder", "decoder"):
        m.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                  f"{part}.conv_norm_out": f"{part}.norm_out"})
        _add(m, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        _add(m, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
        _add(m, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
    for level in range(levels):
        up = levels - 1 - level
        for j in range(layers):
            _add(m, f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", _VAE_RESNET)
        for j in range(layers + 1):
            _add(m, f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{up}.block.{j}", _VAE_RESNET)
        if level < levels - 1:
            m[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
            m[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{up}.upsample.conv"
    return m


def rename(state: Mapping[str, torch.Tensor], module_map: Mapping[str, str], prefix: str) -> dict[str, torch.Tensor]:
    """``prefix + original name`` for every key, by its longest mapped module path; raises on any unmapped key."""
    out, unmapped = {}, []
    for key, tensor in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in module_map:
                out[prefix + module_map[module] + key[len(module):]] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"no original (LDM) name for {len(unmapped)} key(s), e.g. {unmapped[:5]}")
    return out


def convert_unet(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under ``model.diffusion_model.`` original names (same tensors and shapes)."""
    return rename(state, unet_module_map(config), UNET_PREFIX)


def convert_vae(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict under ``first_stage_model.``; mid-block attention weights become 1x1 convs."""
    out = rename(state, vae_module_map(config), VAE_PREFIX)
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            if tensor.ndim == 2:
                out[key] = tensor[:, :, None, None]
    return out


def _text_model_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys relative to ``text_model.``, whether or not this transformers version nests ``CLIPTextModel`` in it."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if k != "text_projection.weight"}


def convert_clip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text encoder -> ``{prefix}text_model.*`` (the layout FrozenCLIPEmbedder saves)."""
    if "text_projection.weight" in state:
        raise ValueError("the CLIP ViT-L slot holds a text model without projection; this encoder has one")
    return {f"{prefix}text_model.{k}": v for k, v in _text_model_keys(state).items()}


def convert_open_clip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text encoder -> open_clip text tower names under ``prefix``, q/k/v fused into in_proj."""
    text = _text_model_keys(state)
    text.pop("embeddings.position_ids", None)  # a buffer of older transformers versions; open_clip has none
    singles = {"embeddings.token_embedding.weight": "token_embedding.weight",
               "embeddings.position_embedding.weight": "positional_embedding",
               "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out = {prefix + singles[k]: text.pop(k) for k in list(text) if k in singles}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].t().contiguous()
    layers = sorted({int(k.split(".")[2]) for k in text if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [text.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for d, o in _OPEN_CLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{o}.{kind}"] = text.pop(f"{src}{d}.{kind}")
    if text:
        raise ValueError(f"no open_clip name for {len(text)} key(s), e.g. {sorted(text)[:5]}")
    return out
