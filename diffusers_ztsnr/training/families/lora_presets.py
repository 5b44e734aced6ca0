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
from dataclasses import dataclass

import torch

PRESETS = ("attn", "attn+ff", "all-linear")


@dataclass(frozen=True)
class BlockPatterns:
    """Where a transformer's repeated blocks are and which of their ``Linear`` modules the presets add (regular
    expressions, matched in full). ``block`` matches a module path with one group, the path inside the block; the
    defaults are the diffusers SD3 / FLUX.1 / Chroma transformers'."""

    block: str = r"(?:transformer_blocks|single_transformer_blocks)\.\d+\.(.+)"
    attention: str = r"attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    # a single block's MLP input proj_mlp and joint output proj_out (FLUX.1 / Chroma; no block of SD3 has either)
    feed_forward: str = r"(ff|ff_context)\.net\.(0\.proj|2)|proj_mlp|proj_out"


FLOW_BLOCKS = BlockPatterns()


def preset_modules(preset: str, denoiser: torch.nn.Module, patterns: BlockPatterns = FLOW_BLOCKS) -> tuple[str, ...]:
    """The full paths of the block ``Linear`` modules of ``denoiser`` that ``preset`` selects, in model order."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    selected = {"attn": (patterns.attention,), "attn+ff": (patterns.attention, patterns.feed_forward),
                "all-linear": (".+",)}[preset]
    return tuple(path for path, module in denoiser.named_modules()
                 if isinstance(module, torch.nn.Linear) and (inner := re.fullmatch(patterns.block, path))
                 and any(p and re.fullmatch(p, inner[1]) for p in selected))


def resolve_lora_layers(spec: str | None, denoiser: torch.nn.Module, default: tuple[str, ...],
                        patterns: BlockPatterns = FLOW_BLOCKS) -> tuple[tuple[str, ...], str]:
    """``(target modules, label)`` for ``--lora_layers spec``: ``default`` when ``spec`` is empty, a preset
    expanded by :func:`preset_modules`, or the comma list as given. ``label`` is what the model card names: the
    preset, or the comma list. Raises ``ValueError`` for a list without a name, or a preset that selects nothing."""
    if not spec or not spec.strip():
        return default, ",".join(default)
    spec = spec.strip()
    if spec in PRESETS:
        modules = preset_modules(spec, denoiser, patterns)
        if not modules:
            raise ValueError(f"--lora_layers {spec}: the preset selects no Linear module of the "
                             f"{type(denoiser).__name__}'s repeated blocks; name modules instead (e.g. "
                             f"{','.join(default[:2])})")
        return modules, spec
    names = tuple(x.strip() for x in spec.split(",") if x.strip())
    if not names:
        raise ValueError(f"--lora_layers {spec!r}: name modules (comma-separated, e.g. attn.to_q,attn.to_k) or a "
                         f"preset ({', '.join(PRESETS)})")
    return names, ",".join(names)
