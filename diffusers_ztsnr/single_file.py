"""Merge a trained LoRA into its base model and write one single-file checkpoint that samples right where it loads.

A LoRA can only *describe* how it must be sampled (metadata); a full checkpoint can *carry* it: ComfyUI reads the
top-level ``v_pred`` / ``ztsnr`` keys of an SDXL checkpoint (``comfy/supported_models.py``, ``SDXL.model_type``) and
samples v-prediction on the zero-terminal-SNR schedule with no extra node. :func:`export_single_file`:

1. reads how the LoRA must be sampled from its folder -- ``scheduler/scheduler_config.json`` (``prediction_type``,
   ``rescale_betas_zero_snr``) and the safetensors metadata the training scripts write
   (:func:`diffusers_ztsnr.markers.scheduler_settings_from_checkpoint`); the two must agree;
2. loads the base pipeline (``--base``, else ``training_args.json``'s ``pretrained_model_name_or_path``) in fp32,
   ``load_lora_weights`` + ``fuse_lora`` (the file's peft adapter metadata makes that the trained delta
   ``B @ A * lora_alpha / rank``), then ``unload_lora_weights`` so that only plain fused weights remain;
3. renames UNet, VAE and text encoder(s) to the original layout (:mod:`diffusers_ztsnr.ldm_keys`), adds the marker keys
   (:func:`diffusers_ztsnr.markers.with_markers`: empty tensors, ComfyUI's / A1111's convention), casts floating
   tensors to the requested dtype and writes safetensors.

SD 1.x and 2.x checkpoints carry the markers too, but ComfyUI does not read them for those families (SD 1.x is
epsilon unless told; SD 2.x is guessed from the weights): the returned ``instructions`` say what to set there.
SD 2.x is recognised by its OpenCLIP-derived text encoder (``hidden_act == "gelu"``; OpenAI's CLIP uses
``quick_gelu``) and written in open_clip's layout; ``text_encoder_layout`` overrides the choice. diffusers' SD 2.x
text encoder keeps 23 of ViT-H's 24 blocks (SD 2.x conditions on the penultimate block's output), so the file carries
those 23, as diffusers' single-file loader expects (it skips block 23).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import ldm_keys
from .markers import V_PRED_KEY, ZTSNR_KEY, scheduler_settings_from_checkpoint, with_markers

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights / load_lora_weights name
_MARKER_METADATA = ("modelspec.prediction_type", "ss_v_parameterization", "ss_zero_terminal_snr")  # sd-scripts' keys
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def lora_sampling_settings(lora_dir: str | os.PathLike) -> dict[str, object]:
    """``{"prediction_type", "rescale_betas_zero_snr"}`` a LoRA folder was trained for.

    Read from ``scheduler/scheduler_config.json`` and from the LoRA file's safetensors metadata; where both exist they
    must agree (ValueError otherwise). Neither present: epsilon without ZTSNR, the SD default.
    """
    lora_dir = Path(lora_dir)
    weights = lora_dir / LORA_WEIGHT_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} in {lora_dir} (a diffusers-format LoRA folder)")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        has_metadata = any(key in (f.metadata() or {}) for key in _MARKER_METADATA)
    from_metadata = scheduler_settings_from_checkpoint(weights) if has_metadata else None
    config_path = lora_dir / "scheduler" / "scheduler_config.json"
    from_config = None
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        from_config = {"prediction_type": config.get("prediction_type", "epsilon"),
                       "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False))}
    if from_metadata and from_config and from_metadata != from_config:
        raise ValueError(f"{config_path} says {from_config} but the metadata of {weights} says {from_metadata}")
    settings = from_config or from_metadata or {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    if settings["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={settings['prediction_type']!r} has no single-file marker; "
                         "checkpoints can say 'epsilon' or 'v_prediction'")
    return settings


def base_model_of(lora_dir: str | os.PathLike) -> str:
    """The base a LoRA folder was trained on: ``training_args.json``'s ``pretrained_model_name_or_path``, else the
    model card's ``base_model``; ValueError naming ``--base`` when neither says."""
    lora_dir = Path(lora_dir)
    args_path = lora_dir / "training_args.json"
    if args_path.is_file():
        base = json.loads(args_path.read_text(encoding="utf-8")).get("pretrained_model_name_or_path")
        if base:
            return str(base)
    card = lora_dir / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        if text.startswith("---\n") and "\n---" in text[4:]:
            import yaml

            front = yaml.safe_load(text[4:text.index("\n---", 4)]) or {}
            base = front.get("base_model")
            if isinstance(base, str) and base:
                return base
    raise ValueError(f"{lora_dir} names no base model (training_args.json / model card): pass --base MODEL")


def load_fused_pipeline(base: str, lora_dir: str | os.PathLike, **from_pretrained_kwargs):
    """The base pipeline in fp32 with the LoRA fused into its weights and the LoRA layers removed."""
    from diffusers import DiffusionPipeline

    class_name = DiffusionPipeline.load_config(base, **from_pretrained_kwargs).get("_class_name")
    if class_name not in _PIPELINES:
        raise ValueError(f"{base} is a {class_name}; single-file export covers {', '.join(_PIPELINES)} "
                         "(SD 1.x / 2.x / SDXL UNets)")
    extra = {"safety_checker": None, "requires_safety_checker": False} if class_name == _PIPELINES[0] else {}
    pipe = DiffusionPipeline.from_pretrained(base, dtype=torch.float32, **extra, **from_pretrained_kwargs)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora(safe_fusing=True)  # the file's adapter metadata sets lora_alpha / rank
    pipe.unload_lora_weights()
    return pipe


def _text_encoder_layout(pipe, requested: str | None) -> str:
    if requested is not None:
        if requested not in ("clip", "open_clip"):
            raise ValueError(f"text_encoder_layout={requested!r}; allowed: 'clip', 'open_clip'")
        return requested
    return "open_clip" if pipe.text_encoder.config.hidden_act == "gelu" else "clip"


def ldm_state_dict(pipe, text_encoder_layout: str | None = None) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(original-layout state dict, family ``"sd1"`` / ``"sd2"`` / ``"sdxl"``, key count per component)."""
    parts = {"unet": ldm_keys.convert_unet(pipe.unet.state_dict(), pipe.unet.config),
             "vae": ldm_keys.convert_vae(pipe.vae.state_dict(), pipe.vae.config)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        family = "sdxl"
        parts["text_encoder"] = ldm_keys.convert_clip(pipe.text_encoder.state_dict(), ldm_keys.SDXL_CLIP_PREFIX)
        parts["text_encoder_2"] = ldm_keys.convert_open_clip(pipe.text_encoder_2.state_dict(),
                                                             ldm_keys.SDXL_OPEN_CLIP_PREFIX)
    elif _text_encoder_layout(pipe, text_encoder_layout) == "open_clip":
        family = "sd2"
        parts["text_encoder"] = ldm_keys.convert_open_clip(pipe.text_encoder.state_dict(),
                                                           ldm_keys.SD2_OPEN_CLIP_PREFIX)
    else:
        family = "sd1"
        parts["text_encoder"] = ldm_keys.convert_clip(pipe.text_encoder.state_dict(), ldm_keys.SD1_CLIP_PREFIX)
    state: dict[str, torch.Tensor] = {}
    for part in parts.values():
        state.update(part)
    return state, family, {name: len(part) for name, part in parts.items()}


def sampling_instructions(family: str, prediction_type: str, zero_terminal_snr: bool, out_path: Path) -> list[str]:
    """What each UI needs to sample the checkpoint as trained (empty for a plain epsilon model)."""
    v = prediction_type == "v_prediction"
    if not (v or zero_terminal_snr):
        return []
    comfy_node = (f"ComfyUI: add a ModelSamplingDiscrete node after Load Checkpoint with sampling = "
                  f"{'v_prediction' if v else 'eps'}, zsnr = {str(zero_terminal_snr).lower()}")
    if family == "sdxl" and v:  # comfy/supported_models.py SDXL.model_type: v_pred, and ztsnr only beside v_pred
        lines = ["ComfyUI: reads the v_pred" + (" and ztsnr" if zero_terminal_snr else "") + " keys of this SDXL "
                 "checkpoint itself -- Load Checkpoint alone samples it as trained, no ModelSamplingDiscrete node"]
    else:
        lines = [comfy_node + (" (ComfyUI reads these markers only for SDXL)" if family != "sdxl" else
                               " (ComfyUI reads ztsnr only beside v_pred)")]
    if v and family != "sdxl":
        config = "v1-inference.yaml" if family == "sd1" else "v2-inference-v.yaml"
        lines.append(f"A1111: put a copy of its {config} beside the checkpoint as {out_path.with_suffix('.yaml').name}"
                     ' with parameterization: "v" under model.params (A1111 loads <checkpoint>.yaml when present)')
    elif v:
        lines.append("A1111 / Forge: v-prediction SDXL support varies by version: see its settings")
    if zero_terminal_snr:
        lines.append('A1111 (1.8+): Settings > Sampler parameters > "Noise schedule for sampling" = '
                     '"Zero Terminal SNR" (option sd_noise_schedule)')
    lines.append("Forge / reForge: see its settings for v-prediction and the zero-terminal-SNR noise schedule")
    return lines


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def export_single_file(lora_dir: str | os.PathLike, out_path: str | os.PathLike, base: str | None = None,
                       dtype: str = "fp16", text_encoder_layout: str | None = None) -> dict[str, object]:
    """Merge ``lora_dir`` (a diffusers-format LoRA folder) into its base and write an original-layout checkpoint.

    ``dtype``: ``"fp16"`` / ``"bf16"`` / ``"fp32"`` (the merge itself runs in fp32). Returns ``{"path", "base",
    "family", "prediction_type", "rescale_betas_zero_snr", "markers", "dtype", "keys", "instructions"}``:
    ``markers`` lists the marker keys written, ``keys`` the tensor count per component and ``instructions`` what
    ComfyUI / A1111 need to sample it as trained.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"{out_path}: the checkpoint is written as safetensors; name it *.safetensors")
    settings = lora_sampling_settings(lora_dir)
    base = base or base_model_of(lora_dir)
    pipe = load_fused_pipeline(base, lora_dir)
    return {**_write_checkpoint(pipe, out_path, settings, dtype, text_encoder_layout), "base": base}


def export_pipeline_single_file(pipeline_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "fp16",
                                text_encoder_layout: str | None = None) -> dict[str, object]:
    """A whole pipeline folder (a full fine-tune) as one original-layout checkpoint, with the markers of the
    prediction type and ZTSNR its ``scheduler/`` config says. Returns what :func:`export_single_file` returns."""
    from diffusers import DiffusionPipeline

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"{out_path}: the checkpoint is written as safetensors; name it *.safetensors")
    config = json.loads((Path(pipeline_dir) / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    settings = {"prediction_type": config.get("prediction_type", "epsilon"),
                "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False))}
    class_name = DiffusionPipeline.load_config(str(pipeline_dir)).get("_class_name")
    if class_name not in _PIPELINES:
        raise ValueError(f"{pipeline_dir} is a {class_name}; single-file export covers {', '.join(_PIPELINES)}")
    extra = {"safety_checker": None, "requires_safety_checker": False} if class_name == _PIPELINES[0] else {}
    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), dtype=torch.float32, **extra)
    return {**_write_checkpoint(pipe, out_path, settings, dtype, text_encoder_layout), "base": str(pipeline_dir)}


def _write_checkpoint(pipe, out_path: Path, settings: dict, dtype: str, text_encoder_layout: str | None) -> dict:
    """``pipe`` in the original layout with the sampling markers, written atomically to ``out_path``."""
    state, family, counts = ldm_state_dict(pipe, text_encoder_layout)
    v, zsnr = settings["prediction_type"], bool(settings["rescale_betas_zero_snr"])
    state = _cast(with_markers(state, v, zsnr), DTYPES[dtype])
    from safetensors.torch import save_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_path)
    return {"path": out_path, "family": family, "prediction_type": v, "rescale_betas_zero_snr": zsnr,
            "markers": [k for k in (V_PRED_KEY, ZTSNR_KEY) if k in state], "dtype": dtype, "keys": counts,
            "instructions": sampling_instructions(family, v, zsnr, out_path)}
