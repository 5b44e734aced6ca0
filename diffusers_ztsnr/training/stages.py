"""The set-up stages of a training run, in the order the loop runs them: models, data, optimizer, accelerate.

Each stage returns what the next ones need (:class:`Models`, :class:`TrainingData`, :class:`TrainingState`); nothing
is kept in module globals. The order of the stages is part of the run's determinism: the dataloader is prepared
before the model (its per-process length sets the step counts), and no stage draws from the global RNG out of turn.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpointing import (
    checkpoint_step,
    load_ema_state,
    load_tensor_state,
    resolve_resume_checkpoint,
    save_ema_state,
    save_tensor_state,
)
from .data_flags import load_repeated_datasets, uses_masks
from .full import checkpoint_file, load_trained_state, trained_state
from .history import LossHistory
from .identity import lock_folder, model_fingerprint, record_run, recorded_args, training_flags
from .log_filters import install_long_message_filter
from .lora import add_lora
from .output import check_finite_states
from .prior import with_class_items
from .quantization import quantize_base
from .speed import EncoderParking, compile_denoiser, dataloader_options, optimizer_options
from .step import StepParts
from .stream_flags import is_streaming, load_stream, load_stream_state, save_stream_state, stream_loader
from .task import ModelTask, Objective

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .data import BucketBatchSampler, ImageCaptionDataset

#: the frozen base weights' dtype under each ``--mixed_precision`` (fp32 otherwise); LoRA weights stay fp32
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Models:
    """The task's modules: frozen, with LoRA adapters added, placed on the device."""

    task: ModelTask
    #: the loss the flags ask for, on the task's schedule (``predict`` comes from the task)
    objective: Objective
    #: the denoiser LoRA is trained on, unwrapped (``accelerator.prepare`` may wrap it for DDP later)
    denoiser: torch.nn.Module
    weight_dtype: torch.dtype
    #: ``{component name: module}`` given LoRA by ``--train_text_encoder`` (empty without it)
    trained_text_encoders: dict[str, torch.nn.Module]

    @property
    def trained(self) -> list[torch.nn.Module]:
        """The modules with trainable parameters, the denoiser first (the checkpoint's ``lora_{i}`` order)."""
        return [self.denoiser, *self.trained_text_encoders.values()]


def prepare_models(args: argparse.Namespace, make_task: Callable[[argparse.Namespace], ModelTask],
                   accelerator: Accelerator) -> Models:
    """Load the task; freeze the VAE and text encoders; add LoRA; place everything on the device in the weight dtype
    (the VAE in fp32 under fp16, where it overflows), with the LoRA parameters in fp32."""
    from diffusers.training_utils import cast_training_params

    task = make_task(args)
    objective = task.build_objective(args)
    install_long_message_filter()  # a long caption in a truncation warning is shortened, not printed whole
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    denoiser, vae, text_encoders = task.denoiser, task.vae, task.text_encoders
    vae.requires_grad_(False)
    for te in text_encoders:
        te.requires_grad_(False)
    if args.base_quantization != "none":  # layer by layer onto the device, before peft wraps the layers
        denoiser.to(dtype=weight_dtype)
        count = quantize_base(denoiser, args.base_quantization, weight_dtype, accelerator.device)
        accelerator.print(f"--base_quantization {args.base_quantization}: {count} linear layers of "
                          f"{type(denoiser).__name__} quantized")
    if args.full_finetune:
        denoiser.requires_grad_(True)
    else:
        with warnings.catch_warnings():  # peft: merging LoRA into a torchao base is unsupported; training never merges
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            task.add_adapters(args)
    trained_tes = dict(task.trainable_text_encoders) if args.train_text_encoder else {}
    for te in trained_tes.values():
        add_lora(te, args.rank, args.lora_alpha, task.text_encoder_targets, adapter=args.adapter)
    # a full fine-tune trains every weight in fp32: never round the base through the autocast dtype first
    denoiser.to(accelerator.device, dtype=torch.float32 if args.full_finetune else weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    for te in text_encoders:
        te.to(accelerator.device, dtype=weight_dtype)
    models = Models(task, objective, denoiser, weight_dtype, trained_tes)
    cast_training_params(models.trained, dtype=torch.float32)  # trained weights in fp32 whatever the base dtype
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    compiled = compile_denoiser(denoiser, args.torch_compile)
    if compiled:
        accelerator.print(f"--torch_compile {args.torch_compile}: {compiled} module(s) of {type(denoiser).__name__} "
                          "compile on their first call")
    return models


def load_training_set(args: argparse.Namespace) -> ImageCaptionDataset:
    """The image-caption dataset of ``--train_data_dir``/``--dataset_name``, bucketed by aspect ratio under
    ``--bucketing``."""
    from .data import ImageCaptionDataset, load_image_caption_dataset, make_buckets

    if args.datasets is not None:  # several datasets, each repeated (a --config ``datasets:`` list)
        return load_repeated_datasets(args)
    if is_streaming(args):  # tar shards or a datasets stream, read as training goes (stream_flags)
        return load_stream(args)
    dataset = load_image_caption_dataset(
        train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, image_column=args.image_column,
        caption_column=args.caption_column, cache_dir=args.cache_dir, follow_symlinks=args.follow_symlinks,
    )
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    buckets = make_buckets(args.resolution, step=64 if args.resolution >= 256 else 8) if args.bucketing else None
    if getattr(args, "cond_image_column", None):  # image editing (FLUX.1 Kontext): a reference beside each target
        from .data.reference import ReferenceImageDataset

        return ReferenceImageDataset(dataset, cond_image_column=args.cond_image_column, data_dir=args.train_data_dir,
                                     resolution=args.resolution, center_crop=args.center_crop,
                                     random_flip=args.random_flip, image_column=args.image_column,
                                     caption_column=args.caption_column, seed=args.seed, buckets=buckets,
                                     masks=uses_masks(args), mask_column=args.mask_column)
    return ImageCaptionDataset(dataset, resolution=args.resolution, center_crop=args.center_crop,
                               random_flip=args.random_flip, image_column=args.image_column,
                               caption_column=args.caption_column, seed=args.seed, buckets=buckets,
                               masks=uses_masks(args), mask_column=args.mask_column)


def record_identity(args: argparse.Namespace, accelerator: Accelerator, image_set: ImageCaptionDataset,
                    class_set: ImageCaptionDataset | None = None) -> tuple[dict, Path | None]:
    """Fingerprint the base model (its files are hashed once, here), resolve the checkpoint to resume from, and
    record both with the data's fingerprint (and the class images', under prior preservation) in the output folder
    (main process). Returns the model fingerprint and the resume checkpoint (``None`` for a fresh run)."""
    output_dir = Path(args.output_dir)
    base_model = model_fingerprint(args.pretrained_model_name_or_path, args.revision)
    resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint) \
        if args.resume_from_checkpoint else None
    if accelerator.is_main_process:
        data = image_set.fingerprint() if class_set is None else f"{image_set.fingerprint()}+{class_set.fingerprint()}"
        record_run(args, {"flags": training_flags(args), "base_model": base_model, "data": data},
                   checkpoint_step(resume_path) if resume_path else 0)
    return base_model, resume_path


@dataclass
class TrainingData:
    """What the epochs iterate, and what the run reports about its data."""

    #: the decoded-image dataset (its report goes into the run summary)
    image_set: ImageCaptionDataset
    #: the dataloader over ``image_set`` or its cached encodings (prepared by accelerate in ``prepare_training``)
    dataloader: Any
    #: the aspect-ratio bucket sampler under ``--bucketing``, else ``None``
    sampler: BucketBatchSampler | None
    #: the encodings cache's ``hits``/``misses`` under ``--cache_latents``, else ``None``
    cache_stats: dict[str, int] | None
    #: the frozen encoders, parked off the GPU once a cached run has encoded what it needs (the empty prompt)
    parking: EncoderParking


@torch.no_grad()
def encode_for_cache(task: ModelTask, device: torch.device, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A batch's latents and prompt encodings as the encodings cache stores them (fp32, on the CPU); a batch with
    reference images (``--cond_image_column``) also their latents, ``cond_latents``."""
    cond = task.encode_prompts(batch["caption"], device)
    latents = task.encode_images(batch["pixel_values"].to(device))
    out = {"latents": latents.float().cpu(), **{k: v.float().cpu() for k, v in cond.items()}}
    if "cond_pixel_values" in batch:
        out["cond_latents"] = task.encode_images(batch["cond_pixel_values"].to(device)).float().cpu()
    return out


def build_data(args: argparse.Namespace, accelerator: Accelerator, models: Models, image_set: ImageCaptionDataset,
               base_model: dict, class_set: ImageCaptionDataset | None = None) -> TrainingData:
    """Under ``--cache_latents`` swap the images (and ``class_set``'s) for their cached encodings (computed on a
    miss); under prior preservation pair each item with a class item; then the dataloader: bucketed batches under
    ``--bucketing``, else shuffled ones."""
    from .data import BucketBatchSampler, collate_fn

    train_set, cache_stats = image_set, None
    parking = EncoderParking([models.task.vae, *models.task.text_encoders], accelerator.device)
    if is_streaming(args):  # the stream batches (and buckets) itself
        return TrainingData(image_set, stream_loader(args, image_set, dataloader_options(args, accelerator.device)),
                            None, None, parking)
    if args.cache_latents:
        train_set, cache_stats = cached_encodings(args, accelerator, models, image_set, base_model)
        if class_set is not None:
            class_set = cached_encodings(args, accelerator, models, class_set, base_model)[0]
        parking.park()  # every batch now carries its encodings
    if class_set is not None:
        train_set = with_class_items(train_set, class_set)
    collate_fn = getattr(train_set, "collate", collate_fn)
    sampler = None
    loader_options = dataloader_options(args, accelerator.device)
    targets = getattr(train_set, "targets", None)  # several datasets: each item's training size
    if args.bucketing or (targets is not None and len(set(targets)) > 1):
        sampler = BucketBatchSampler(train_set.sizes, train_set.buckets, args.train_batch_size, seed=args.seed,
                                     targets=targets)
        dataloader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn,
                                                 **loader_options)
    else:
        dataloader = torch.utils.data.DataLoader(train_set, batch_size=args.train_batch_size, shuffle=True,
                                                 collate_fn=collate_fn, drop_last=False, **loader_options)
    return TrainingData(image_set, dataloader, sampler, cache_stats, parking)


def cached_encodings(args: argparse.Namespace, accelerator: Accelerator, models: Models,
                     image_set: ImageCaptionDataset, base_model: dict) -> tuple[Any, dict[str, int]]:
    """The dataset of ``image_set``'s cached encodings (the main process fills the cache first, under its lock)
    and the cache's hit/miss counts."""
    from .data import cache_image_encodings

    parts = getattr(image_set, "parts", None)
    if parts is not None:  # several datasets: each cached on its own
        cached = [cached_encodings(args, accelerator, models, part, base_model) for part in parts]
        return image_set.with_parts([c[0] for c in cached]), {k: sum(c[1][k] for c in cached) for k in cached[0][1]}
    task = models.task
    cache_dir = Path(args.cache_latents_dir or Path(args.cache_dir or "~/.cache/diffusers-ztsnr").expanduser()
                     / "encodings")
    encode = functools.partial(encode_for_cache, task, accelerator.device)
    # keyed on the weights' digest too: a model re-saved at the same path is a miss, never stale encodings
    key = {**task.cache_key(args, models.weight_dtype), "weights": base_model.get("digest")}
    with accelerator.main_process_first(), contextlib.ExitStack() as cache_lock:
        if accelerator.is_main_process:  # another run building the same cache: wait for it
            cache_lock.enter_context(lock_folder(cache_dir, "--cache_latents_dir", blocking=True))
        train_set = cache_image_encodings(image_set, cache_dir, key, encode, batch_size=args.train_batch_size)
    cache_stats = {"hits": train_set.cache.hits, "misses": train_set.cache.misses}
    accelerator.print(f"encodings cache in {cache_dir}: {cache_stats['hits']} hits, {cache_stats['misses']} misses")
    return train_set, cache_stats


def build_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, fused on a GPU (bitsandbytes' 8-bit AdamW under ``--use_8bit_adam``)."""
    optimizer_class, options = torch.optim.AdamW, optimizer_options(params)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install 'diffusers-ztsnr[8bit]'") from error
        optimizer_class, options = bnb.optim.AdamW8bit, {}
    return optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **options)


@dataclass
class TrainingState:
    """A prepared run and where it stands: the loop advances ``global_step``; ``counters`` and ``history`` travel
    in every checkpoint."""

    args: argparse.Namespace
    accelerator: Accelerator
    models: Models
    data: TrainingData
    parts: StepParts
    #: optimizer steps per epoch (ceil of this process's batches over the accumulation steps)
    updates_per_epoch: int
    max_steps: int
    num_epochs: int
    #: ``skipped_steps`` (NaN/Inf losses, in total) and ``consecutive_bad`` (in a row, up to the last step)
    counters: dict[str, int] = field(default_factory=lambda: {"skipped_steps": 0, "consecutive_bad": 0})
    #: every step's loss since step 0, restored from the checkpoint on resume
    history: LossHistory = field(default_factory=LossHistory)
    global_step: int = 0
    first_epoch: int = 0
    #: batches of ``first_epoch`` a resumed run has already trained on
    skip_batches: int = 0

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


def prepare_training(args: argparse.Namespace, accelerator: Accelerator, models: Models, data: TrainingData,
                     params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> TrainingState:
    """Prepare the dataloader, then the denoiser, optimizer and LR schedule with accelerate; set up the EMA and
    the checkpoint hooks. Returns the run at step 0."""
    from diffusers.optimization import get_scheduler

    streaming = is_streaming(args)  # one endless epoch, every process reading its own shards: not prepared
    if not streaming:
        data.dataloader = accelerator.prepare(data.dataloader)  # first: its length per process sets the step counts
    updates_per_epoch = args.max_train_steps if streaming else math.ceil(len(data.dataloader) /
                                                                         args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    # only the denoiser is wrapped for DDP: the text encoders run inside the pipeline's encode_prompt (which
    # needs the bare module), so their LoRA gradients are averaged across processes by hand (step.OptimizerStep)
    model, optimizer, lr_scheduler = accelerator.prepare(models.denoiser, optimizer, lr_scheduler)
    te_params = [p for te in models.trained[1:] for p in te.parameters() if p.requires_grad]
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=args.ema_decay)
    parts = StepParts(accelerator=accelerator, task=models.task, objective=models.objective, model=model,
                      optimizer=optimizer, lr_scheduler=lr_scheduler, params=params, text_encoder_params=te_params,
                      ema=ema, weight_dtype=models.weight_dtype, parking=data.parking)
    state = TrainingState(args, accelerator, models, data, parts, updates_per_epoch, max_steps, num_epochs)
    hooks = CheckpointHooks(models.trained, ema, state.counters, state.history, full=args.full_finetune)
    hooks.stream = data.dataloader if streaming else None
    accelerator.register_save_state_pre_hook(hooks.save)
    accelerator.register_load_state_pre_hook(hooks.load)
    return state


class CheckpointHooks:
    """accelerate's save/load pre-hooks. A checkpoint holds the LoRA weights (``lora_{i}``, in ``trained`` order)
    and their EMA, the skip counters and the loss history -- not a copy of the frozen base model."""

    def __init__(self, trained: list[torch.nn.Module], ema: Any | None, counters: dict[str, int],
                 history: LossHistory, full: bool = False) -> None:
        self.trained = trained
        self.full = full  # --full_finetune: the denoiser's whole state (model_0), not LoRA states (lora_i)
        self.ema = ema
        self.counters = counters  # updated in place on load: the loop holds the same dict
        self.history = history
        self.stream: Any = None  # a streaming run's loader: its gathered positions go into each checkpoint

    def save(self, models: list, weights: list, folder: str) -> None:
        """Write this run's state into ``folder``; ``weights`` is emptied so accelerate writes no full model."""
        for i, module in enumerate(self.trained):
            save_tensor_state(Path(folder) / checkpoint_file(i, self.full), trained_state(module, self.full))
        if self.ema is not None:
            save_ema_state(Path(folder) / "ema.safetensors", self.ema.state_dict())
        (Path(folder) / "counters.json").write_text(json.dumps(self.counters))
        self.history.save(Path(folder))
        if self.stream is not None:
            save_stream_state(self.stream, folder)
        weights.clear()

    def load(self, models: list, folder: str) -> None:
        """Restore the state :meth:`save` wrote (refusing non-finite weights); ``models`` is emptied so accelerate
        loads no full model."""
        states = {f"{i}": load_tensor_state(Path(folder) / checkpoint_file(i, self.full))[0]
                  for i in range(len(self.trained))}
        check_finite_states(states, f"resume from {folder}")
        for i, module in enumerate(self.trained):
            load_trained_state(module, states[f"{i}"], self.full)
        if self.ema is not None:
            self.ema.load_state_dict(load_ema_state(Path(folder) / "ema.safetensors"))
        if (Path(folder) / "counters.json").is_file():
            self.counters.update(json.loads((Path(folder) / "counters.json").read_text()))
        self.history.load(Path(folder), checkpoint_step(Path(folder)))
        models.clear()


def resume(state: TrainingState, resume_path: Path | None) -> None:
    """Load ``resume_path`` (if any) and position the run after its step: the epoch it was in and the batches of
    that epoch already trained on."""
    if resume_path is None:
        return
    state.accelerator.print(f"resuming from {resume_path}")
    state.accelerator.load_state(str(resume_path))
    state.global_step = checkpoint_step(resume_path)
    state.first_epoch = state.global_step // state.updates_per_epoch
    state.skip_batches = (state.global_step % state.updates_per_epoch) * state.args.gradient_accumulation_steps
    if is_streaming(state.args):  # the stream starts at the recorded sample: nothing to skip
        load_stream_state(state.data.dataloader, resume_path, state.accelerator.process_index,
                          state.accelerator.num_processes)
        state.first_epoch, state.skip_batches = 0, 0


def start_trackers(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Start ``--report_to``'s tracker on the main process, with the run's scalar flags as its config."""
    if accelerator.is_main_process and accelerator.trackers == [] and args.report_to != "none":
        accelerator.init_trackers("diffusers-ztsnr", config={k: v for k, v in recorded_args(args).items()
                                                             if isinstance(v, (int, float, str, bool))})
