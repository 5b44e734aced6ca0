"""The training loop both scripts share: accelerate, data, caching, LoRA, checkpoints, validation, output.

A script supplies a :class:`~.task.ModelTask` (:mod:`.families`: ``UNetTask`` for SD 1.x/2.x/SDXL, ``FlowTask`` for
SD3/Flux): how to load the base pipeline, encode images and captions, call its denoiser on a batch, which
objective the flags ask for (:mod:`.objectives`: it computes each batch's loss from the task's ``predict``), and
which scheduler and LoRA formats the output folder ships. The loop knows no model family and no objective.
Everything else -- the accelerator, dataset, bucketing, the encodings cache, optimizer and LR schedule, DDP, EMA,
resume, atomic checkpoints, NaN/Inf-loss skipping, tensorboard, validation grids, model card and Hub upload --
lives here once: :func:`train` runs the set-up stages of :mod:`.stages` in order, then the epochs (each optimizer
step through :class:`.step.OptimizerStep`), then the summary and the export.

Determinism: the data order of epoch ``e`` and the noise/timesteps of optimizer step ``s`` are functions of
``(seed, e)`` and ``(seed, s, micro-step within s, rank)`` only, so ``--resume_from_checkpoint latest`` continues
the exact run that an uninterrupted one would have made (bitwise on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpointing import CheckpointWriteError, save_checkpoint
from .distributed import ProcessGroupKeeper, check_supported, run_keeping_process_group
from .full import trained_state
from .history import write_summary
from .identity import lock_folder, prepare_output_dir
from .inputs import check_device_precision, check_inputs
from .objectives.audit import report_weight_audit
from .output import finish, validate
from .prior import load_class_set
from .stages import (
    WEIGHT_DTYPES,
    TrainingState,
    build_data,
    build_optimizer,
    load_training_set,
    prepare_models,
    prepare_training,
    record_identity,
    resume,
    start_trackers,
)
from .step import (
    NonFiniteLossError,
    OptimizerStep,
    last_checkpoint_note,
    non_finite_loss_error,
    non_finite_weights_error,
    read_step_health,
    step_generator,
)
from .stream_flags import is_streaming
from .task import ModelTask

if TYPE_CHECKING:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

__all__ = [
    "WEIGHT_DTYPES",
    "ModelTask",
    "NonFiniteLossError",
    "last_checkpoint_note",
    "non_finite_loss_error",
    "non_finite_weights_error",
    "read_step_health",
    "step_generator",
    "train",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)


def train(args: argparse.Namespace, make_task: Callable[[argparse.Namespace], ModelTask]) -> dict[str, Any]:
    """Run the training described by ``args``; ``make_task(args)`` loads the :class:`ModelTask`.

    Returns ``global_step``, this launch's per-step ``losses``, ``rank_checksums`` (one LoRA checksum per process),
    ``cache`` statistics, ``skipped_steps`` (NaN/Inf losses) and the output paths. The main process holds the
    ``--output_dir`` lock (:func:`identity.lock_folder`) from before the first check to the end of the run.
    """
    return run_keeping_process_group(lambda keeper: train_stages(args, make_task, keeper))


def train_stages(args: argparse.Namespace, make_task: Callable[[argparse.Namespace], ModelTask],
                 keeper: ProcessGroupKeeper) -> dict[str, Any]:
    """:func:`train`'s stages; ``keeper`` holds the process group until this frame (and the DDP wrapper) is gone."""
    from accelerate.utils import set_seed

    check_device_precision(args)
    check_inputs(args, make_task)  # before the lock: a run refused here leaves nothing in --output_dir
    accelerator = build_accelerator(args)
    keeper.keep()
    check_supported(accelerator)  # FSDP / DeepSpeed: one line now, not a hang at the first checkpoint
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(lock_folder(Path(args.output_dir)))
            prepare_output_dir(args)
        accelerator.wait_for_everyone()
        set_seed(args.seed)
        models = prepare_models(args, make_task, accelerator)
        if accelerator.is_main_process:
            report_weight_audit(models.objective, args, accelerator.print)
        image_set = load_training_set(args)
        class_set = load_class_set(args, accelerator, models.task)  # prior preservation: generated if missing
        base_model, resume_path = record_identity(args, accelerator, image_set, class_set)
        data = build_data(args, accelerator, models, image_set, base_model, class_set)
        params = [p for m in models.trained for p in m.parameters() if p.requires_grad]
        optimizer = build_optimizer(args, params)
        state = prepare_training(args, accelerator, models, data, params, optimizer)
        resume(state, resume_path)
        start_trackers(args, accelerator)
        run_epochs(state)
        return finish_run(state)


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's ``Accelerator``: gradient accumulation, mixed precision, trackers logging under the output folder,
    and a seedable sampler (the data order is a function of seed and epoch)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    output_dir = Path(args.output_dir)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def run_epochs(state: TrainingState) -> None:
    """Train from ``state.global_step`` to ``state.max_steps``; a resumed run skips the batches of its first epoch
    that the checkpointed run had already trained on."""
    from tqdm.auto import tqdm

    accelerator, data = state.accelerator, state.data
    progress = tqdm(range(state.max_steps), initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    stepper = OptimizerStep(state.parts, state.args, state.counters)
    for epoch in range(state.first_epoch, state.num_epochs):
        data.dataloader.set_epoch(epoch)
        if data.sampler is not None:
            data.sampler.set_epoch(epoch)  # under DDP accelerate only sets the dataset's epoch
        active = accelerator.skip_first_batches(data.dataloader, state.skip_batches) \
            if epoch == state.first_epoch and state.skip_batches else data.dataloader
        for batch in active:
            if state.global_step >= state.max_steps:
                break
            stepper.micro_step(batch, state.global_step)
            if accelerator.sync_gradients:
                loss_value, loss_by_noise = stepper.end_step(state.global_step)
                state.global_step += 1
                after_step(state, stepper, progress, loss_value, loss_by_noise)
        state.skip_batches = 0
        if state.global_step >= state.max_steps:
            break
    progress.close()


def after_step(state: TrainingState, stepper: OptimizerStep, progress: tqdm, loss_value: float,
               loss_by_noise: dict[str, float]) -> None:
    """Record and log the step's loss (and, per tenth of the noise range, :mod:`.loss_bins`); write a checkpoint
    every ``--checkpointing_steps`` (and at the last step) and validation images every ``--validation_steps``, each
    after checking that the step's update left finite weights."""
    args, accelerator, step = state.args, state.accelerator, state.global_step
    progress.update(1)
    state.history.append(loss_value)
    lr = state.parts.lr_scheduler.get_last_lr()[0]
    accelerator.log({"loss": loss_value, "lr": lr, **loss_by_noise}, step=step)
    progress.set_postfix(loss=f"{loss_value:.4f}")
    checkpoint = step % args.checkpointing_steps == 0 or step == state.max_steps
    validation = bool(args.validation_prompt) and step % args.validation_steps == 0 and step < state.max_steps
    if checkpoint or validation:
        stepper.check_weights(step - 1)
    if checkpoint:
        if is_streaming(args):  # every rank's stream position goes into the checkpoint (a collective call)
            state.data.dataloader.gather(accelerator)
        write_checkpoint(accelerator, state.output_dir, step, args.checkpoints_total_limit)
    if validation:
        with state.data.parking.on_device():
            validate(args, accelerator, state.models.task, step)


def finish_run(state: TrainingState) -> dict[str, Any]:
    """Swap in the EMA weights, checksum the trained weights on every rank, and (main process) write the summary
    and export the LoRA; returns :func:`train`'s result."""
    accelerator, params, ema = state.accelerator, state.parts.params, state.parts.ema
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # what is saved (and validated) is the averaged LoRA
    # one checksum of the trained weights per process: equal on every rank after a correct DDP run
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in params)], dtype=torch.float64,
                            device=accelerator.device)
    rank_checksums = accelerator.gather(checksum).tolist()
    counters = state.counters
    result: dict[str, Any] = {"global_step": state.global_step, "losses": state.history.launch_losses,
                              "output_dir": state.output_dir, "rank_checksums": rank_checksums,
                              "cache": state.data.cache_stats, "skipped_steps": counters["skipped_steps"]}
    if accelerator.is_main_process:
        write_summary(state.output_dir, state.history, result, state.data.image_set.report)
        task = state.models.task
        full = state.args.full_finetune
        states = {task.denoiser_name: trained_state(accelerator.unwrap_model(state.models.denoiser), full)}
        states.update({name: trained_state(te, full) for name, te in state.models.trained_text_encoders.items()})
        with state.data.parking.on_device():
            result.update(finish(state.args, accelerator, task, state.global_step, states))
        if counters["skipped_steps"]:
            logger.warning("%d optimizer steps were skipped for a NaN/Inf loss", counters["skipped_steps"])
    accelerator.wait_for_everyone()  # no rank leaves (and tears down the process group) while rank 0 writes
    accelerator.end_training()
    return result


def write_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None) -> None:
    """Rank 0 writes ``checkpoint-step``; every rank learns whether it worked.

    A failed write (disk full, ...) raises :class:`CheckpointWriteError` on rank 0 and a ``RuntimeError`` naming it
    on every other rank. (torchrun stops a node's other workers when one fails, but ranks on other nodes would
    otherwise wait in their next collective call until the process-group timeout.)
    """
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        try:
            save_checkpoint(output_dir, step, accelerator.save_state, total_limit)
        except CheckpointWriteError as caught:
            error = caught
    failed = torch.tensor([1.0 if error is not None else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")  # collective: also the barrier after the write
    if error is not None:
        raise error
    if float(failed.item()) > 0:
        raise RuntimeError(f"rank 0 could not write checkpoint-{step} (see its CheckpointWriteError); this rank "
                           "stops too. The previous checkpoint is intact: free space and resume with "
                           "--resume_from_checkpoint latest.")
