"""Sharded training (FSDP, DeepSpeed) and the training loop: what the loop supports, the pieces a sharded run
needs, and the order in which a multi-process run lets its process group go (:class:`ProcessGroupKeeper`).

The loop is data parallel (DDP): every process holds the whole denoiser and a replica of its LoRA, gradients are
averaged, and the main process alone reads the LoRA to write checkpoints and the export. Sharding breaks that:

* FSDP2 (``fully_shard``) replaces each parameter by a ``DTensor`` holding this rank's shard. The LoRA read on the
  main process is then a shard (``safetensors`` refuses it: "Attempted to access the data pointer on an invalid
  python storage"); gathering it is a collective that every rank must enter (:func:`full_tensors`); and
  accelerate's own ``save_state`` under FSDP writes the model and optimizer through ``torch.distributed.checkpoint``,
  also a collective, while the loop calls it on the main process only. The parameter objects collected before
  ``accelerator.prepare`` are no longer the module's (:func:`trainable_parameters` reads them again).
* DeepSpeed: the loop prepares the dataloader in its own ``accelerator.prepare`` call, so accelerate cannot fill
  the config's ``"auto"`` micro-batch size and refuses to prepare the model; under ZeRO-3 the parameters are
  partitioned as well.

:func:`check_supported` says so in one line before anything trains (accelerate itself never selects FSDP or DeepSpeed
on a CPU: ``ACCELERATE_USE_CPU`` runs are DDP whatever the config says).
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .config import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")

#: where the tested accelerate configurations live, and which of them the loop can train with
CONFIG_FOLDER = "examples/accelerate_configs"


def sharding(accelerator: Accelerator) -> str | None:
    """``"fsdp1"`` / ``"fsdp2"`` / ``"deepspeed-zero<stage>"`` for a sharded run, ``None`` for DDP or one process."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return f"fsdp{state.fsdp_plugin.fsdp_version}"
    if state.distributed_type == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{state.deepspeed_plugin.zero_stage}"
    return None


def unsupported_reason(accelerator: Accelerator) -> str | None:
    """Why the training loop cannot run under this accelerator's sharding (one line), or ``None``."""
    kind = sharding(accelerator)
    if kind is None:
        return None
    if kind.startswith("fsdp"):
        why = ("the LoRA is sharded across processes, and checkpoints and the export read it on the main process "
               "only")
    else:
        why = ("the scripts prepare the dataloader apart from the model, so DeepSpeed's 'auto' micro-batch size "
               "cannot be filled in")
    return (f"{kind} is not supported by the training scripts yet: {why}. Train with DDP (--multi_gpu, or "
            f"{CONFIG_FOLDER}/ddp_multi_gpu.yaml); a LoRA's optimizer state is small enough to replicate.")


def check_supported(accelerator: Accelerator) -> None:
    """Raise :class:`~.config.UsageError` before any training for a sharding the loop cannot run."""
    reason = unsupported_reason(accelerator)
    if reason:
        raise UsageError(f"error: {reason}")


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every FSDP2 shard (``DTensor``) gathered into the whole tensor; all values detached,
    contiguous, on the CPU.

    Gathering is a collective: every rank must call this with the same keys in the same order, and only then may
    the main process write what it returns. Plain tensors pass through unchanged (DDP, one process).
    """
    from torch.distributed.tensor import DTensor

    gathered = {}
    for name, value in state.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        gathered[name] = value.detach().to("cpu").contiguous()
    return gathered


def trainable_parameters(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters with ``requires_grad`` that ``modules`` hold now, in module order.

    ``fully_shard`` registers new parameter objects, so a list collected before ``accelerator.prepare`` no longer
    holds what the optimizer updates; read it again after ``prepare``.
    """
    return [p for module in modules for p in module.parameters() if p.requires_grad]


class ProcessGroupKeeper:
    """A Python reference to the default process group, taken while it exists and dropped after everything that
    trained with it is gone (:func:`run_keeping_process_group`).

    Why: DDP's C++ ``Reducer`` also references the process group, and pybind11 frees the ``Reducer`` with the GIL
    held. When it holds the last reference, gloo's destructor joins its worker threads with the GIL held, while a
    worker may still be freeing a finished collective whose tensors belong to Python and must take the GIL to do so:
    the process hangs after the run's last line (observed on the CPU: about one two-process run in ten). A process
    group freed from Python releases the GIL before its destructor runs (torch binds it that way), so the workers
    finish and the join returns.
    """

    def __init__(self) -> None:
        self._group: Any = None

    def keep(self) -> None:
        """Reference the default process group, if one is initialized (call before it is destroyed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self._group = dist.group.WORLD

    @property
    def holds_group(self) -> bool:
        return self._group is not None

    def release(self) -> None:
        """Drop the reference: the last one, if everything that trained with the group has been freed."""
        self._group = None


def run_keeping_process_group(run: Callable[[ProcessGroupKeeper], T]) -> T:
    """``run(keeper)``, then the process group's reference dropped from here, once ``run``'s frames and any reference
    cycles (a DDP wrapper held by the accelerator is in one) have been freed: see :class:`ProcessGroupKeeper`.

    On an exception the traceback's frames are cleared first (their locals hold the wrapper; the traceback's lines
    stay), so a failing rank exits with its error instead of hanging. A run without a process group (one process)
    is left alone: nothing collected, its traceback's locals kept for a debugger."""
    keeper = ProcessGroupKeeper()
    try:
        return run(keeper)
    except BaseException as error:
        if keeper.holds_group:
            traceback.clear_frames(error.__traceback__)
        raise
    finally:
        if keeper.holds_group:
            gc.collect()
            keeper.release()
