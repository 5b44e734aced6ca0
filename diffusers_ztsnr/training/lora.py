"""LoRA through peft: adapters on a denoiser, and the file formats users load them from.

* diffusers format, ``pytorch_lora_weights.safetensors`` (what ``pipe.load_lora_weights(dir)`` reads): peft's own
  names, ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight``, and per component the adapter's
  ``LoraConfig`` (rank, ``lora_alpha``, target modules) in the ``lora_adapter_metadata`` safetensors metadata that
  diffusers' ``save_lora_weights(..., <component>_lora_adapter_metadata=...)`` writes and its loader reads, so the
  LoRA plays back at ``lora_alpha / rank`` as trained. Text-encoder modules are named in the transformers CLIP layout
  with its ``text_model.`` level (diffusers drops that level when the loading model has none).
* kohya format, ``lora_kohya.safetensors`` (ComfyUI, sd-scripts, A1111 / Forge, and diffusers' kohya converters):
  the names and fused projections of :mod:`diffusers_ztsnr.lora_keys`.

Both carry how the LoRA must be sampled as safetensors metadata only, in sd-scripts' keys
(:func:`diffusers_ztsnr.markers.marker_metadata`); neither holds a tensor that is not a LoRA weight.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from ..lora_keys import to_kohya_state_dict
from ..markers import LORA_WEIGHT_NAME, add_marker_metadata, marker_metadata

#: attention projections, the targets of diffusers' LoRA examples and of most community LoRAs
DEFAULT_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
ADAPTER_NAME = "default"


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None,
             target_modules: tuple[str, ...] = DEFAULT_UNET_TARGETS, adapter: str = "lora"):
    """Freeze ``model`` and add an adapter (the model is unchanged at step 0); returns its peft config.

    ``adapter``: ``lora`` (Gaussian A, zero B); ``dora`` (Liu et al. 2024), peft's form: each adapted weight is
    ``m * (W + s B A) / ||W + s B A||`` with the norm per output row and a trained magnitude ``m`` per output
    (``lora_magnitude_vector``, initialised to ``||W||``); ``lokr`` / ``loha``: :mod:`.lycoris`."""
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}.")
    model.requires_grad_(False)
    if adapter in ("lokr", "loha"):
        from .lycoris import lycoris_config

        config = lycoris_config(adapter, rank, alpha, list(target_modules))
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                            target_modules=list(target_modules), use_dora=adapter == "dora")
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        model.add_adapter(config)  # diffusers' bookkeeping (set_adapters, save_lora_weights) needs this route
    else:
        # transformers 5's add_adapter demands a peft release newer than PyPI has; peft's own injection is
        # what it would call, and gives the same module names (get_peft_model_state_dict reads them)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    return config


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft naming (``...lora_A.weight``), detached and contiguous on the CPU."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`lora_state_dict`; every adapter key must be used."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA state has keys this model has no adapter for: {unexpected[:5]}...")


def lora_rank(states: dict[str, dict[str, torch.Tensor]]) -> int:
    """The rank shared by every module of peft LoRA ``states`` (``{component: state}``)."""
    ranks = {v.shape[0] for state in states.values() for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"expected one LoRA rank, found {sorted(ranks)}")
    return ranks.pop()


def adapter_metadata(state: dict[str, torch.Tensor], lora_alpha: float, text_encoder: bool = False) -> dict:
    """The ``LoraConfig`` fields diffusers rebuilds an adapter from: rank, ``lora_alpha`` and the trained modules.

    Target modules are the full module paths (peft matches a target as the whole name or a dotted suffix of it), so
    loading patches exactly the trained modules; a text encoder's are given without ``text_model.``, which then
    matches both transformers layouts (with and without that level).
    """
    modules = sorted({k.rsplit(".lora_A.", 1)[0] for k in state if ".lora_A." in k})
    if text_encoder:
        modules = [m.removeprefix("text_model.") for m in modules]
    config = LoraConfig(r=lora_rank({"": state}), lora_alpha=lora_alpha, target_modules=modules,
                        use_dora=is_dora({"": state}))
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": modules,
            "use_rslora": config.use_rslora, "use_dora": config.use_dora}


def is_dora(states: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether peft ``states`` (``{component: state}``) hold DoRA magnitudes."""
    return any(".lora_magnitude_vector" in k for state in states.values() for k in state)


def _canonical_text_encoder_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def save_diffusers_lora(pipeline_class, output_dir: Path, states: dict[str, dict[str, torch.Tensor]],
                        prediction_type: str, zero_terminal_snr: bool, *, lora_alpha: float, family: str) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` with the pipeline class's own ``save_lora_weights``: peft names,
    each component's :func:`adapter_metadata`, and the sampling metadata
    (:func:`diffusers_ztsnr.markers.marker_metadata`) of ``family``.

    ``states`` maps pipeline component names (``unet`` / ``transformer``, ``text_encoder``, ``text_encoder_2``) to
    peft state dicts (:func:`lora_state_dict`).
    """
    kwargs = {}
    for name, state in states.items():
        is_text_encoder = name.startswith("text_encoder")
        kwargs[f"{name}_lora_layers"] = _canonical_text_encoder_names(state) if is_text_encoder else state
        kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(state, lora_alpha, is_text_encoder)
    pipeline_class.save_lora_weights(output_dir, safe_serialization=True, **kwargs)
    return add_marker_metadata(output_dir / LORA_WEIGHT_NAME, prediction_type, zero_terminal_snr, family)


#: sd-scripts' network module per family (its ``ss_network_module`` metadata)
NETWORK_MODULES = {"sd3": "networks.lora_sd3", "flux": "networks.lora_flux", "chroma": "networks.lora_flux"}


def save_kohya_lora(path: Path, states: dict[str, dict[str, torch.Tensor]], alpha: float, prediction_type: str,
                    zero_terminal_snr: bool, *, family: str, denoiser_config: dict, base_model: str = "") -> Path:
    """Write the kohya / sd-scripts format (:func:`diffusers_ztsnr.lora_keys.to_kohya_state_dict`) with
    sd-scripts' metadata: network module, rank, alpha, base model, and how to sample it
    (:func:`diffusers_ztsnr.markers.marker_metadata`: ``modelspec.prediction_type`` ``"v"`` / ``"epsilon"`` and
    ``ss_zero_terminal_snr`` for SD-style models, only the architecture for SD3 / Flux).

    ``states`` maps component names (``unet`` / ``transformer``, ``text_encoder``, ``text_encoder_2``) to peft
    state dicts trained with ``lora_alpha = alpha``.
    """
    kohya = to_kohya_state_dict(family, states, alpha, denoiser_config)
    metadata = {
        "ss_network_module": NETWORK_MODULES.get(family, "networks.lora"),
        "ss_network_dim": str(lora_rank(states)),
        "ss_network_alpha": str(alpha),
        "ss_sd_model_name": base_model,
        **marker_metadata(prediction_type, zero_terminal_snr, family),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(kohya, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
