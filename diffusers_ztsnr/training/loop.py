"""The training loop both scripts share: accelerate, data, caching, LoRA, checkpoints, validation, output.

A script supplies a :class:`ModelTask` (``unet.UNetTask`` for SD 1.x/2.x/SDXL, ``flow.FlowTask`` for SD3/Flux):
how to load the base pipeline, encode images and captions, compute one batch's loss, and which scheduler and
LoRA formats the output folder ships. Everything else -- the accelerator, dataset, bucketing, the encodings
cache, optimizer and LR schedule, DDP, EMA, resume, atomic checkpoints, NaN/Inf-loss skipping, tensorboard,
validation grids, model card and Hub upload -- lives here once.

Determinism: the data order of epoch ``e`` and the noise/timesteps of optimizer step ``s`` are functions of
``(seed, e)`` and ``(seed, s, micro-step, rank)`` only, so ``--resume_from_checkpoint latest`` continues the
exact run that an uninterrupted one would have made (bitwise on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .checkpointing import (
    CheckpointWriteError,
    checkpoint_step,
    intact_checkpoints,
    load_ema_state,
    load_tensor_state,
    resolve_resume_checkpoint,
    save_checkpoint,
    save_ema_state,
    save_tensor_state,
)
from .history import LossHistory, write_summary
from .identity import lock_folder, model_fingerprint, prepare_output_dir, record_run, recorded_args, training_flags
from .inputs import check_device_precision, check_inputs
from .log_filters import install_long_message_filter
from .lora import add_lora, load_lora_state_dict, lora_state_dict
from .output import NonFiniteWeightsError, check_finite_states, finish, nonfinite_weights, validate
from .task import ModelTask

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Raised after too many optimizer steps in a row had a NaN/Inf loss."""


# --- helpers ------------------------------------------------------------------------------------------


def read_step_health(accelerator, loss: torch.Tensor, weights_bad: torch.Tensor) -> tuple[float, bool]:
    """One host sync per optimizer step: the loss averaged over processes, and whether any process holds
    non-finite trainable weights."""
    health = torch.stack([loss.detach().float().reshape(()), weights_bad.float().reshape(())])[None]
    gathered = accelerator.gather(health).cpu()
    return float(gathered[:, 0].mean()), bool(gathered[:, 1].max() > 0)


def non_finite_loss_error(in_a_row: int, step: int, output_dir: Path) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{in_a_row} optimizer steps in a row had a NaN/Inf loss (stopped at step {step}; "
        f"{last_checkpoint_note(output_dir)}). Likely causes: fp16 overflow (use --mixed_precision bf16 or no), a "
        "learning rate too high (lower --learning_rate), an epsilon target at SNR 0 (use v_prediction with "
        "--zero_terminal_snr), or a bad image/latent in the data. Raise --max_consecutive_bad_losses to tolerate more."
    )


def non_finite_weights_error(step: int, output_dir: Path) -> NonFiniteWeightsError:
    return NonFiniteWeightsError(
        f"step {step}: the trainable weights became NaN/Inf after a finite loss (a learning rate too high for this "
        f"model, or an fp16 overflow); they were neither checkpointed nor exported, and "
        f"{last_checkpoint_note(output_dir)}. Lower --learning_rate (resuming then needs --resume_despite_changes) "
        "or use --mixed_precision bf16."
    )


def last_checkpoint_note(output_dir: Path) -> str:
    """Which checkpoint a resume would take (checkpoints are only ever written with finite weights)."""
    intact = intact_checkpoints(output_dir, deep=False, warn=False)
    if not intact:
        return "no checkpoint was written yet"
    return f"the last checkpoint, {intact[-1].name}, holds finite weights (--resume_from_checkpoint latest)"


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """One independent stream per (optimizer step, micro-step, rank): resume-exact by construction."""
    mixed = (seed * 1_000_003 + step) * 1_009 + micro * 131 + rank
    return torch.Generator().manual_seed(mixed % (2**63))


# --- the loop -----------------------------------------------------------------------------------------


def train(args: argparse.Namespace, make_task) -> dict[str, Any]:
    """Run the training described by ``args``; ``make_task(args)`` loads the :class:`ModelTask`.

    Returns ``global_step``, this launch's per-step ``losses``, ``rank_checksums`` (one LoRA checksum per process),
    ``cache`` statistics, ``skipped_steps`` (NaN/Inf losses) and the output paths. The main process holds the
    ``--output_dir`` lock (:func:`identity.lock_folder`) from before the first check to the end of the run.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    output_dir = Path(args.output_dir)
    check_device_precision(args)
    check_inputs(args, make_task)  # before the lock: a run refused here leaves nothing in --output_dir
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(lock_folder(output_dir))
            prepare_output_dir(args)
        accelerator.wait_for_everyone()
        return _train(args, make_task, accelerator)


def _train(args: argparse.Namespace, make_task, accelerator) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    from .data import (
        BucketBatchSampler,
        ImageCaptionDataset,
        cache_image_encodings,
        collate_fn,
        load_image_caption_dataset,
        make_buckets,
    )

    output_dir = Path(args.output_dir)
    set_seed(args.seed)

    task: ModelTask = make_task(args)
    install_long_message_filter()  # a long caption in a truncation warning is shortened, not printed whole
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    denoiser, vae, text_encoders = task.denoiser, task.vae, task.text_encoders
    vae.requires_grad_(False)
    for te in text_encoders:
        te.requires_grad_(False)
    task.add_adapters(args)
    trained_tes = dict(task.trainable_text_encoders) if args.train_text_encoder else {}
    for te in trained_tes.values():
        add_lora(te, args.rank, args.lora_alpha, task.text_encoder_targets)
    denoiser.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    for te in text_encoders:
        te.to(accelerator.device, dtype=weight_dtype)
    trained = [denoiser, *trained_tes.values()]
    cast_training_params(trained, dtype=torch.float32)  # LoRA weights in fp32 whatever the base dtype
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()

    dataset = load_image_caption_dataset(
        train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, image_column=args.image_column,
        caption_column=args.caption_column, cache_dir=args.cache_dir, follow_symlinks=args.follow_symlinks,
    )
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    buckets = make_buckets(args.resolution, step=64 if args.resolution >= 256 else 8) if args.bucketing else None
    train_set = ImageCaptionDataset(dataset, resolution=args.resolution, center_crop=args.center_crop,
                                    random_flip=args.random_flip, image_column=args.image_column,
                                    caption_column=args.caption_column, seed=args.seed, buckets=buckets)
    image_set = train_set
    base_model = model_fingerprint(args.pretrained_model_name_or_path, args.revision)
    # verified once here (its files are hashed), then recorded and loaded
    resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint) \
        if args.resume_from_checkpoint else None
    if accelerator.is_main_process:
        record_run(args, {"flags": training_flags(args), "base_model": base_model, "data": train_set.fingerprint()},
                   checkpoint_step(resume_path) if resume_path else 0)
    cache_stats = None
    if args.cache_latents:
        cache_dir = Path(args.cache_latents_dir or Path(args.cache_dir or "~/.cache/diffusers-ztsnr").expanduser()
                         / "encodings")

        @torch.no_grad()
        def encode(batch):
            cond = task.encode_prompts(batch["caption"], accelerator.device)
            latents = task.encode_images(batch["pixel_values"].to(accelerator.device))
            return {"latents": latents.float().cpu(), **{k: v.float().cpu() for k, v in cond.items()}}

        # keyed on the weights' digest too: a model re-saved at the same path is a miss, never stale encodings
        key = {**task.cache_key(args, weight_dtype), "weights": base_model.get("digest")}
        with accelerator.main_process_first(), contextlib.ExitStack() as cache_lock:
            if accelerator.is_main_process:  # another run building the same cache: wait for it
                cache_lock.enter_context(lock_folder(cache_dir, "--cache_latents_dir", blocking=True))
            train_set = cache_image_encodings(train_set, cache_dir, key, encode, batch_size=args.train_batch_size)
        cache_stats = {"hits": train_set.cache.hits, "misses": train_set.cache.misses}
        accelerator.print(f"encodings cache in {cache_dir}: {cache_stats['hits']} hits, {cache_stats['misses']} misses")
    if buckets is not None:
        sampler = BucketBatchSampler(train_set.sizes, train_set.buckets, args.train_batch_size, seed=args.seed)
        dataloader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                                 num_workers=args.dataloader_num_workers)
    else:
        dataloader = torch.utils.data.DataLoader(
            train_set, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers, drop_last=False,
        )

    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer_class = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install 'diffusers-ztsnr[8bit]'") from error
        optimizer_class = bnb.optim.AdamW8bit
    optimizer = optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    dataloader = accelerator.prepare(dataloader)  # first: its length per process sets the step counts
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)

    # only the denoiser is wrapped for DDP: the text encoders run inside the pipeline's encode_prompt (which
    # needs the bare module), so their LoRA gradients are averaged across processes by hand below
    model, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    te_params = [p for te in trained[1:] for p in te.parameters() if p.requires_grad]

    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay)
    counters = {"skipped_steps": 0, "consecutive_bad": 0}
    history = LossHistory()  # every step's loss since step 0, restored from the checkpoint on resume

    # checkpoints hold the LoRA weights (and their EMA) only, not a copy of the frozen base model
    def save_hook(models, weights, folder):
        for i, module in enumerate(trained):
            save_tensor_state(Path(folder) / f"lora_{i}.safetensors", lora_state_dict(module))
        if ema is not None:
            save_ema_state(Path(folder) / "ema.safetensors", ema.state_dict())
        (Path(folder) / "counters.json").write_text(json.dumps(counters))
        history.save(Path(folder))
        weights.clear()

    def load_hook(models, folder):
        states = {f"lora_{i}": load_tensor_state(Path(folder) / f"lora_{i}.safetensors")[0]
                  for i in range(len(trained))}
        check_finite_states(states, f"resume from {folder}")
        for i, module in enumerate(trained):
            load_lora_state_dict(module, states[f"lora_{i}"])
        if ema is not None:
            ema.load_state_dict(load_ema_state(Path(folder) / "ema.safetensors"))
        if (Path(folder) / "counters.json").is_file():
            counters.update(json.loads((Path(folder) / "counters.json").read_text()))
        history.load(Path(folder), checkpoint_step(Path(folder)))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = checkpoint_step(resume_path)
        first_epoch = global_step // updates_per_epoch
        skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    if accelerator.is_main_process and accelerator.trackers == [] and args.report_to != "none":
        accelerator.init_trackers("diffusers-ztsnr", config={k: v for k, v in recorded_args(args).items()
                                                             if isinstance(v, (int, float, str, bool))})
    progress = tqdm(range(max_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    micro = 0
    step_finite, bad_loss = True, None  # over all micro-steps of one optimizer step (gradient accumulation)
    weights_bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        if buckets is not None:
            sampler.set_epoch(epoch)  # under DDP accelerate only sets the dataset's epoch
        active = accelerator.skip_first_batches(dataloader, skip_batches) if epoch == first_epoch else dataloader
        for batch in active:
            if global_step >= max_steps:
                break
            with accelerator.accumulate(model):
                gen = step_generator(args.seed, global_step, micro, accelerator.process_index)
                micro = (micro + 1) % args.gradient_accumulation_steps
                if "latents" in batch:  # cached encodings
                    latents = batch["latents"].to(accelerator.device)
                    cond = {k: batch[k].to(accelerator.device) for k in task.cond_keys if k in batch}
                else:
                    with torch.no_grad():
                        latents = task.encode_images(batch["pixel_values"].to(accelerator.device)).float()
                    with torch.set_grad_enabled(bool(trained_tes)):
                        cond = task.encode_prompts(batch["caption"], accelerator.device)
                loss = task.loss(model, latents, cond, batch, gen, weight_dtype)
                # a NaN/Inf loss on any rank skips the optimizer step on every rank (same decision everywhere)
                finite = torch.isfinite(loss.detach()).float().reshape(1)
                all_finite = bool(accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes)
                if not all_finite and step_finite:
                    step_finite, bad_loss = False, loss.item()
                accelerator.backward(loss if all_finite else loss * 0.0)
                # one bad micro-step spoils the accumulated gradient (0 * NaN is NaN): skip the whole update
                if accelerator.sync_gradients and step_finite:
                    if te_params and accelerator.num_processes > 1:
                        for p in te_params:
                            if p.grad is not None:
                                torch.distributed.all_reduce(p.grad)
                                p.grad /= accelerator.num_processes
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                if step_finite:
                    optimizer.step()
                    lr_scheduler.step()
                    if accelerator.sync_gradients:  # a flag on the device, read with the loss below
                        weights_bad = nonfinite_weights(params)
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                loss_value, weights_bad_anywhere = read_step_health(accelerator, loss, weights_bad)
                if weights_bad_anywhere:
                    raise non_finite_weights_error(global_step + 1, output_dir)
                if not step_finite:
                    step_finite = True
                    counters["skipped_steps"] += 1
                    counters["consecutive_bad"] += 1
                    accelerator.print(f"step {global_step + 1}: non-finite loss ({bad_loss}), update skipped "
                                      f"({counters['consecutive_bad']} in a row)")
                    if counters["consecutive_bad"] >= args.max_consecutive_bad_losses:
                        raise non_finite_loss_error(counters["consecutive_bad"], global_step + 1, output_dir)
                else:
                    counters["consecutive_bad"] = 0
                    if ema is not None:
                        ema.step(params)
                global_step += 1
                progress.update(1)
                history.append(loss_value)
                accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                progress.set_postfix(loss=f"{loss_value:.4f}")
                if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                    write_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                if args.validation_prompt and global_step % args.validation_steps == 0 and global_step < max_steps:
                    validate(args, accelerator, task, global_step)
        skip_batches = 0
        if global_step >= max_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # what is saved (and validated below) is the averaged LoRA
    # one checksum of the trained weights per process: equal on every rank after a correct DDP run
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in params)], dtype=torch.float64,
                            device=accelerator.device)
    rank_checksums = accelerator.gather(checksum).tolist()
    result: dict[str, Any] = {"global_step": global_step, "losses": history.launch_losses, "output_dir": output_dir,
                              "rank_checksums": rank_checksums, "cache": cache_stats,
                              "skipped_steps": counters["skipped_steps"]}
    if accelerator.is_main_process:
        write_summary(output_dir, history, result, image_set.report)
        states = {task.denoiser_name: lora_state_dict(accelerator.unwrap_model(denoiser))}
        states.update({name: lora_state_dict(te) for name, te in trained_tes.items()})
        result.update(finish(args, accelerator, task, global_step, states))
        if counters["skipped_steps"]:
            logger.warning("%d optimizer steps were skipped for a NaN/Inf loss", counters["skipped_steps"])
    accelerator.wait_for_everyone()  # no rank leaves (and tears down the process group) while rank 0 writes
    accelerator.end_training()
    return result


def write_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> None:
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
