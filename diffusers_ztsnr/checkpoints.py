"""``v_pred`` / ``ztsnr`` markers in single-file checkpoints (ComfyUI, SimpleTuner, A1111 convention).

A single-file checkpoint or LoRA says how it must be sampled by carrying empty tensors under the top-level
keys ``v_pred`` (a v-prediction model) and ``ztsnr`` (trained on a zero-terminal-SNR schedule); ComfyUI's
model detection reads exactly these keys. :func:`scheduler_settings_from_checkpoint` turns them into the
keyword arguments for any of this package's VP schedulers.

A diffusers-format LoRA (``pytorch_lora_weights.safetensors``, loaded with ``pipe.load_lora_weights``) cannot hold
extra tensors (diffusers' loader would try to load them), so the training scripts write the same information as
safetensors *metadata* -- sd-scripts' ``ss_v_parameterization`` / ``ss_zero_terminal_snr`` and
``modelspec.prediction_type`` -- into it and into the kohya export. :func:`check_lora_for_pipeline` (or
:func:`load_lora_weights`, which loads and checks) warns, with the line that fixes it, when a pipeline's scheduler
does not sample what the LoRA was trained for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

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


def scheduler_settings_from_checkpoint(checkpoint: Mapping[str, object] | str | os.PathLike) -> dict[str, object]:
    """Scheduler keyword arguments implied by a checkpoint's markers (a state dict or a file path).

    ``{"prediction_type": "v_prediction" | "epsilon", "rescale_betas_zero_snr": bool}``; pass them to
    ``from_config``, e.g. ``ZTSNRDPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **settings)``.
    A checkpoint without markers gives epsilon without ZTSNR (the SD 1.x / SDXL default), which is a guess:
    v-prediction SD 2.x checkpoints often carry no marker.
    """
    if not isinstance(checkpoint, Mapping):
        path = Path(checkpoint)
        if path.is_dir():
            path = path / LORA_WEIGHT_NAME
        from_metadata = _settings_from_metadata(path)
        if from_metadata is not None:
            return from_metadata
        checkpoint = path
    keys = set(_checkpoint_keys(checkpoint))
    return {
        "prediction_type": "v_prediction" if V_PRED_KEY in keys else "epsilon",
        "rescale_betas_zero_snr": ZTSNR_KEY in keys,
    }


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def marker_metadata(prediction_type: str, zero_terminal_snr: bool) -> dict[str, str]:
    """The safetensors metadata that says how a model must be sampled (sd-scripts' keys + modelspec)."""
    return {
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(bool(zero_terminal_snr)),
        "modelspec.prediction_type": prediction_type,
    }


def _settings_from_metadata(path: Path) -> dict[str, object] | None:
    """Settings from a safetensors file's metadata, or None when it has no ``modelspec.prediction_type``."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "modelspec.prediction_type" not in metadata:
        return None
    return {"prediction_type": metadata["modelspec.prediction_type"],
            "rescale_betas_zero_snr": metadata.get("ss_zero_terminal_snr") == "True"}


def add_marker_metadata(path: str | os.PathLike, prediction_type: str, zero_terminal_snr: bool) -> Path:
    """Rewrite a safetensors file with :func:`marker_metadata` added to its metadata (tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata.update(marker_metadata(prediction_type, zero_terminal_snr))
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
                f"pipe.scheduler = ZTSNRDPMSolverMultistepScheduler.from_config(pipe.scheduler.config, "
                f"prediction_type={trained!r}, rescale_betas_zero_snr={zsnr})"
                + (", timestep_spacing='logsnr')" if zsnr else ")")
            )
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=2)
    return problems


def load_lora_weights(pipe, lora: str | os.PathLike, **kwargs) -> list[str]:
    """``pipe.load_lora_weights(lora, **kwargs)``, then :func:`check_lora_for_pipeline`; returns its warnings."""
    pipe.load_lora_weights(lora, **kwargs)
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
