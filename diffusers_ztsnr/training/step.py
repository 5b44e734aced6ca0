"""One optimizer step of the shared training loop: gradient accumulation, the NaN/Inf guard, clipping, EMA.

An optimizer step is ``--gradient_accumulation_steps`` micro-steps. Each micro-step draws its noise and timesteps from
:func:`step_generator` (a function of seed, optimizer step, micro-step and rank only, so a resumed run draws what an
uninterrupted one would have) and computes its loss through :func:`batch_loss`.

A NaN/Inf loss on any rank skips the whole update on every rank (the same decision everywhere, so DDP ranks never
diverge) and is counted; ``--max_consecutive_bad_losses`` skipped steps in a row raise :class:`NonFiniteLossError`.
Trainable weights that become NaN/Inf after a finite loss raise :class:`NonFiniteWeightsError` before anything is
checkpointed, validated or exported.

Host syncs: one per optimizer step, after the last backward and before the update (:func:`read_step_health`: the
loss, whether every micro-step was finite on every rank, whether the previous update left non-finite weights, and
the loss by noise level, in one transfer). Nothing else reads a device value per step, so on a GPU the host queues
the forward and backward of a step without waiting; the weights of the last update are also checked (one more sync)
before a checkpoint, validation images or the export.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpointing import intact_checkpoints
from .data.masks import latent_mask
from .loss_bins import LossByNoise, noise_fraction
from .output import NonFiniteWeightsError, nonfinite_weights
from .prior import concat_cond, loss_parts_tags, merge_batches
from .speed import EncoderParking
from .task import ModelTask, Objective

if TYPE_CHECKING:
    from accelerate import Accelerator


class NonFiniteLossError(RuntimeError):
    """Raised after too many optimizer steps in a row had a NaN/Inf loss."""


def non_finite_loss_error(in_a_row: int, step: int, output_dir: Path) -> NonFiniteLossError:
    """The error for ``in_a_row`` skipped steps ending at optimizer step ``step`` (1-based)."""
    return NonFiniteLossError(
        f"{in_a_row} optimizer steps in a row had a NaN/Inf loss (stopped at step {step}; "
        f"{last_checkpoint_note(output_dir)}). Likely causes: fp16 overflow (use --mixed_precision bf16 or no), a "
        "learning rate too high (lower --learning_rate), an epsilon target at SNR 0 (use v_prediction with "
        "--zero_terminal_snr), or a bad image/latent in the data. Raise --max_consecutive_bad_losses to tolerate more."
    )


def non_finite_weights_error(step: int, output_dir: Path) -> NonFiniteWeightsError:
    """The error for trainable weights that became NaN/Inf at optimizer step ``step`` (1-based)."""
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


@dataclass
class StepHealth:
    """What the host learns once per optimizer step (every value pooled over processes)."""

    #: the last micro-step's loss averaged over processes (NaN/Inf for a skipped step)
    loss: float
    #: every micro-step's loss was finite on every process: the update may be applied
    finite: bool
    #: the previous update left NaN/Inf trainable weights on some process
    earlier_weights_bad: bool
    #: the loss by noise level, summed over micro-steps and processes (:meth:`LossByNoise.tags` input)
    loss_by_noise: list[float]


def read_step_health(accelerator: Accelerator, loss: torch.Tensor, finite: torch.Tensor, weights_bad: torch.Tensor,
                     loss_by_noise: torch.Tensor) -> StepHealth:
    """The optimizer step's one host sync: one gather across processes, one device-to-host copy."""
    device = loss.device
    packed = torch.cat([loss.detach().double().reshape(1), (~finite).double().reshape(1).to(device),
                        weights_bad.double().reshape(1).to(device), loss_by_noise.to(device)])
    gathered = accelerator.gather(packed[None]).cpu()
    return StepHealth(loss=float(gathered[:, 0].mean()), finite=bool(gathered[:, 1].max() == 0),
                      earlier_weights_bad=bool(gathered[:, 2].max() > 0),
                      loss_by_noise=gathered[:, 3:].sum(0).tolist())


def any_weights_bad(accelerator: Accelerator, weights_bad: torch.Tensor) -> bool:
    """Whether some process holds non-finite trainable weights (a host sync)."""
    gathered = accelerator.gather(weights_bad.float().reshape(1)).cpu()
    return bool(gathered.max() > 0)


def batch_loss(task: ModelTask, objective: Objective, model: torch.nn.Module, latents: torch.Tensor,
               cond: dict[str, torch.Tensor], batch: dict[str, Any], generator: torch.Generator,
               weight_dtype: torch.dtype, by_noise: LossByNoise | None = None) -> torch.Tensor:
    """One micro-batch's scalar loss, the mean of :func:`sample_losses`."""
    return sample_losses(task, objective, model, latents, cond, batch, generator, weight_dtype, by_noise).mean()


def sample_losses(task: ModelTask, objective: Objective, model: torch.nn.Module, latents: torch.Tensor,
                  cond: dict[str, torch.Tensor], batch: dict[str, Any], generator: torch.Generator,
                  weight_dtype: torch.dtype, by_noise: LossByNoise | None = None) -> torch.Tensor:
    """One micro-batch's per-sample losses ``[B]``: the noise is the first draw on the step's generator, the
    objective draws the rest; ``predict`` is the task's model call on the objective's path. Every loss the loop
    trains on is computed here; ``by_noise`` collects them by noise level. A batch's ``loss_mask`` (masked
    training) weighs the latent cells, averaged to their grid."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    predict = task.predictor(model, batch, weight_dtype, objective.path)
    mask = latent_mask(batch["loss_mask"], latents) if "loss_mask" in batch else None
    per_sample, times = objective(predict, latents, cond, noise, generator, loss_mask=mask)
    if by_noise is not None:
        by_noise.add(per_sample, noise_fraction(objective, times))
    return per_sample


def batch_inputs(task: ModelTask, batch: dict[str, Any], device: torch.device,
                 text_encoders_trained: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's latents and prompt encodings: read from the encodings cache when the batch holds them,
    else encoded here (the prompts with gradients when text-encoder LoRA is trained)."""
    if "latents" in batch:
        latents = batch["latents"].to(device)
        return latents, {k: batch[k].to(device) for k in task.cond_keys if k in batch}
    with torch.no_grad():
        latents = task.encode_images(batch["pixel_values"].to(device)).float()
    with torch.set_grad_enabled(text_encoders_trained):
        cond = task.encode_prompts(batch["caption"], device)
    return latents, cond


def drop_captions(cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor], probability: float,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Caption dropout: each sample's prompt encodings are replaced by the empty prompt's with ``probability``,
    so the fine-tuned model keeps the unconditional prediction classifier-free guidance subtracts (Ho & Salimans
    2022). Draws from ``generator`` only when ``probability > 0``."""
    if probability <= 0:
        return cond
    batch = next(iter(cond.values())).shape[0]
    dropped = torch.rand(batch, generator=generator) < probability
    out = {}
    for key, value in cond.items():
        mask = dropped.to(value.device).view(-1, *([1] * (value.dim() - 1)))
        out[key] = torch.where(mask, empty[key].to(value.device, value.dtype).expand_as(value), value)
    return out


@dataclass
class StepParts:
    """What an optimizer step reads and updates."""

    accelerator: Accelerator
    task: ModelTask
    objective: Objective
    #: the denoiser as ``accelerator.prepare`` returned it (DDP-wrapped under several processes)
    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    #: every trainable (LoRA) parameter, the denoiser's first
    params: list[torch.nn.Parameter]
    #: the text encoders' trainable parameters: not DDP-wrapped, so their gradients are averaged by hand
    text_encoder_params: list[torch.nn.Parameter]
    ema: Any | None
    weight_dtype: torch.dtype
    #: the frozen encoders; parked off the GPU after the first step of a cached run (:mod:`.speed`)
    parking: EncoderParking | None = None

    @property
    def text_encoders_trained(self) -> bool:
        """Text-encoder LoRA is trained: uncached prompts are encoded with gradients."""
        return bool(self.text_encoder_params)


class OptimizerStep:
    """Runs micro-steps and closes each optimizer step; ``counters`` (``skipped_steps``, ``consecutive_bad``) is
    updated in place (it is checkpointed with the weights)."""

    def __init__(self, parts: StepParts, args: argparse.Namespace, counters: dict[str, int]) -> None:
        self.parts = parts
        self.args = args
        self.counters = counters
        self.micro = 0
        device = parts.accelerator.device
        # over all micro-steps of one optimizer step: one bad micro-step spoils the accumulated gradient
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        #: set on the device by each update, read at the next step's sync (or by :meth:`check_weights`)
        self.weights_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.health: StepHealth | None = None
        self._empty_prompt: dict[str, torch.Tensor] | None = None
        #: the per-sample losses of the current optimizer step by noise level (logged by the loop)
        self.loss_by_noise = LossByNoise()
        #: prior preservation: the last micro-step's ``[loss_instance, loss_prior]`` (read at the step's sync)
        self.loss_parts: torch.Tensor | None = None
        self.loss_parts_sums: list[float] = []  # their sums over processes, read at the last sync

    def micro_step(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """Forward and backward one micro-batch of optimizer step ``step`` (0-based); on the last micro-step, the
        step's one host sync and the update (unless a loss of this step was non-finite on some rank). Returns
        the loss."""
        parts = self.parts
        accelerator = parts.accelerator
        with accelerator.accumulate(parts.model):
            generator = step_generator(self.args.seed, step, self.micro, accelerator.process_index)
            # the micro-step's index within its optimizer step; an epoch's last step may hold fewer micro-steps
            # (accelerate closes it at the end of the data), so count from 0 again at every update, as a resume does
            self.micro = 0 if accelerator.sync_gradients else self.micro + 1
            with self._encoders_on_device(needed="latents" not in batch):
                latents, cond = batch_inputs(parts.task, batch, accelerator.device, parts.text_encoders_trained)
                prior = batch_inputs(parts.task, batch["prior"], accelerator.device, parts.text_encoders_trained) \
                    if "prior" in batch else None
            cond = drop_captions(cond, self.empty_prompt(), self.args.caption_dropout, generator)
            if prior is None:
                loss = batch_loss(parts.task, parts.objective, parts.model, latents, cond, batch, generator,
                                  parts.weight_dtype, self.loss_by_noise)
            else:
                loss = self._prior_loss(batch, latents, cond, prior, generator)
            self.finite = self.finite & torch.isfinite(loss.detach())
            # a non-finite loss still runs its backward (DDP ranks must all reach the gradient all-reduce); the
            # update that its NaN gradients would spoil is skipped below on every rank
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                self._close(loss, step)
        return loss

    def _prior_loss(self, batch: dict[str, Any], latents: torch.Tensor, cond: dict[str, torch.Tensor],
                    prior: tuple[torch.Tensor, dict[str, torch.Tensor]], generator: torch.Generator) -> torch.Tensor:
        """Prior preservation: ``loss_instance + --prior_loss_weight * loss_prior``, the two means of the instance
        and the class items; one forward pass over both when their latents stack (diffusers' way), else two (an
        aspect-ratio bucket beside square class images). Keeps both terms for the step's log."""
        parts, (prior_latents, prior_cond), n = self.parts, prior, len(latents)
        run = functools.partial(sample_losses, parts.task, parts.objective, parts.model, generator=generator,
                                weight_dtype=parts.weight_dtype, by_noise=self.loss_by_noise)
        if prior_latents.shape[1:] == latents.shape[1:]:
            per_sample = run(torch.cat([latents, prior_latents]), concat_cond(cond, prior_cond),
                             merge_batches(batch, batch["prior"]))
            instance, prior_loss = per_sample[:n].mean(), per_sample[n:].mean()
        else:
            instance = run(latents, cond, batch).mean()
            prior_loss = run(prior_latents, prior_cond, batch["prior"]).mean()
        self.loss_parts = torch.stack([instance.detach(), prior_loss.detach()]).double()
        return instance + self.args.prior_loss_weight * prior_loss

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The empty prompt's encodings: once for frozen text encoders; every micro-step, with gradients, when
        text-encoder LoRA trains (a stored copy would go stale)."""
        parts = self.parts
        if self.args.caption_dropout <= 0:
            return {}
        if self._empty_prompt is not None:
            return self._empty_prompt
        with torch.set_grad_enabled(parts.text_encoders_trained), self._encoders_on_device():
            empty = parts.task.encode_prompts([""], parts.accelerator.device)
        if not parts.text_encoders_trained:
            self._empty_prompt = {k: v.float() for k, v in empty.items()}
        return empty

    def _encoders_on_device(self, needed: bool = True) -> contextlib.AbstractContextManager:
        parking = self.parts.parking
        return parking.on_device() if needed and parking is not None else contextlib.nullcontext()

    def _close(self, loss: torch.Tensor, step: int) -> None:
        """The step's host sync, then (all finite) average text-encoder gradients, clip, and step the optimizer
        and LR schedule; the gradient is zeroed either way."""
        parts = self.parts
        accelerator = parts.accelerator
        by_noise = self.loss_by_noise.take()
        extra = self.loss_parts.to(by_noise.device) if self.loss_parts is not None else by_noise[:0]
        health = read_step_health(accelerator, loss, self.finite, self.weights_bad, torch.cat([by_noise, extra]))
        # the loss parts travel in the same transfer, after the loss by noise level
        health.loss_by_noise, self.loss_parts_sums = health.loss_by_noise[:len(by_noise)], \
            health.loss_by_noise[len(by_noise):]
        self.health, self.finite = health, torch.ones_like(self.finite)
        if health.earlier_weights_bad:  # left by the previous update, optimizer step ``step`` (1-based)
            raise non_finite_weights_error(step, Path(self.args.output_dir))
        if health.finite:
            if parts.text_encoder_params and accelerator.num_processes > 1:
                for p in parts.text_encoder_params:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= accelerator.num_processes
            accelerator.clip_grad_norm_(parts.params, self.args.max_grad_norm)
            parts.optimizer.step()
            parts.lr_scheduler.step()
            self.weights_bad = nonfinite_weights(parts.params)  # on the device: read at the next sync
        parts.optimizer.zero_grad()

    def check_weights(self, step: int) -> None:
        """Raise :class:`NonFiniteWeightsError` if the last update, of optimizer step ``step`` (0-based), left
        non-finite weights on some process (a host sync: before checkpoints, validation and the export)."""
        if any_weights_bad(self.parts.accelerator, self.weights_bad):
            raise non_finite_weights_error(step + 1, Path(self.args.output_dir))

    def end_step(self, step: int) -> tuple[float, dict[str, float]]:
        """Close optimizer step ``step`` (0-based) after its last micro-step: count a skipped update (raising after
        too many in a row), else step the EMA. Returns the loss averaged over ranks and the loss by noise level."""
        parts, health = self.parts, self.health
        if not health.finite:
            self.counters["skipped_steps"] += 1
            self.counters["consecutive_bad"] += 1
            parts.accelerator.print(f"step {step + 1}: non-finite loss ({health.loss}), update skipped "
                                    f"({self.counters['consecutive_bad']} in a row)")
            if self.counters["consecutive_bad"] >= self.args.max_consecutive_bad_losses:
                raise non_finite_loss_error(self.counters["consecutive_bad"], step + 1, Path(self.args.output_dir))
        else:
            self.counters["consecutive_bad"] = 0
            if parts.ema is not None:
                parts.ema.step(parts.params)
        tags = loss_parts_tags(self.loss_parts_sums, parts.accelerator.num_processes)
        return health.loss, {**self.loss_by_noise.tags(health.loss_by_noise), **tags}
