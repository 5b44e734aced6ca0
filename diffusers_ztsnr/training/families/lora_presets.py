"""``--lora_layers`` of the flow transformers: a comma list of module names, or one of the presets ``attn``,
``attn+ff``, ``all-linear``.

A comma list names modules as peft's ``target_modules`` does: the whole module path or a dotted suffix of it
(``attn.to_q`` matches ``transformer_blocks.3.attn.to_q``). A preset is expanded to the full paths of the ``Linear``
modules it selects inside the transformer's repeated blocks (``transformer_blocks``, ``single_transformer_blocks``),
never the embedders or the output layer outside them:

* ``attn``: the attention projections, image and text stream: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``,
  ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out`` of ``attn`` (and SD3.5's second image attention
  ``attn2``);
* ``attn+ff``: those and the feed-forward layers: ``ff.net.0.proj``, ``ff.net.2``, ``ff_context.*``, and a single
  block's MLP input ``proj_mlp`` and joint output ``proj_out`` (FLUX.1 / Chroma single blocks);
* ``all-linear``: every ``Linear`` of the blocks, modulation projections (``norm1.linear``, ...) included: the
  Linear children of the blocks kohya-ss/sd-scripts trains (``networks/lora_sd3.py``: the joint blocks;
  ``networks/lora_flux.py``: the double and single stream blocks).
"""

from __future__ import annotations

import re

import torch

PRESETS = ("attn", "attn+ff", "all-linear")
#: the repeated blocks of the diffusers flow transformers (SD3: ``transformer_blocks``; FLUX.1 / Chroma: both)
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.\d+\.(.+)")
_ATTENTION = re.compile(r"attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")
_FEED_FORWARD = re.compile(r"(ff|ff_context)\.net\.(0\.proj|2)|proj_mlp")
_SINGLE_OUT = re.compile(r"single_transformer_blocks\.\d+\.proj_out")


def _selected(preset: str, path: str, inner: str) -> bool:
    if _ATTENTION.fullmatch(inner):
        return True
    if preset == "attn":
        return False
    if _FEED_FORWARD.fullmatch(inner) or _SINGLE_OUT.fullmatch(path):
        return True
    return preset == "all-linear"


def preset_modules(preset: str, denoiser: torch.nn.Module) -> tuple[str, ...]:
    """The full paths of the block ``Linear`` modules of ``denoiser`` that ``preset`` selects, in model order."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    paths = []
    for path, module in denoiser.named_modules():
        match = _BLOCK.fullmatch(path)
        if match and isinstance(module, torch.nn.Linear) and _selected(preset, path, match[2]):
            paths.append(path)
    return tuple(paths)


def resolve_lora_layers(spec: str | None, denoiser: torch.nn.Module,
                        default: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """``(target modules, label)`` for ``--lora_layers spec``: ``default`` when ``spec`` is empty, a preset
    expanded by :func:`preset_modules`, or the comma list as given. ``label`` is what the model card names: the
    preset, or the comma list. Raises ``ValueError`` for a list without a name, or a preset that selects nothing."""
    if not spec:
        return default, ",".join(default)
    spec = spec.strip()
    if spec in PRESETS:
        modules = preset_modules(spec, denoiser)
        if not modules:
            raise ValueError(f"--lora_layers {spec}: the preset selects no Linear module of the "
                             f"{type(denoiser).__name__} (no transformer_blocks / single_transformer_blocks)")
        return modules, spec
    names = tuple(x.strip() for x in spec.split(",") if x.strip())
    if not names:
        raise ValueError(f"--lora_layers {spec!r}: name modules (comma-separated, e.g. attn.to_q,attn.to_k) or a "
                         f"preset ({', '.join(PRESETS)})")
    return names, ",".join(names)
