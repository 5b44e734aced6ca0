"""What the accelerate-config tests start with ``accelerate launch`` on CPU processes (a script, not a test module).

Each process writes what it reports as ``<tag>-<rank>.json`` into the folder ``ACCELERATE_TEST_REPORT_DIR`` names
(files, not printed lines: the processes share one stdout, whose lines interleave).

``probe``: build an ``Accelerator`` as the training scripts do and report (``probe``) the distributed type accelerate
chose and the FSDP settings the launcher handed over.

``fsdp2 ARGS...``: the UNet training script's ``main(ARGS)`` with accelerate's FSDP2 path forced on the CPU
(``fsdp2-unguarded``: with the loop's refusal of sharded runs switched off).
accelerate 1.15 never selects FSDP on a CPU (``ACCELERATE_USE_CPU`` makes it DDP over gloo whatever the config says);
here the accelerator state is switched to FSDP after accelerate set up the gloo process group, so ``prepare`` runs
torch's ``fully_shard`` on the denoiser exactly as it would on GPUs. Each process reports ``sharded`` after the
denoiser is prepared (its trainable parameters are DTensors; the LoRA gathered with
:func:`diffusers_ztsnr.training.distributed.full_tensors`: key names and a checksum) and ``steps`` after each
optimizer step (how many it ran); a failure is reported with its traceback (``traceback``).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch


def report(tag: str, rank: int, values: dict) -> None:
    folder = os.environ["ACCELERATE_TEST_REPORT_DIR"]
    with open(os.path.join(folder, f"{tag}-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, **values}, f)


def probe() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    state = accelerator.state
    fsdp = getattr(state, "fsdp_plugin", None)
    report("probe", accelerator.process_index, {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1], "is_fsdp2": accelerator.is_fsdp2,
        "fsdp_plugin": fsdp is not None, "env_use_fsdp": os.environ.get("ACCELERATE_USE_FSDP"),
        "env_fsdp_version": os.environ.get("FSDP_VERSION"),
        "env_fsdp_state_dict_type": os.environ.get("FSDP_STATE_DICT_TYPE"),
    })


def force_fsdp() -> None:
    """Make every ``AcceleratorState`` built with an FSDP plugin on the CPU an FSDP one (gloo process group)."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as on GPUs

    accelerate.state.AcceleratorState.__init__ = init
    # the gloo process group, before the script's first PartialState(); a collective that one rank never enters
    # fails after ACCELERATE_TEST_PG_TIMEOUT seconds with each rank's traceback instead of hanging
    timeout = datetime.timedelta(seconds=float(os.environ.get("ACCELERATE_TEST_PG_TIMEOUT", "1800")))
    accelerate.state.PartialState(cpu=True, timeout=timeout)


def report_sharding() -> None:
    """After ``prepare`` shards the denoiser: print its trainable DTensors and the gathered LoRA (every rank)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.distributed.tensor import DTensor

    from diffusers_ztsnr.training.distributed import full_tensors, trainable_parameters
    from diffusers_ztsnr.training.lora import lora_state_dict

    prepare, step = Accelerator.prepare, AcceleratedOptimizer.step
    steps = []

    def checksum(state: dict) -> float:
        return sum(float(v.double().sum()) for v in state.values())

    def reporting_prepare(self, *args, **kwargs):
        models = [obj for obj in args if isinstance(obj, torch.nn.Module)]
        before = trainable_parameters(models)
        unsharded = checksum(lora_state_dict(models[0])) if models else None
        result = prepare(self, *args, **kwargs)
        if models:
            params = trainable_parameters(models)
            lora = full_tensors(lora_state_dict(models[0]))
            report("sharded", self.process_index, {
                "is_fsdp2": self.is_fsdp2,
                "dtensors": sum(isinstance(p, DTensor) for p in params), "trainable": len(params),
                "numel": sum(p.numel() for p in params),
                "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
                "same_parameter_objects": [id(p) for p in before] == [id(p) for p in params],
                "keys": sorted(lora), "checksum": checksum(lora), "unsharded_checksum": unsharded,
            })
        return result

    def counting_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        steps.append(1)
        report("steps", torch.distributed.get_rank(), {"steps": len(steps)})
        return out

    Accelerator.prepare = reporting_prepare
    AcceleratedOptimizer.step = counting_step


def main(argv: list[str]) -> int:
    if argv[0] == "probe":
        probe()
        return 0
    if argv[0] in ("fsdp2", "fsdp2-unguarded"):
        force_fsdp()
        report_sharding()
        from diffusers_ztsnr.training.unet import main as train

        if argv[0] == "fsdp2-unguarded":  # past the loop's refusal, to see what a sharded run would do
            import diffusers_ztsnr.training.loop as loop

            loop.check_supported = lambda accelerator: None

        try:
            train(argv[1:])
        except BaseException:  # each rank's own traceback, whole, whatever the other rank prints meanwhile
            report("traceback", int(os.environ["RANK"]), {"traceback": traceback.format_exc()})
            raise
        return 0
    raise SystemExit(f"unknown mode {argv[0]!r}: probe, fsdp2 or fsdp2-unguarded")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
