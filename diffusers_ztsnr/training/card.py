"""The model card (``README.md``) the training scripts write into their output folder and push to the Hub.

Cards are rendered from plain values. Every value that comes from the user (paths, prompts, module names, the
base model's config) is escaped for where it lands: YAML front matter through ``yaml.safe_dump``, Python code
through ``repr`` literals, Markdown prose through :func:`markdown_text`, inline code through :func:`inline_code`.
What a card says about the files (markers, sampling settings) follows what the run actually wrote.
"""

from __future__ import annotations

import argparse
import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from ..markers import marker_metadata

BASE_TAGS = ("lora", "diffusers", "text-to-image", "diffusers-ztsnr")
DEFAULT_PROMPT = "a photo"
LORA_LOCATION = "<this repo or folder>"
#: ASCII punctuation with a Markdown meaning; ``_`` between two letters or digits has none and is kept
_MARKDOWN_SPECIAL = re.compile(r"[\\`*{}\[\]()#+\-.!|~=]|_(?![^\W_])|(?<![^\W_])_")


@dataclass(frozen=True)
class RunFacts:
    """What every card states about a run: the script, base model, pipeline class and hyperparameters."""

    script: str
    base_model: str
    pipeline: str
    rank: int
    steps: int
    train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    resolution: int
    seed: int | None
    validation_prompt: str | None = None
    grid_name: str | None = None
    license: str | None = None
    #: ``--adapter``: ``lora`` or ``dora``; ``full`` for ``--full_finetune``
    adapter: str = "lora"

    @property
    def noun(self) -> str:
        """What the run produced, as the card names it."""
        return "fine-tune" if self.adapter == "full" else "LoRA"

    @classmethod
    def from_args(cls, args: argparse.Namespace, script: str, pipeline: str, steps: int,
                  grid_name: str | None) -> RunFacts:
        """The facts of a run from its parsed common arguments (``--pretrained_model_name_or_path``, ``--rank``,
        ...)."""
        return cls(script=script, base_model=str(args.pretrained_model_name_or_path), pipeline=pipeline,
                   rank=args.rank, steps=steps, train_batch_size=args.train_batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
                   resolution=args.resolution, seed=args.seed, validation_prompt=args.validation_prompt,
                   grid_name=grid_name, license=getattr(args, "license", None),
                   adapter="full" if getattr(args, "full_finetune", False) else getattr(args, "adapter", "lora"))


def front_matter(metadata: Mapping[str, Any]) -> str:
    """The ``---``-delimited YAML header of a card.

    ``yaml.safe_load`` of the text between the delimiters equals ``dict(metadata)``: ``yaml.safe_dump`` quotes
    any string YAML would read otherwise (``a: b``, ``#x``, ``"q"``) and writes non-ASCII and control characters
    as escapes, so a value can neither add keys nor end the header.
    """
    return "---\n" + yaml.safe_dump(dict(metadata), sort_keys=False) + "---\n"


def markdown_text(value: object) -> str:
    """``str(value)`` as Markdown prose that renders as exactly that text, on the line it is placed in.

    ``&``, ``<`` and ``>`` become HTML entities (no tag or entity is interpreted), Markdown punctuation is
    backslash-escaped (no emphasis, link, image, code span, heading, list, quote or table), and line breaks become
    spaces (the value cannot start a block of its own).
    """
    text = html.escape(" ".join(str(value).splitlines()), quote=False)
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(0), text)


def inline_code(value: object) -> str:
    """``str(value)`` as a Markdown code span showing exactly that text (line breaks as spaces).

    The span's backtick fence is one longer than the longest backtick run in the value, so the value cannot
    close it; a space pads a value that starts or ends with a backtick or space (CommonMark strips one).
    """
    text = " ".join(str(value).splitlines()) or " "
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    if text.strip() and (text[0] in "` " or text[-1] in "` "):
        text = f" {text} "
    return f"{fence}{text}{fence}"


def python_literal(value: str | float | bool | None) -> str:
    """A one-line Python expression that evaluates to ``value`` (its ``repr``: quotes, backslashes, line breaks
    and non-printable characters escaped)."""
    return repr(value)


def fenced_code(code: str, language: str) -> str:
    """``code`` as a fenced Markdown block; the fence is longer than any backtick run in ``code``, so no line of
    ``code`` can close the block."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", code)), default=0))
    return f"{fence}{language}\n{code}\n{fence}\n"


def markdown_image(alt: str, target: str) -> str:
    """A Markdown image of the relative file ``target``; alt text escaped, destination percent-encoded."""
    return f"![{markdown_text(alt)}]({quote(target)})"


def kohya_note(prediction_type: str, zero_terminal_snr: bool, family: str, adapter: str = "lora") -> str:
    """What the card says of ``lora_kohya.safetensors``: its naming and the sampling metadata it carries
    (:func:`~diffusers_ztsnr.markers.marker_metadata`, the keys and values the file really holds), and for a
    v-prediction / zero-terminal-SNR SD 1.x / 2.x LoRA the ComfyUI node settings (ComfyUI reads such markers only from
    full SDXL checkpoints: ``diffusers-ztsnr export-checkpoint`` writes one)."""
    if adapter in ("lokr", "loha"):
        return (f"This is a LyCORIS {'LoKr' if adapter == 'lokr' else 'LoHa'}: `lycoris.safetensors` holds it in "
                "LyCORIS' key names, which ComfyUI's LoRA loader and A1111 / Forge read. diffusers' "
                "`load_lora_weights` reads neither LoKr nor LoHa, so the snippet above samples the base model with "
                "the trained scheduler settings only.\n")
    if adapter == "full":
        return ("This folder is the whole pipeline with the fine-tuned weights; `--export_checkpoint` writes it as "
                "one single-file checkpoint with the sampling markers (ComfyUI, A1111 / Forge).\n")
    if adapter == "dora":
        return ("This is a DoRA: diffusers loads it (`pipe.load_lora_weights`) as trained. No kohya copy is written: "
                "for a magnitude per output row, ComfyUI divides by the norm of the base weight, not of the adapted "
                "weight as peft trains it, so the same weights would apply differently there.\n")
    metadata = marker_metadata(prediction_type, zero_terminal_snr, family)
    items = ", ".join(f"{inline_code(key)} = {inline_code(value)}" for key, value in metadata.items())
    text = (f"`lora_kohya.safetensors` is the same LoRA in sd-scripts' key format (ComfyUI, A1111 / Forge), with "
            f"the sampling metadata {items}.\n")
    if family in ("sd1", "sd2") and (prediction_type == "v_prediction" or zero_terminal_snr):
        sampling = "v_prediction" if prediction_type == "v_prediction" else "eps"
        text += (f"In ComfyUI, put a ModelSamplingDiscrete node after the checkpoint loader with sampling = "
                 f"{inline_code(sampling)} and zsnr = {inline_code(str(bool(zero_terminal_snr)).lower())}; "
                 "`diffusers-ztsnr export-checkpoint` writes a merged single-file checkpoint with the `v_pred` / "
                 "`ztsnr` keys.\n")
    return text


def card_tags(v_prediction: bool, zero_terminal_snr: bool, flow_matching: bool) -> list[str]:
    """The Hub tags of a card: the base tags plus one per property the run really has."""
    extra = (("v-prediction", v_prediction), ("zero-terminal-snr", zero_terminal_snr), ("flow-matching", flow_matching))
    return [*BASE_TAGS, *(tag for tag, present in extra if present)]


def is_hub_repo_id(name: str) -> bool:
    """Whether ``name`` is a Hub model id (``owner/name``, or a legacy bare name) and not a local path: only those
    belong in a card's ``base_model`` field, which the Hub links and validates."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(os.path.expanduser(name)).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def card_metadata(run: RunFacts, tags: Sequence[str]) -> dict[str, Any]:
    """The Hub metadata: ``base_model`` (Hub ids only), library, pipeline tag, license, tags. Without
    ``--license`` the license is the base model's (``other``, linked to the base model's page when it is on the
    Hub), and the card says so."""
    metadata: dict[str, Any] = {"base_model": run.base_model} if is_hub_repo_id(run.base_model) else {}
    metadata.update({"library_name": "diffusers", "pipeline_tag": "text-to-image"})
    if run.license:
        metadata["license"] = run.license
    else:
        metadata.update({"license": "other", "license_name": "base-model-license"})
        if "base_model" in metadata:
            metadata["license_link"] = f"https://huggingface.co/{run.base_model}"
    metadata["tags"] = [t for t in tags if t != "lora"] if run.adapter == "full" else list(tags)
    return metadata


def card_header(run: RunFacts, tags: Sequence[str]) -> str:
    """Front matter (:func:`card_metadata`), the title naming the base model, and the license line."""
    if run.license:
        license_line = f"License: {inline_code(run.license)}."
    else:
        license_line = (f"License: the base model's ({markdown_text(run.base_model)}); its terms apply to this "
                        f"{run.noun}.")
    title = "Fine-tune of" if run.adapter == "full" else "LoRA for"
    return f"{front_matter(card_metadata(run, tags))}\n# {title} {markdown_text(run.base_model)}\n\n{license_line}\n"


def sampling_snippet(run: RunFacts, scheduler: str, call_kwargs: Mapping[str, Any]) -> str:
    """The Python block that loads the base pipeline, this LoRA and the shipped ``scheduler/`` config, then samples
    the validation prompt; every value is a :func:`python_literal`."""
    prompt = python_literal(run.validation_prompt or DEFAULT_PROMPT)
    if run.pipeline == "FluxKontextPipeline":  # its first parameter is the reference image
        prompt = f"prompt={prompt}"
    arguments = ", ".join([prompt,
                           *(f"{name}={python_literal(value)}" for name, value in call_kwargs.items())])
    location = python_literal(LORA_LOCATION)
    if run.adapter in ("lokr", "loha"):  # no diffusers loader for LyCORIS adapters: the scheduler part only
        return fenced_code("\n".join([
            f"from diffusers import {run.pipeline}",
            f"from diffusers_ztsnr import {scheduler}",
            "",
            f"pipe = {run.pipeline}.from_pretrained({python_literal(run.base_model)})",
            f"pipe.scheduler = {scheduler}.from_pretrained({location}, subfolder={python_literal('scheduler')})",
        ]), "python")
    if run.adapter == "full":  # the folder is the pipeline; its scheduler config read back as our class
        return fenced_code("\n".join([
            f"from diffusers import {run.pipeline}",
            f"from diffusers_ztsnr import {scheduler}",
            "",
            f"pipe = {run.pipeline}.from_pretrained({location})",
            f"pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config)",
            f"image = pipe({arguments}).images[0]",
        ]), "python")
    return fenced_code("\n".join([
        f"from diffusers import {run.pipeline}",
        f"from diffusers_ztsnr import {scheduler}",
        "",
        f"pipe = {run.pipeline}.from_pretrained({python_literal(run.base_model)})",
        f"pipe.load_lora_weights({location})",
        f"pipe.scheduler = {scheduler}.from_pretrained({location}, subfolder={python_literal('scheduler')})",
        f"image = pipe({arguments}).images[0]",
    ]), "python")


def grid_line(run: RunFacts) -> str:
    """The validation-grid image between blank lines, or a single blank line when the run sampled none."""
    return f"\n{markdown_image('validation samples', run.grid_name)}\n\n" if run.grid_name else "\n"


def render_unet_card(run: RunFacts, *, base_prediction_type: str, prediction_type: str, zero_terminal_snr: bool,
                     snr_gamma: float | None, flow_weighting: str | None, flow_shift: float,
                     guidance_rescale: float, family: str) -> str:
    """The card of an SD-style UNet LoRA; ``flow_weighting`` is set when it was trained as a rectified flow.

    The kohya file is described by :func:`kohya_note`; ``guidance_rescale`` is suggested only when
    non-zero (the zero-terminal-SNR runs).
    """
    recipe = []
    if prediction_type != base_prediction_type:
        recipe.append(f"converted from {markdown_text(base_prediction_type)} to {markdown_text(prediction_type)}")
    if zero_terminal_snr:
        recipe.append("trained on the zero-terminal-SNR rescale of the base schedule (Lin et al. 2023)")
    if flow_weighting is not None:
        recipe.append(f"trained as a rectified flow (flow matching, {markdown_text(flow_weighting)} time "
                      "density/weight) through the equal-SNR mapping")
    if snr_gamma:
        recipe.append(f"min-SNR-gamma weighting, gamma = {snr_gamma}")
    recipe_text = "; ".join(recipe) or f"{markdown_text(prediction_type)} on the base schedule"
    tags = card_tags(prediction_type == "v_prediction", zero_terminal_snr, flow_matching=False)
    schedule = " on a zero-terminal-SNR schedule" if zero_terminal_snr else ""
    call_kwargs = {"guidance_rescale": guidance_rescale} if guidance_rescale else {}
    flow_note = ""
    if flow_weighting is not None:
        flow_note = "\nIt can also be sampled as the rectified flow it was trained as:\n\n" + fenced_code("\n".join([
            "from diffusers_ztsnr import ZTSNRFlowMatchScheduler",
            "from diffusers_ztsnr.adapters import PathTransformedModel",
            "",
            "pipe.unet = PathTransformedModel.vp_as_flow_from_scheduler_config(pipe.unet, pipe.scheduler.config)",
            f"pipe.scheduler = ZTSNRFlowMatchScheduler(shift={python_literal(flow_shift)})",
        ]), "python")
    return (
        f"{card_header(run, tags)}\n"
        f"Trained with diffusers-ztsnr's {inline_code(run.script)}: {recipe_text}.\n"
        f"{hyperparameter_lines(run)}"
        f"{grid_line(run)}"
        "## Sampling\n\n"
        f"This {run.noun} was trained for **{markdown_text(prediction_type)}**{schedule}:\n"
        "sample it with the scheduler config shipped in `scheduler/`, which sets that up.\n\n"
        f"{sampling_snippet(run, 'ZTSNRUniPCMultistepScheduler', call_kwargs)}"
        f"{flow_note}\n"
        f"{kohya_note(prediction_type, zero_terminal_snr, family, run.adapter)}"
    )


def hyperparameter_lines(run: RunFacts, lora_layers: Sequence[str] | None = None) -> str:
    """Rank (and the LoRA's target modules), optimizer steps, batch, learning rate, resolution and seed."""
    targets = f" on {inline_code(','.join(lora_layers))}" if lora_layers else ""
    trained = "Every weight of the denoiser" if run.adapter == "full" else f"Rank {run.rank}{targets}"
    return (f"{trained}, {run.steps} optimizer steps, batch {run.train_batch_size} x "
            f"{run.gradient_accumulation_steps}\naccumulation, learning rate {run.learning_rate}, "
            f"resolution {run.resolution}, seed {run.seed}.\n")


def render_flow_card(run: RunFacts, *, weighting_scheme: str, timestep_shift: float | str, precondition_outputs: bool,
                     lora_layers: Sequence[str], guidance_scale: float | None, family: str,
                     max_sequence_length: int | None = None) -> str:
    """The card of a flow-matching transformer LoRA; ``guidance_scale`` (a guidance-distilled transformer's
    embedding input) and ``max_sequence_length`` (the prompt length trained at, where it is not the pipeline's
    default) are passed in the snippet when set."""
    preconditioned = ", x0-preconditioned outputs" if precondition_outputs else ""
    call_kwargs = {name: value for name, value in (("guidance_scale", guidance_scale),
                                                   ("max_sequence_length", max_sequence_length)) if value is not None}
    return (
        f"{card_header(run, card_tags(False, False, flow_matching=True))}\n"
        f"Trained with diffusers-ztsnr's {inline_code(run.script)}: flow matching (velocity `eps - x0`), "
        f"time density / weighting\n{inline_code(weighting_scheme)}, timestep shift {inline_code(timestep_shift)}"
        f"{preconditioned}.\n"
        f"{hyperparameter_lines(run, lora_layers)}"
        f"{grid_line(run)}"
        "## Sampling\n\n"
        f"{sampling_snippet(run, 'ZTSNRFlowMatchScheduler', call_kwargs)}\n"
        f"{kohya_note('flow_prediction', False, family, run.adapter)}"
    )
