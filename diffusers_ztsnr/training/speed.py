"""Speed and memory settings of a training run: ``--torch_compile``, the fused AdamW, dataloader defaults, and
parking the frozen encoders off the GPU while a cached run does not need them.

Nothing here changes what is computed, only where and how fast: a compiled denoiser computes the same function
(up to kernel-fusion rounding), a fused AdamW is the same update rule, and a parked encoder comes back to the device
for every use (validation images, an uncached batch).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

import torch

#: ``--torch_compile`` choices: ``regional`` compiles each repeated block once per shape (short compile, most of
#: the gain), ``full`` the whole denoiser (longest compile, fewest graph breaks)
COMPILE_MODES = ("none", "regional", "full")

#: repeated blocks of denoisers whose diffusers class declares none (``_repeated_blocks``)
EXTRA_REPEATED_BLOCKS = {"SD3Transformer2DModel": ("JointTransformerBlock",)}


def repeated_block_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The class names of ``model``'s repeated blocks: diffusers' own list, else ours; an error if neither knows."""
    names = tuple(getattr(model, "_repeated_blocks", None) or EXTRA_REPEATED_BLOCKS.get(type(model).__name__, ()))
    if not names:
        raise ValueError(f"--torch_compile regional: {type(model).__name__} declares no repeated blocks; use "
                         "--torch_compile full")
    return names


def compile_denoiser(model: torch.nn.Module, mode: str) -> int:
    """Compile ``model`` in place (``nn.Module.compile``: parameter names and state-dict keys are unchanged, so
    checkpoints and LoRA exports are those of the eager model). Returns how many modules were compiled."""
    if mode == "none":
        return 0
    if mode == "full":
        model.compile()
        return 1
    names = repeated_block_names(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"--torch_compile regional: no {', '.join(names)} module in {type(model).__name__}; "
                         "use --torch_compile full")
    for block in blocks:
        block.compile()
    return len(blocks)


def optimizer_options(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """``fused=True`` when every trainable parameter is a floating-point CUDA tensor: one kernel per parameter
    group instead of several per tensor (the same AdamW update)."""
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {}


def dataloader_options(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """``num_workers`` (``--dataloader_num_workers``; by default 0 on the CPU, where workers compete with the
    training threads, and up to 4 per process on a GPU) and ``pin_memory`` on a GPU (faster host-to-device
    copies)."""
    workers = args.dataloader_num_workers
    on_gpu = device.type == "cuda"
    if workers is None:
        workers = min(4, max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count()) - 1)) if on_gpu else 0
    # not persistent_workers: a worker's copy of the dataset would keep the epoch it started with, and the crops,
    # flips and caption choices of every later epoch (and of a resumed run) would be the first epoch's
    return {"num_workers": workers, "pin_memory": on_gpu}


class EncoderParking:
    """Moves the frozen VAE and text encoders to the CPU while the run trains from cached encodings only, and back
    onto the device for whatever needs them (``with parking.on_device():``). On a GPU this frees their memory
    for activations (about 2 GiB for SD3's three text encoders in bf16)."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device):
        self.modules = modules
        self.device = device
        self.parked = False

    def park(self) -> None:
        if self.device.type == "cpu" or self.parked:
            return
        for module in self.modules:
            module.to("cpu")
        self.parked = True
        torch.cuda.empty_cache()

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        was_parked = self.parked
        if was_parked:
            for module in self.modules:
                module.to(self.device)
            self.parked = False
        try:
            yield
        finally:
            if was_parked:
                self.park()
