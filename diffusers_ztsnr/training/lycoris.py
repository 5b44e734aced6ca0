"""``--adapter lokr`` / ``loha``: LyCORIS' Kronecker-product and Hadamard-product adapters, trained through peft,
exported in LyCORIS' own key names (ComfyUI, A1111 / Forge's built-in LyCORIS support).

What each computes, per adapted weight ``W`` of shape ``out x in`` (peft's forms, which are LyCORIS'):

* LoKr: ``W + s * kron(w1, w2)`` with ``w1`` of shape ``f_out x f_in`` (``f`` the factor peft picks), ``w2`` of the
  rest, itself ``w2_a @ w2_b`` of rank ``r`` when that is smaller, ``s = alpha / r``.
* LoHa: ``W + s * (w1_a @ w1_b) * (w2_a @ w2_b)`` (elementwise product of two rank-``r`` products), ``s = alpha / r``.

ComfyUI applies a LoHa as ``alpha / r`` times that product, with ``alpha`` from the file's ``<module>.alpha`` key:
the same. For a LoKr it scales by ``alpha / rank`` only when a factor is stored as two matrices, and by 1 when
both are stored whole; the export therefore writes both factors whole, ``w2`` premultiplied by ``s``, and no
``alpha``: every consumer then applies exactly ``s * kron(w1, w2)``.

diffusers' ``load_lora_weights`` reads neither adapter, so no diffusers-format file is written; the run's
checkpoints hold the peft states (``peft.set_peft_model_state_dict`` restores them onto a model given the same
``LoKrConfig`` / ``LoHaConfig``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..lora_keys import kohya_slot
from ..markers import marker_metadata

ALGORITHMS = ("lokr", "loha")
LYCORIS_FILE = "lycoris.safetensors"
#: the UNet families whose kohya names map one module to one name (no fused projections)
FAMILIES = ("sd1", "sd2", "sdxl")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def lycoris_config(algorithm: str, rank: int, alpha: float | None, target_modules: list[str]):
    """peft's config for ``algorithm``: rank ``r``, ``alpha`` (default: the rank), the target modules."""
    from peft import LoHaConfig, LoKrConfig

    config_class = LoKrConfig if algorithm == "lokr" else LoHaConfig
    return config_class(r=rank, alpha=alpha or rank, target_modules=list(target_modules))


def lycoris_problems(args, flow: bool) -> list[str]:
    """Where ``--adapter lokr|loha`` cannot be exported as trained: the flow transformers (their kohya names fuse
    projections, which a Kronecker or Hadamard product cannot be split across)."""
    adapter = getattr(args, "adapter", "lora")
    if adapter not in ALGORITHMS:
        return []
    problems = []
    if flow:
        problems.append(f"--adapter {adapter}: its LyCORIS export covers SD 1.x / 2.x / SDXL UNets; for SD3 / Flux "
                        "use --adapter lora or dora")
    if getattr(args, "export_checkpoint", None):
        problems.append(f"--adapter {adapter} with --export_checkpoint: the merged export reads a diffusers-format "
                        "LoRA, which a LyCORIS adapter does not write; use --adapter lora or dora")
    return problems


def _modules(state: dict[str, torch.Tensor], algorithm: str) -> list[str]:
    marker = ".lokr_w1" if algorithm == "lokr" else ".hada_w1_a"
    return sorted({k.split(marker)[0] for k in state if marker in k})


def _factor(state: dict[str, torch.Tensor], path: str, name: str) -> torch.Tensor:
    """A LoKr factor whole: stored whole, or as its two low-rank matrices."""
    whole = state.get(f"{path}.{name}")
    return whole if whole is not None else state[f"{path}.{name}_a"] @ state[f"{path}.{name}_b"]


def to_lycoris_state_dict(family: str, states: dict[str, dict[str, torch.Tensor]], algorithm: str, alpha: float,
                          rank: int, denoiser_config: dict) -> dict[str, torch.Tensor]:
    """peft LoKr / LoHa ``states`` (``{component: state}``) under LyCORIS' names (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"the LyCORIS export covers {', '.join(FAMILIES)}, not {family}")
    scale = alpha / rank
    out: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        for path in _modules(state, algorithm):
            name = kohya_slot(family, component, path, denoiser_config).name
            if algorithm == "lokr":
                out[f"{name}.lokr_w1"] = _factor(state, path, "lokr_w1").contiguous()
                out[f"{name}.lokr_w2"] = (_factor(state, path, "lokr_w2") * scale).contiguous()
            else:
                out.update({f"{name}.{key}": state[f"{path}.{key}"].contiguous() for key in _LOHA})
                out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lycoris(path: Path, states: dict[str, dict[str, torch.Tensor]], algorithm: str, alpha: float, rank: int,
                 prediction_type: str, zero_terminal_snr: bool, *, family: str, denoiser_config: dict,
                 base_model: str = "") -> Path:
    """Write :func:`to_lycoris_state_dict` with LyCORIS' kohya-style metadata and how to sample it."""
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{algorithm}"}}',
                "ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_sd_model_name": base_model,
                **marker_metadata(prediction_type, zero_terminal_snr, family)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(to_lycoris_state_dict(family, states, algorithm, alpha, rank, denoiser_config), str(tmp),
              metadata=metadata)
    tmp.replace(path)
    return path
