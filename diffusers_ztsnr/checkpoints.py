"""``v_pred`` / ``ztsnr`` markers in single-file checkpoints (ComfyUI, SimpleTuner, A1111 convention).

A single-file checkpoint or LoRA says how it must be sampled by carrying empty tensors under the top-level
keys ``v_pred`` (a v-prediction model) and ``ztsnr`` (trained on a zero-terminal-SNR schedule); ComfyUI's
model detection reads exactly these keys. :func:`scheduler_settings_from_checkpoint` turns them into the
keyword arguments for any of this package's VP schedulers.
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
    keys = set(_checkpoint_keys(checkpoint))
    return {
        "prediction_type": "v_prediction" if V_PRED_KEY in keys else "epsilon",
        "rescale_betas_zero_snr": ZTSNR_KEY in keys,
    }


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
