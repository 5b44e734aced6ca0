"""What Qwen-Image, Z-Image, FLUX.2 Klein and FLUX.2 dev share: one frozen decoder-LM text encoder, no pooled
embedding, prompt encodings padded to a fixed length with a mask; no guidance input except a guidance-distilled
transformer's (FLUX.2 dev: ``default_guidance``).

Every encoding is padded to ``--max_sequence_length`` tokens (zeros) with ``prompt_mask`` marking the prompt's
own tokens, so that cached encodings of different captions stack into one batch and caption dropout swaps whole
rows; each family's ``predict`` hands the transformer what its pipeline would (the unpadded rows, or the batch
padded to its longest prompt). The conventions of the flow, the shift and the files are :class:`FlowTask`'s.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import InputError
from ..lora import is_dora, save_diffusers_lora
from ..task import ModelTask
from .flow_transformers import FlowTask
from .lora_presets import BlockPatterns, resolve_lora_layers


def pad_prompts(rows: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` ``[B, length, D]`` (each row's tokens first, then zeros) and ``prompt_mask`` ``[B, length]``
    (1 on a row's tokens) of per-prompt hidden states ``rows`` (``[n_i, D]``, ``n_i <= length``)."""
    width = rows[0].shape[-1]
    embeds = rows[0].new_zeros(len(rows), length, width)
    mask = torch.zeros(len(rows), length, device=rows[0].device)
    for i, row in enumerate(rows):
        embeds[i, :len(row)] = row[:length]
        mask[i, :len(row)] = 1
    return {"prompt_embeds": embeds, "prompt_mask": mask}


class TextDiTTask(FlowTask):
    """A flow transformer conditioned on one LM's hidden states. Subclasses set ``pipelines``, ``family_name``,
    ``family_title`` and implement ``default_lora_layers``, ``encode_prompts``, ``encode_images`` and ``predict``."""

    cond_keys = ("prompt_embeds", "prompt_mask")
    #: the ``--max_sequence_length`` default: the pipeline's own ``__call__`` default
    default_max_sequence_length = 512
    #: the most the pipeline accepts (its ``check_inputs``), or 0 for no limit
    max_sequence_length_limit = 0
    family_name = ""
    family_title = ""
    #: a repeated block's module path (group 1: the path inside the block), and the attention / feed-forward
    #: projections inside it, for the ``--lora_layers`` presets
    block_pattern = r"transformer_blocks\.\d+\.(.+)"
    attention_pattern = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    feed_forward_pattern = ""
    #: the guidance value a guidance-distilled transformer is fed when ``--guidance_scale`` is not given (the
    #: pipeline's ``guidance_scale`` default); None: the transformer has no guidance input and the flag is an error
    default_guidance: float | None = None

    def __init__(self, args: argparse.Namespace):
        # refused before any weight loads
        if args.train_text_encoder:
            raise InputError(f"--train_text_encoder: {self.family_title}'s text encoder stays frozen here, as in "
                             "diffusers' LoRA scripts for it; drop --train_text_encoder.")
        if args.guidance_scale is not None and self.default_guidance is None:
            raise InputError(f"--guidance_scale {args.guidance_scale}: {self.family_title} "
                             f"({self.pipelines[0]}) takes no guidance embedding; drop --guidance_scale.")
        limit = self.max_sequence_length_limit
        if limit and args.max_sequence_length and args.max_sequence_length > limit:
            raise InputError(f"--max_sequence_length {args.max_sequence_length}: {self.pipelines[0]} encodes at "
                             f"most {limit} prompt tokens; pass {limit} or less.")
        ModelTask.__init__(self, args)  # not FlowTask's: no CLIP, no pooled projections, no guidance embedding
        self.is_flux = False
        self.trainable_text_encoders = {}
        self.guidance = self.default_guidance if args.guidance_scale is None else args.guidance_scale
        self.max_sequence_length = args.max_sequence_length or self.default_max_sequence_length
        self.lora_layers, self.lora_layers_label = self.resolve_lora_layers(args.lora_layers)

    def default_lora_layers(self) -> tuple[str, ...]:
        raise NotImplementedError

    def resolve_lora_layers(self, spec: str | None) -> tuple[tuple[str, ...], str]:
        """``(target modules, card label)`` of ``--lora_layers``: the family default, a comma list as given, or a
        preset (:mod:`.lora_presets`) over this family's blocks: ``block_pattern``, ``attention_pattern``,
        ``feed_forward_pattern``."""
        patterns = BlockPatterns(self.block_pattern, self.attention_pattern, self.feed_forward_pattern)
        try:
            return resolve_lora_layers(spec, self.denoiser, self.default_lora_layers(), patterns)
        except ValueError as error:
            raise InputError(f"{error}.") from error

    @property
    def family(self) -> str:
        return self.family_name

    def save_lora(self, output_dir: Path, states, args) -> dict[str, Path]:
        """diffusers' file, and ``lora_kohya.safetensors`` in the names ComfyUI maps for the family
        (:mod:`diffusers_ztsnr.lora_keys_dit`)."""
        from ...lora_keys_dit import save_comfyui_lora

        alpha = args.lora_alpha or args.rank
        lora = save_diffusers_lora(self.pipeline_class, output_dir, states, "flow_prediction", False,
                                   lora_alpha=alpha, family=self.family)
        if is_dora(states):
            return {"lora": lora}  # no kohya copy: see card.kohya_note
        try:
            kohya = save_comfyui_lora(output_dir / "lora_kohya.safetensors", self.family, states["transformer"],
                                      alpha, dict(self.denoiser.config), base_model=args.pretrained_model_name_or_path)
        except ValueError as error:  # a --lora_layers module ComfyUI has no name for: keep the diffusers file
            warnings.warn(f"no lora_kohya.safetensors written: {error}; {lora.name} holds the LoRA.", UserWarning,
                          stacklevel=2)
            return {"lora": lora}
        return {"lora": lora, "kohya": kohya}

    def model_card(self, args: argparse.Namespace, steps: int, grid_name: str | None) -> str:
        """:class:`FlowTask`'s card, its kohya note naming the convention these files follow: ComfyUI's names for
        the family (sd-scripts has no trainer for these models; A1111 / Forge none of the models)."""
        card = super().model_card(args, steps, grid_name)
        return card.replace("in sd-scripts' key format (ComfyUI, A1111 / Forge)",
                            f"in the names ComfyUI maps for {self.family_title} (diffusers' converters read them too)")

    def validation_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}
