"""Shared by the training tests: tiny offline models + demo data, the whole demo set as one batch and its
fixed-noise flow-matching loss."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffusers_ztsnr.testing.demo_data import make_demo_dataset
from diffusers_ztsnr.testing.tiny import save_tiny_pipeline
from diffusers_ztsnr.training import objectives
from diffusers_ztsnr.training.data import ImageCaptionDataset, collate_fn, load_image_caption_dataset

RES = 32
REPO = Path(__file__).resolve().parents[1]
#: ``accelerate launch`` flags that start two CPU processes with torchrun (see :func:`two_process_run`)
DDP_LAUNCH = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]


def launch_two_cpu_processes(launcher_args: list[str], script: Path, script_args: list[str], timeout: int = 300,
                             **env: str) -> subprocess.CompletedProcess:
    """``accelerate launch <launcher_args> --num_processes 2 --main_process_port 0 script script_args`` as two CPU
    processes (DDP over gloo), one thread each, on a port the launcher finds free.

    A run still going after ``timeout`` seconds fails the test with every process's Python stacks: each is sent
    SIGABRT, on which ``PYTHONFAULTHANDLER`` prints them."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "0", str(script), *script_args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONFAULTHANDLER": "1", **env}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          cwd=REPO, preexec_fn=no_core_files if os.name == "posix" else None) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"two-process run still going after {timeout} s; its stacks:\n{stop_with_stacks(process)}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def no_core_files() -> None:
    """In a launched process (and its workers, which inherit it): SIGABRT writes no core file."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def stop_with_stacks(process: subprocess.Popen) -> str:
    """Stop a hung launch: SIGABRT to the launcher and every process below it (each prints its Python stacks), then
    SIGKILL to any left after 30 s (torchrun's workers run in sessions of their own, so they are signalled one by
    one); returns the end of what they wrote to stderr."""
    tree = [*descendants(process.pid), process.pid]  # read before the launcher dies and its workers are re-parented
    for sig in (signal.SIGABRT, signal.SIGKILL):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            return process.communicate(timeout=30)[1][-12000:]
        except subprocess.TimeoutExpired:
            continue
    return "(no output: a process survived SIGKILL)"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first (Linux ``/proc``; none elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


#: a ``sitecustomize`` for launched workers: as the keeper lets the process group go, each rank writes whether it
#: still held the group and how many DDP wrappers are alive into ``$TEARDOWN_REPORT_DIR/rank<RANK>.json``
TEARDOWN_REPORT_HOOK = """
import os

if os.environ.get("RANK") is not None and os.environ.get("TEARDOWN_REPORT_DIR"):
    import gc
    import json
    import warnings

    import torch

    from diffusers_ztsnr.training import distributed

    _release = distributed.ProcessGroupKeeper.release

    def _reporting_release(keeper):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ddp = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
        path = os.path.join(os.environ["TEARDOWN_REPORT_DIR"], "rank" + os.environ["RANK"] + ".json")
        with open(path, "w") as f:
            json.dump({"held": keeper.holds_group, "ddp_wrappers": ddp}, f)
        _release(keeper)

    distributed.ProcessGroupKeeper.release = _reporting_release
"""


def worker_hook(folder: Path, code: str = "") -> dict[str, str]:
    """Environment for :func:`launch_two_cpu_processes` that runs :data:`TEARDOWN_REPORT_HOOK` (then ``code``) in
    every worker as its ``sitecustomize``; the reports land in ``folder`` (:func:`teardown_reports`)."""
    (folder / "hook").mkdir(parents=True)
    (folder / "hook" / "sitecustomize.py").write_text(TEARDOWN_REPORT_HOOK + code)
    return {"PYTHONPATH": os.pathsep.join([str(folder / "hook"), os.environ.get("PYTHONPATH", "")]),
            "TEARDOWN_REPORT_DIR": str(folder)}


def teardown_reports(folder: Path) -> list[dict]:
    """Each rank's report from :data:`TEARDOWN_REPORT_HOOK`, by rank."""
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


def two_process_run(script: str, args: list[str], out: Path, **env: str) -> dict:
    """``train_scripts/<script> args`` (``args`` name ``--output_dir out``) under ``accelerate launch`` as two CPU
    processes (:func:`launch_two_cpu_processes`); asserts it exited 0 with equal LoRA checksums on both ranks and
    returns its training summary.

    accelerate's own ``--cpu --num_processes 2`` starts one process unless MPI is installed (its multi-CPU launcher
    is mpirun); ``--multi_gpu`` with ACCELERATE_USE_CPU=true starts them with torchrun instead."""
    done = launch_two_cpu_processes(DDP_LAUNCH, REPO / "train_scripts" / script, args, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert len(summary["rank_checksums"]) == 2 and summary["rank_checksums"][0] == summary["rank_checksums"][1]
    return summary


def tiny_assets(root: Path, *kinds: str, num_images: int = 4) -> dict[str, Path]:
    """``{kind: saved tiny pipeline, "data": demo imagefolder at RES px}``, loading chatter silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assets = {kind: save_tiny_pipeline(kind, root / kind) for kind in kinds}
        assets["data"] = make_demo_dataset(root / "data", num_images=num_images, size=RES)
    return assets


def whole_dataset_batch(data_dir: Path, resolution: int = RES) -> dict:
    """Every image of an imagefolder, center-cropped, as one collated batch (a fixed evaluation batch)."""
    ds = ImageCaptionDataset(load_image_caption_dataset(train_data_dir=data_dir), image_column="image",
                             caption_column="text", resolution=resolution, center_crop=True)
    return collate_fn([ds[i] for i in range(len(ds))])


def fixed_batch_flow_loss(task, batch: dict, lora_dir: Path | None = None, draws: int = 8) -> float:
    """Flow-matching loss of ``task.pipe``'s transformer (+ the LoRA in ``lora_dir``, loaded with diffusers'
    ``load_lora_weights``) on ``batch``, with fixed noise and uniform times (generator seed 123, ``draws`` draws),
    through the task's own encoders and predictor (Kontext's with the batch's reference images)."""
    if lora_dir:
        task.pipe.load_lora_weights(lora_dir)
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        latents = task.encode_images(batch["pixel_values"])
        cond = task.encode_prompts(batch["caption"], "cpu")
        predict = task.predictor(task.pipe.transformer, batch, torch.float32, "flow")
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=g)
            s = objectives.sample_flow_sigmas(len(latents), g, "none")
            noisy = objectives.noisy_latents(latents, noise, 1 - s, s)
            pred = predict(noisy, s, cond)
            total += objectives.flow_matching_loss(pred, "flow_prediction", noisy, latents, noise, 1 - s, s).item()
    return total / draws
