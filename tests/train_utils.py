"""Shared by the training tests: tiny offline models + demo data, the whole demo set as one batch and its
fixed-noise flow-matching loss."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from diffusers_ztsnr.testing.demo_data import make_demo_dataset
from diffusers_ztsnr.testing.tiny import save_tiny_pipeline
from diffusers_ztsnr.training import objectives
from diffusers_ztsnr.training.data import ImageCaptionDataset, collate_fn, load_image_caption_dataset

RES = 32
REPO = Path(__file__).resolve().parents[1]


def two_process_run(script: str, args: list[str], out: Path, port: int) -> dict:
    """``train_scripts/<script> args`` (``args`` name ``--output_dir out``) under ``accelerate launch`` as two CPU
    processes (DDP over gloo); asserts it exited 0 with equal LoRA checksums on both ranks and returns its
    training summary.

    accelerate's own ``--cpu --num_processes 2`` starts one process unless MPI is installed (its multi-CPU launcher
    is mpirun); ``--multi_gpu`` with ACCELERATE_USE_CPU=true starts them with torchrun instead."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(REPO / "train_scripts" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
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
