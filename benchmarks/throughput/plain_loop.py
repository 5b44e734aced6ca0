"""What the plain diffusers-example loops share: the examples' image transform, accelerate's ``prepare``, the
epoch loop (as a generator of batches), the optimizer step and the run's result.

Each loop's step stays inline in the caller's ``for``, as in the examples: a step's tensors then live until the
next step replaces them, which the peak RSS of the plain rows includes (a step in a function of its own frees
them on return, and the plain rows measured about 25 MiB less)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch


def example_transform(image, resolution: int) -> torch.Tensor:
    """torchvision's Resize(res, BILINEAR) + CenterCrop(res) + ToTensor() + Normalize([0.5], [0.5]) on a PIL image."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (round(w * scale), round(h * scale)):
        image = image.resize((round(w * scale), round(h * scale)), resample=Image.Resampling.BILINEAR)
    w, h = image.size
    left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - 0.5) / 0.5


def prepare(accelerator, model, optimizer, train_dataloader, steps: int) -> tuple:
    """A constant learning rate, then accelerate's ``prepare``: ``(model, optimizer, dataloader, lr_scheduler)``."""
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    return accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)


def example_batches(accelerator, model, train_dataloader, steps: int, step_times: list[float]) -> Iterator:
    """The examples' epoch loop: ``model.train()`` per epoch, each batch in turn; after a synced step the clock is
    appended to ``step_times``; stops after ``steps`` synced steps."""
    for _epoch in range(math.ceil(steps / len(train_dataloader))):
        model.train()
        for batch in train_dataloader:
            yield batch
            if accelerator.sync_gradients:
                step_times.append(time.perf_counter())
            if len(step_times) >= steps:
                return


def optimizer_step(accelerator, loss: torch.Tensor, lora_layers: list, optimizer, lr_scheduler) -> None:
    """Backward, gradient clipping at 1.0 on a synced step, then the optimizer and learning-rate steps."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(lora_layers, 1.0)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()


def run_result(start: float, accelerator, step_times: list[float], loss_value: float) -> dict:
    """Seconds since ``start`` (the whole run), the steps run, and the step loop timed directly (steps after the
    first)."""
    global_step = len(step_times)
    seconds = time.perf_counter() - start
    direct = (len(step_times) - 1) / (step_times[-1] - step_times[0]) if len(step_times) > 1 else None
    accelerator.end_training()
    return {"seconds": seconds, "steps": global_step, "direct_steps_per_s": direct, "final_loss": loss_value}
