"""How a checkpoint or LoRA says it must be sampled, and reading that back into scheduler settings.

Two conventions, each where its consumers read it:

* Full single-file checkpoints carry empty tensors under the top-level keys ``v_pred`` (a v-prediction model) and
  ``ztsnr`` (trained on a zero-terminal-SNR schedule): ComfyUI's model detection reads exactly these state-dict keys
  (:func:`with_markers`).
* LoRA files carry the same facts as safetensors *metadata* only, with sd-scripts' keys and values
  (``library/sai_model_spec.py``, ``train_network.py``): ``modelspec.prediction_type`` = ``"v"`` / ``"epsilon"``
  (omitted for flow-matching models, whose ``modelspec.architecture`` names SD3 / Flux), ``ss_zero_terminal_snr`` =
  ``"True"`` / ``"False"``, and ``ss_v2`` = ``"True"`` for SD 2.x bases only (it says "SD 2.x", not v-prediction).
  A tensor that is no LoRA weight would make diffusers' loader reject the file and ComfyUI log "lora key not loaded".

:func:`scheduler_settings_from_checkpoint` reads every convention written by us or others: the metadata above, the
older ``ss_v_parameterization`` key of other tools, our earlier ``modelspec.prediction_type`` values
(``v_prediction``, ``flow_prediction``) and the marker tensors. :func:`check_lora_for_pipeline` (or
:func:`load_lora_weights`, which loads and checks) warns, with the line that fixes it, when a pipeline's scheduler
does not sample what the LoRA was trained for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_KEY",
    "FLOW_ARCHITECTURES",
    "LORA_WEIGHT_NAME",
    "PREDICTION_TYPE_KEY",
    "V_PRED_KEY",
    "ZTSNR_KEY",
    "add_marker_metadata",
    "check_lora_for_pipeline",
    "load_lora_weights",
    "marker_metadata",
    "scheduler_fix_line",
    "scheduler_settings_from_checkpoint",
    "with_markers",
]

V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"


def _checkpoint_keys(checkpoint: Mapping[str, object] | str | os.PathLike) -> Iterable[str]:
    if isinstance(checkpoint, Mapping):
        return checkpoint.keys()
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # reads the header only
            return list(f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return (state.get("state_dict", state) if isinstance(state, dict) else {}).keys()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # reads the header only
        return dict(f.metadata() or {})


def _flag(value: str | None) -> bool | None:
    """A metadata boolean as sd-scripts (``str(bool)``) and other tools (``true`` / ``1``) write it."""
    if value is None:
        return None
    return value.strip().lower() in ("true", "1", "yes")


def _prediction_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The diffusers ``prediction_type`` a file's metadata states, or None when it states none."""
    stated = metadata.get(PREDICTION_TYPE_KEY)
    if stated is not None and stated.strip().lower() in _MODELSPEC_PREDICTIONS:
        return _MODELSPEC_PREDICTIONS[stated.strip().lower()]
    v_parameterization = _flag(metadata.get("ss_v_parameterization"))
    if v_parameterization is not None:
        return "v_prediction" if v_parameterization else "epsilon"
    if metadata.get(ARCHITECTURE_KEY, "").startswith(FLOW_ARCHITECTURES):
        return "flow_prediction"
    return None


def scheduler_settings_from_checkpoint(checkpoint: Mapping[str, object] | str | os.PathLike) -> dict[str, object]:
    """Scheduler keyword arguments implied by a checkpoint or LoRA (a state dict, a file, or a LoRA folder).

    ``{"prediction_type": "v_prediction" | "epsilon" | "sample" | "flow_prediction", "rescale_betas_zero_snr":
    bool}``; pass them to ``from_config``, e.g. ``ZTSNRDPMSolverMultistepScheduler.from_config(
    pipe.scheduler.config, **settings)``. Metadata (see the module docstring) wins over marker tensors. A file
    stating nothing gives epsilon without ZTSNR (the SD 1.x / SDXL default), which is a guess: v-prediction SD 2.x
    checkpoints often carry no marker.
    """
    metadata: dict[str, str] = {}
    if not isinstance(checkpoint, Mapping):
        path = Path(checkpoint)
        if path.is_dir():
            path = path / LORA_WEIGHT_NAME
        metadata = _safetensors_metadata(path)
        checkpoint = path
    keys = set(_checkpoint_keys(checkpoint))
    prediction = _prediction_from_metadata(metadata) or ("v_prediction" if V_PRED_KEY in keys else "epsilon")
    zero_terminal_snr = bool(_flag(metadata.get("ss_zero_terminal_snr")) or ZTSNR_KEY in keys)
    return {"prediction_type": prediction,
            "rescale_betas_zero_snr": zero_terminal_snr and prediction != "flow_prediction"}


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PREDICTION_TYPE_KEY = "modelspec.prediction_type"
ARCHITECTURE_KEY = "modelspec.architecture"
#: sd-scripts' ``modelspec.prediction_type`` values ("v", "epsilon"), and the diffusers names we wrote before
_MODELSPEC_PREDICTIONS = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon",
                          "sample": "sample", "flow_prediction": "flow_prediction"}
#: sd-scripts' ModelSpec architecture ids (``library/sai_model_spec.py``), by family
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
                 "sd3": "stable-diffusion-3", "flux": "flux-1",
                 # musubi-tuner's ids (its sai_model_spec.py; Klein's there add the size, -4b / -9b)
                 "qwen-image": "Qwen-Image", "z-image": "Z-Image", "flux2-klein": "Flux.2-klein",
                 "flux2": "Flux.2-dev",
                 "chroma": "chroma"}  # sd-scripts' ARCH_FLUX_1_CHROMA
FLOW_FAMILIES = ("sd3", "flux", "qwen-image", "z-image", "flux2-klein", "flux2", "chroma")
FLOW_ARCHITECTURES = tuple(ARCHITECTURES[f] for f in FLOW_FAMILIES)


def marker_metadata(prediction_type: str, zero_terminal_snr: bool, family: str | None = None) -> dict[str, str]:
    """The safetensors metadata that says how a model of ``family`` (``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux``;
    None: an SD-style model of unknown family) must be sampled, in sd-scripts' keys and values.

    VP models: ``modelspec.prediction_type`` ``"v"`` / ``"epsilon"`` (a diffusers name for others, e.g.
    ``"sample"``), ``ss_zero_terminal_snr``; ``ss_v2`` only for SD 2.x. Flow models (``prediction_type
    "flow_prediction"``): only ``modelspec.architecture``, as sd-scripts writes no prediction type for them.
    Readers: :func:`scheduler_settings_from_checkpoint`.
    """
    if prediction_type == "flow_prediction":
        if family not in FLOW_FAMILIES:
            raise ValueError(f"flow_prediction metadata needs family {' / '.join(map(repr, FLOW_FAMILIES))} "
                             f"(got {family!r})")
        return {ARCHITECTURE_KEY: f"{ARCHITECTURES[family]}/lora"}
    if family in FLOW_FAMILIES:
        raise ValueError(f"a {family} model is trained with flow matching, not prediction_type={prediction_type!r}")
    metadata = {PREDICTION_TYPE_KEY: {"v_prediction": "v"}.get(prediction_type, prediction_type),
                "ss_zero_terminal_snr": str(bool(zero_terminal_snr))}
    if family is not None:
        architecture = ARCHITECTURES[family]
        if family == "sd2" and prediction_type == "v_prediction":
            architecture = "stable-diffusion-v2-768-v"
        metadata[ARCHITECTURE_KEY] = f"{architecture}/lora"
    if family == "sd2":
        metadata["ss_v2"] = "True"
    return metadata


def add_marker_metadata(path: str | os.PathLike, prediction_type: str, zero_terminal_snr: bool,
                        family: str | None = None) -> Path:
    """Rewrite a safetensors file with :func:`marker_metadata` added to its metadata (tensors and the rest of the
    metadata unchanged; written beside it and renamed over it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata.update(marker_metadata(prediction_type, zero_terminal_snr, family))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def check_lora_for_pipeline(pipe, lora: str | os.PathLike | Mapping[str, object]) -> list[str]:
    """Warn when ``pipe.scheduler`` does not sample what ``lora`` (a file, a LoRA folder or a state dict) was
    trained for; returns the warnings. A LoRA without markers or metadata is assumed epsilon without ZTSNR."""
    import warnings

    settings = scheduler_settings_from_checkpoint(lora)
    config = pipe.scheduler.config
    trained, zsnr = settings["prediction_type"], bool(settings["rescale_betas_zero_snr"])
    is_flow_scheduler = "shift" in config and "beta_schedule" not in config
    problems = []
    if trained == "flow_prediction" or is_flow_scheduler:
        if trained == "flow_prediction" and not is_flow_scheduler:
            problems.append(f"the LoRA {lora} was trained with flow matching, but {type(pipe.scheduler).__name__} is "
                            "a VP scheduler: use ZTSNRFlowMatchScheduler.from_config(pipe.scheduler.config)")
    else:
        sampled = config.get("prediction_type", "epsilon")
        sampled_zsnr = bool(config.get("rescale_betas_zero_snr", False))
        if (sampled, sampled_zsnr) != (trained, zsnr):
            problems.append(
                f"the LoRA {lora} was trained for prediction_type={trained!r}"
                f"{' on a zero-terminal-SNR schedule' if zsnr else ''}, but the pipeline's scheduler samples "
                f"prediction_type={sampled!r} with rescale_betas_zero_snr={sampled_zsnr}: set "
                f"{scheduler_fix_line(trained, zsnr)}"
            )
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=2)
    return problems


def scheduler_fix_line(prediction_type: str, zero_terminal_snr: bool) -> str:
    """The Python line that configures ``pipe.scheduler`` to sample what a LoRA was trained for."""
    kwargs = f"prediction_type={prediction_type!r}, rescale_betas_zero_snr={bool(zero_terminal_snr)}"
    if zero_terminal_snr:
        kwargs += ", timestep_spacing='logsnr'"
    return f"pipe.scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(pipe.scheduler.config, {kwargs})"


def _kohya_state_for(pipe, lora: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The diffusers-named state dict of a kohya LoRA file for an SD3 / Flux pipeline, or None to leave the file to
    diffusers. diffusers 0.42 reads no kohya SD3 file at all and splits Flux's fused ``linear1`` only at FLUX.1's
    width; :func:`diffusers_ztsnr.lora_keys.from_kohya_state_dict` does both for any width."""
    from .lora_keys import from_kohya_state_dict, model_family

    path = Path(lora)
    if path.is_dir() or path.suffix != ".safetensors" or not hasattr(pipe, "transformer"):
        return None
    from safetensors.torch import load_file

    state = load_file(str(path))
    if not state or not all(k.startswith("lora_") and k.endswith(_KOHYA_SUFFIXES) for k in state):
        return None
    try:
        family = model_family(type(pipe).__name__, pipe.transformer.config)
    except ValueError:
        return None  # Qwen-Image, Z-Image, FLUX.2: diffusers' own converters read the names we write for them
    components = {name: getattr(pipe, name) for name in ("transformer", "text_encoder", "text_encoder_2")
                  if getattr(pipe, name, None) is not None}
    try:
        return from_kohya_state_dict(family, state, components, pipe.transformer.config)
    except ValueError:
        return None  # not our naming: diffusers may know the file's convention


_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def load_lora_weights(pipe, lora: str | os.PathLike, **kwargs) -> list[str]:
    """``pipe.load_lora_weights(lora, **kwargs)``, then :func:`check_lora_for_pipeline`; returns its warnings.

    A kohya-format file for an SD3 / Flux pipeline is converted first (see :func:`_kohya_state_for`), so both files
    the training scripts write load here whatever the family.
    """
    converted = _kohya_state_for(pipe, lora)
    pipe.load_lora_weights(converted if converted is not None else lora, **kwargs)
    return check_lora_for_pipeline(pipe, lora)


def with_markers(state_dict: Mapping[str, torch.Tensor], prediction_type: str, zero_terminal_snr: bool) -> dict:
    """A copy of ``state_dict`` with the markers for ``prediction_type`` / ``zero_terminal_snr`` set."""
    out = {k: v for k, v in state_dict.items() if k not in (V_PRED_KEY, ZTSNR_KEY)}
    if prediction_type == "v_prediction":
        out[V_PRED_KEY] = torch.tensor([])
    elif prediction_type != "epsilon":
        raise ValueError(f"prediction_type={prediction_type!r} has no marker; allowed: 'epsilon', 'v_prediction'.")
    if zero_terminal_snr:
        out[ZTSNR_KEY] = torch.tensor([])
    return out
