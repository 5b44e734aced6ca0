"""LoRA through peft: adapters on a denoiser, and the file formats users load them from.

* diffusers format: ``pytorch_lora_weights.safetensors``, what ``pipe.load_lora_weights(dir)`` reads;
* kohya / ComfyUI format: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (ComfyUI maps diffusers-named kohya keys onto its UNet), plus the ``v_pred`` / ``ztsnr``
  marker tensors and sd-scripts' ``ss_v_parameterization`` / ``ss_zero_terminal_snr`` metadata, so a
  loader knows the LoRA was trained for v-prediction on a zero-terminal-SNR schedule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from ..checkpoints import add_marker_metadata, marker_metadata, with_markers

#: attention projections, the targets of diffusers' LoRA examples and of most community LoRAs
DEFAULT_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
ADAPTER_NAME = "default"


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None,
             target_modules: tuple[str, ...] = DEFAULT_UNET_TARGETS) -> LoraConfig:
    """Freeze ``model`` and add a LoRA adapter (Gaussian init of A, zero B: the model is unchanged at step 0)."""
    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}.")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
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


def save_diffusers_lora(pipeline_class, output_dir: Path, states: dict[str, dict[str, torch.Tensor]],
                        prediction_type: str, zero_terminal_snr: bool) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` with the pipeline class's own ``save_lora_weights``, plus the
    marker metadata (:func:`diffusers_ztsnr.checkpoints.marker_metadata`) that says how to sample it.

    ``states`` maps pipeline component names (``unet`` / ``transformer``, ``text_encoder``, ``text_encoder_2``) to
    peft state dicts (:func:`lora_state_dict`).
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(state) for name, state in states.items()}
    pipeline_class.save_lora_weights(output_dir, safe_serialization=True, **layers)
    return add_marker_metadata(output_dir / "pytorch_lora_weights.safetensors", prediction_type, zero_terminal_snr)


def save_kohya_lora(path: Path, states: dict[str, dict[str, torch.Tensor]], alpha: float, prediction_type: str,
                    zero_terminal_snr: bool, base_model: str = "") -> Path:
    """Write the kohya / ComfyUI format, with ``v_pred`` / ``ztsnr`` markers and sd-scripts metadata.

    ``states`` maps component names to peft state dicts, the denoiser (``unet`` or ``transformer``) first.
    UNet keys become ``lora_unet_<path>``, text encoders ``lora_te1_`` / ``lora_te2_``; a flow transformer's keys
    become ``lora_transformer_<diffusers path with _>``, the OneTrainer naming ComfyUI maps onto SD3 / Flux.
    Markers: ``v_pred`` for v-prediction and ``ztsnr`` for a zero-terminal-SNR schedule; a flow-matching model
    has neither (its path ends at pure noise by construction) and says ``flow_prediction`` in the metadata.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {f"{name}.{k}": v for name, state in states.items() for k, v in state.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    # diffusers' converter knows unet / text encoders; a transformer comes out as "transformer_..."
    kohya = {("lora_" + k if k.startswith("transformer_") else k): v for k, v in kohya.items()}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(float(alpha))  # diffusers' converter assumes alpha == rank
    if prediction_type in ("epsilon", "v_prediction"):
        kohya = with_markers(kohya, prediction_type, zero_terminal_snr)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_alpha": str(alpha),
        "ss_sd_model_name": base_model,
        **marker_metadata(prediction_type, zero_terminal_snr),
    }
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path), metadata=metadata)
    return path
