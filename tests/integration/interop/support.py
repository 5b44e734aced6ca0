"""Trained LoRAs on the tiny models, the deltas they were trained to apply, and what diffusers applies.

A LoRA is held as peft states (``{component: {"<module>.lora_A.weight": ...}}``) plus the ``lora_alpha`` it was
trained with; its delta on module ``m`` is ``lora_B @ lora_A * lora_alpha / rank`` (peft's ``LoraLayer`` scaling).
Module paths are compared without transformers' ``text_model.`` level, which transformers 5 dropped from
``CLIPTextModel`` but not from ``CLIPTextModelWithProjection``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusers_ztsnr.lora_keys import model_family
from diffusers_ztsnr.testing.tiny import make_tiny_pipeline
from diffusers_ztsnr.training.checkpointing import load_tensor_state
from diffusers_ztsnr.training.flow import DEFAULT_LORA_LAYERS
from diffusers_ztsnr.training.loop import ModelTask
from diffusers_ztsnr.training.lora import add_lora, lora_state_dict, save_diffusers_lora, save_kohya_lora

KINDS = ("sd15", "sdxl", "sd3", "flux")
#: the text encoders ``--train_text_encoder`` trains, in the order the training loop checkpoints them
TRAINED_TEXT_ENCODERS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
                         "sd3": ("text_encoder", "text_encoder_2"), "flux": ("text_encoder",)}
TOLERANCE = 1e-6
Deltas = dict[str, dict[str, torch.Tensor]]


def denoiser_name(kind: str) -> str:
    return "unet" if kind in ("sd15", "sdxl") else "transformer"


def plain_path(path: str) -> str:
    return path.removeprefix("text_model.")


@dataclass
class TrainedLora:
    """A LoRA as trained: peft ``states``, ``alpha``, and the folder holding both files written from them."""

    kind: str
    states: dict[str, dict[str, torch.Tensor]]
    alpha: float
    folder: Path

    @property
    def family(self) -> str:
        pipe_class = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                      "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[self.kind]
        return model_family(pipe_class, {})

    def deltas(self) -> Deltas:
        """``{component: {module: lora_B @ lora_A * alpha / rank}}``, the delta training applied."""
        out: Deltas = {}
        for component, state in self.states.items():
            for key in state:
                if ".lora_A." in key:
                    module = key.rsplit(".lora_A.", 1)[0]
                    a, b = state[key].double(), state[f"{module}.lora_B.weight"].double()
                    out.setdefault(component, {})[plain_path(module)] = b @ a * (self.alpha / a.shape[0])
        return out


def add_random_loras(pipe, kind: str, rank: int, alpha: float, seed: int,
                     double_blocks_only: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA on the denoiser (the scripts' default targets; for Flux optionally those of the double blocks only) and
    on the trainable text encoders, all weights drawn from a generator seeded with ``seed``; the peft states."""
    denoiser = getattr(pipe, denoiser_name(kind))
    targets = DEFAULT_LORA_LAYERS[type(pipe).__name__] if kind in ("sd3", "flux") else None
    if double_blocks_only:
        blocks = range(len(denoiser.transformer_blocks))
        targets = tuple(f"transformer_blocks.{i}.{t}" for i in blocks for t in targets)
    add_lora(denoiser, rank, alpha, *([targets] if targets else []))
    modules = {denoiser_name(kind): denoiser}
    for name in TRAINED_TEXT_ENCODERS[kind]:
        modules[name] = getattr(pipe, name)
        add_lora(modules[name], rank, alpha, ModelTask.text_encoder_targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            for name, param in sorted(module.named_parameters()):
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return {name: lora_state_dict(module) for name, module in modules.items()}


def save_both_files(pipe, kind: str, states, alpha: float, folder: Path, prediction_type: str = "epsilon",
                    zero_terminal_snr: bool = False) -> Path:
    """Both LoRA files from ``states`` through the training scripts' save functions."""
    denoiser = getattr(pipe, denoiser_name(kind))
    family = model_family(type(pipe).__name__, denoiser.config)
    if family in ("sd3", "flux"):
        prediction_type, zero_terminal_snr = "flow_prediction", False
    folder.mkdir(parents=True, exist_ok=True)
    save_diffusers_lora(type(pipe), folder, states, prediction_type, zero_terminal_snr, lora_alpha=alpha,
                        family=family)
    save_kohya_lora(folder / "lora_kohya.safetensors", states, alpha, prediction_type, zero_terminal_snr,
                    family=family, denoiser_config=dict(denoiser.config))
    return folder


def direct_lora(kind: str, folder: Path, rank: int, alpha: float, seed: int = 0) -> TrainedLora:
    """Adapters added directly to a fresh tiny pipeline (random non-zero ``lora_B``), both files saved."""
    pipe = make_tiny_pipeline(kind)
    states = add_random_loras(pipe, kind, rank, alpha, seed)
    return TrainedLora(kind, states, alpha, save_both_files(pipe, kind, states, alpha, folder))


def script_lora(kind: str, folder: Path, alpha: float) -> TrainedLora:
    """The LoRA a training run wrote to ``folder``, its trained weights read from the run's last checkpoint
    (``checkpoint-N/lora_i.safetensors``: the peft states of the denoiser, then the text encoders)."""
    (checkpoint,) = sorted(folder.glob("checkpoint-*"))
    names = (denoiser_name(kind), *TRAINED_TEXT_ENCODERS[kind])
    states = {name: load_tensor_state(checkpoint / f"lora_{i}.safetensors")[0] for i, name in enumerate(names)}
    return TrainedLora(kind, states, alpha, folder)


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {plain_path(name): module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def diffusers_applied(pipe, lora: str | Path | dict, components: list[str],
                      load=None) -> tuple[Deltas, dict[str, set[str]]]:
    """``pipe.load_lora_weights(lora)`` (or ``load(pipe, lora)``) then ``fuse_lora``: the fused weights minus the
    base weights, per component and module, and the modules diffusers put a LoRA layer on."""
    base = {c: linear_weights(getattr(pipe, c)) for c in components}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (load or type(pipe).load_lora_weights)(pipe, lora)
    patched = {c: {plain_path(n) for n, m in getattr(pipe, c).named_modules() if hasattr(m, "lora_A") and m.lora_A}
               for c in components}
    pipe.fuse_lora(components=components)
    applied: Deltas = {}
    for c in components:
        for name, module in getattr(pipe, c).named_modules():
            weight = getattr(getattr(module, "base_layer", module), "weight", None)
            if plain_path(name) in base[c] and weight is not None and not name.endswith(".base_layer"):
                delta = weight.detach().double() - base[c][plain_path(name)].double()
                if delta.abs().max() > 0:
                    applied.setdefault(c, {})[plain_path(name)] = delta
    return applied, patched


def max_error(applied: Deltas, trained: Deltas) -> float:
    """Largest |applied - trained| over every module either side names (a missing side counts as zero)."""
    worst = 0.0
    for component in set(applied) | set(trained):
        got, want = applied.get(component, {}), trained.get(component, {})
        for module in set(got) | set(want):
            ref = want.get(module, got.get(module))
            diff = got.get(module, torch.zeros_like(ref)) - want.get(module, torch.zeros_like(ref))
            worst = max(worst, float(diff.abs().max()))
    return worst


def count(deltas: Deltas | dict[str, set[str]]) -> int:
    return sum(len(v) for v in deltas.values())


def wide_flux_single_block_check(folder: Path, rank: int, alpha: float) -> tuple[float, set[str], set[str]]:
    """A kohya LoRA on q, k, v of one Flux single block as wide as FLUX.1 (3072; diffusers' converter assumes that
    width for ``linear1``), loaded by diffusers into a transformer whose other weights stay on the meta device.

    Returns the largest |fused - trained| over q, k, v and the MLP input (trained: zero), the modules whose weights
    changed and the modules diffusers put a LoRA layer on.
    """
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        wide = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=0, num_single_layers=1,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=16,
                                      pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    qkv = [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    parts = [*qkv, "single_transformer_blocks.0.proj_mlp"]
    for name in parts:
        module = wide.get_submodule(name)
        module.weight = torch.nn.Parameter(torch.zeros(module.weight.shape), requires_grad=False)
        module.bias = torch.nn.Parameter(torch.zeros(module.bias.shape), requires_grad=False)
    generator = torch.Generator().manual_seed(5)
    state = {}
    for name in qkv:
        state[f"{name}.lora_A.weight"] = torch.randn(rank, 3072, generator=generator) * 0.1
        state[f"{name}.lora_B.weight"] = torch.randn(3072, rank, generator=generator) * 0.1
    trained = TrainedLora("flux", {"transformer": state}, alpha, folder).deltas()["transformer"]
    folder.mkdir(parents=True, exist_ok=True)
    path = save_kohya_lora(folder / "lora_kohya.safetensors", {"transformer": state}, alpha, "flow_prediction", False,
                           family="flux", denoiser_config=dict(wide.config))
    pipe = make_tiny_pipeline("flux")
    pipe.register_modules(transformer=wide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path))
    patched = {n for n, m in wide.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    pipe.fuse_lora(components=["transformer"])
    error, changed = 0.0, set()
    for name in parts:
        module = wide.get_submodule(name)
        fused = getattr(module, "base_layer", module).weight.detach().double()
        changed |= {name} if fused.abs().max() > 0 else set()
        error = max(error, float((fused - trained.get(name, torch.zeros_like(fused))).abs().max()))
    return error, changed, patched
