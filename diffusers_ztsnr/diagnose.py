"""``diffusers-ztsnr inspect``: what a scheduler config really samples, and the known-bad combinations.

Reads a pipeline folder (``model_index.json`` + ``scheduler/``), a scheduler folder or a
``scheduler_config.json`` and reports, in this package's conventions: the class and parameterization,
the terminal SNR and ``sigma_max = sigma/alpha`` of the schedule the class actually builds, whether it is
zero-terminal-SNR, the timestep grid for a step count and spacing, and warnings for combinations that
fail silently elsewhere.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .schedule import VPSchedule, flow_to_vp
from .spacing import SPACINGS, discrete_timesteps


@dataclass
class ScheduleReport:
    class_name: str
    path: str  # "vp" or "flow"
    prediction_type: str
    terminal_snr: float
    sigma_max: float
    is_zero_terminal_snr: bool
    timesteps: list[float]
    spacing: str
    warnings: list[str] = field(default_factory=list)
    schedule: VPSchedule | None = None

    def text(self) -> str:
        lines = [
            f"class:              {self.class_name} ({self.path} path)",
            f"prediction_type:    {self.prediction_type}",
            f"terminal SNR:       {self.terminal_snr:.6g}" + ("  (zero: ZTSNR)" if self.is_zero_terminal_snr else ""),
            f"sigma_max:          {self.sigma_max:.6g}  (sigma/alpha at the noisiest training time)",
            f"timesteps ({self.spacing}, {len(self.timesteps)} steps): {[round(t, 3) for t in self.timesteps]}",
        ]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def load_scheduler_config(path: str | Path) -> dict[str, Any]:
    """The scheduler config of a pipeline folder, a scheduler folder or a JSON file."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "scheduler" / "scheduler_config.json",
                                                  path / "scheduler_config.json"]
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise FileNotFoundError(
        f"no scheduler config at {path}: pass a pipeline folder, a scheduler folder or a scheduler_config.json."
    )


def _declared_keys(class_name: str) -> set[str] | None:
    for module in ("diffusers", "diffusers_ztsnr"):
        cls = getattr(importlib.import_module(module), class_name, None)
        if cls is not None:
            return set(inspect.signature(cls.__init__).parameters)
    return None


def inspect_scheduler_config(config: dict[str, Any], num_inference_steps: int = 20, spacing: str | None = None,
                             lora_settings: dict[str, Any] | None = None) -> ScheduleReport:
    """Analyse ``config``; ``lora_settings`` (from
    :func:`~diffusers_ztsnr.markers.scheduler_settings_from_checkpoint`) adds a check of a LoRA's markers."""
    class_name = config.get("_class_name", "?")
    declared = _declared_keys(class_name)
    warnings: list[str] = []
    is_flow = "FlowMatch" in class_name or "shift" in config and "beta_schedule" not in config
    prediction_type = config.get("prediction_type", "flow_prediction" if is_flow else "epsilon")
    zsnr_requested = bool(config.get("rescale_betas_zero_snr", False))
    if zsnr_requested and declared is not None and "rescale_betas_zero_snr" not in declared:
        warnings.append(
            f"rescale_betas_zero_snr=True is in the config, but {class_name} has no such option and silently "
            "ignores it: it samples the original schedule. Use a diffusers_ztsnr scheduler."
        )
        zsnr_requested = False
    if is_flow:
        steps = num_inference_steps
        s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        shift = float(config.get("shift", 1.0))
        if not config.get("use_dynamic_shifting", False):
            s = shift * s / (1 + (shift - 1) * s)
        report = ScheduleReport(class_name, "flow", prediction_type, 0.0, math.inf, True,
                                (s * config.get("num_train_timesteps", 1000)).tolist(),
                                "dynamic shift (mu from the image size)" if config.get("use_dynamic_shifting")
                                else f"shift {shift}", warnings)
        if prediction_type == "epsilon":
            warnings.append("an epsilon model on the flow path starts at s = 1, SNR 0, where it carries no "
                            "information about the image.")
        _check_lora(report, lora_settings)
        return report
    schedule = VPSchedule.from_scheduler_config(config, zsnr_requested)
    T = schedule.num_train_timesteps
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(T - 1))
    spacing = spacing or config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r}; allowed: {', '.join(SPACINGS)}.")
    grid = discrete_timesteps(schedule, num_inference_steps, spacing, config.get("steps_offset", 0)).tolist()
    report = ScheduleReport(class_name, "vp", prediction_type, alpha**2 / sigma**2,
                            sigma / alpha if alpha > 0 else math.inf, schedule.is_zero_terminal_snr, grid, spacing,
                            warnings, schedule)
    if schedule.is_zero_terminal_snr and prediction_type == "epsilon":
        warnings.append("epsilon prediction on a zero-terminal-SNR schedule: at t = T-1 the model sees pure noise "
                        "and its prediction says nothing about the image (diffusers' DDIM gives Inf there). "
                        "Sample a v_prediction model, or do not rescale.")
    if not schedule.is_zero_terminal_snr:
        warnings.append(f"terminal SNR {report.terminal_snr:.3g} > 0: training left signal at t = T-1, so sampling "
                        "from pure noise gives medium-brightness images (the 'uniform lighting curse', "
                        "Lin et al. 2023).")
    elif grid[0] != T - 1:
        warnings.append(f"ZTSNR schedule, but the {spacing} grid starts at t = {grid[0]}, not at the zero-SNR "
                        f"t = {T - 1}: use trailing, logsnr or flow spacing.")
    _check_lora(report, lora_settings)
    return report


def _check_lora(report: ScheduleReport, lora: dict[str, Any] | None) -> None:
    if not lora:
        return
    if lora["prediction_type"] != report.prediction_type and not (
        report.path == "flow" and lora["prediction_type"] == "epsilon"
    ):
        report.warnings.append(
            f"the LoRA's markers say {lora['prediction_type']}, but this scheduler samples {report.prediction_type}: "
            f"pass prediction_type={lora['prediction_type']!r} (and rescale_betas_zero_snr="
            f"{lora['rescale_betas_zero_snr']}) to the scheduler's from_config."
        )
    if lora["rescale_betas_zero_snr"] and not report.is_zero_terminal_snr:
        report.warnings.append("the LoRA was trained on a zero-terminal-SNR schedule, but this scheduler's is not: "
                               "pass rescale_betas_zero_snr=True.")


def plot_log_snr(reports: dict[str, ScheduleReport], path: str | Path) -> Path:
    """log-SNR against t for VP reports, with each report's timestep grid marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, report in reports.items():
        if report.schedule is None:  # flow configs: VP log-SNR at equal SNR, s = t / 1000
            t = torch.tensor(report.timesteps, dtype=torch.float64)
            alpha, sigma, _ = flow_to_vp(t / 1000)
            ax.plot(t, (2 * (alpha.log() - sigma.log())).clamp(min=-20), "o--", ms=3, label=f"{label} (flow)")
            continue
        t = torch.arange(report.schedule.num_train_timesteps, dtype=torch.float64)
        line, = ax.plot(t, report.schedule.log_snr(t).clamp(min=-20), label=label)
        grid = torch.tensor(report.timesteps, dtype=torch.float64)
        ax.plot(grid, report.schedule.log_snr(grid).clamp(min=-20), "o", ms=3, color=line.get_color())
    ax.set_xlabel("training timestep t (T-1 noisiest)")
    ax.set_ylabel("log SNR (clipped at -20; -inf is SNR 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
