"""The offline demo, end to end: a base model that draws shapes, its conversion, the before/after figure.

1. Generate the data: shapes on dark, grey and bright backgrounds, captions naming the background.
2. Train a small VAE and an epsilon UNet on SD 1.x's schedule (non-zero terminal SNR): the base model.
3. Convert it with this package's training library -- the code ``train_lora_unet.py`` runs -- to v-prediction on
   the zero-terminal-SNR rescale of its schedule, as a LoRA.
4. Sample the same prompts and seeds before (epsilon, SD's schedule, the base model's PNDM sampler) and after
   (v + ZTSNR LoRA loaded with ``load_lora_weights``, this package's scheduler), and measure each side's
   brightness spread against the data's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import make_shapes, mean_brightness, write_imagefolder
from .figure import Side, draw_figure, figure_prompts, sample, separation, spread
from .quiet import quiet_libraries, stage_bar

IMAGE_SIZE = 32


@dataclass
class DemoSettings:
    """Step counts of each stage; the defaults fit the whole demo in under three minutes on two idle CPU cores."""

    seed: int = 0
    num_images: int = 480
    vae_steps: int = 100
    unet_steps: int = 480
    convert_steps: int = 260
    sampling_steps: int = 12
    images_per_prompt: int = 6
    guidance_scale: float = 1.5
    batch_size: int = 16
    base_learning_rate: float = 1e-3
    convert_learning_rate: float = 4e-3
    convert_rank: int = 16
    convert_timestep_shift: float = 3.0
    convert_caption_dropout: float = 0.1
    convert_layers: str = "to_q,to_k,to_v,to_out.0,conv1,conv2,conv_out"


@dataclass
class DemoResult:
    paths: dict[str, str]
    spread: dict[str, float]
    ratio: dict[str, float]
    separation: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


def convert(base: Path, data: Path, output_dir: Path, settings: DemoSettings) -> dict:
    """epsilon -> v-prediction + zero terminal SNR, as a LoRA, through the training scripts' own code path."""
    from ..training.unet import main as train_main

    s = settings
    result = train_main([
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(output_dir),
        "--resolution", str(IMAGE_SIZE), "--center_crop", "--cache_latents", "--dataloader_num_workers", "0",
        "--prediction_type", "v_prediction", "--zero_terminal_snr", "--timestep_shift", str(s.convert_timestep_shift),
        "--lora_layers", s.convert_layers, "--rank", str(s.convert_rank),
        "--learning_rate", str(s.convert_learning_rate), "--lr_scheduler", "cosine", "--lr_warmup_steps", "20",
        "--caption_dropout", str(s.convert_caption_dropout), "--train_batch_size", str(s.batch_size),
        "--max_train_steps", str(s.convert_steps),
        "--checkpointing_steps", str(s.convert_steps), "--seed", str(s.seed), "--overwrite_output_dir",
    ])
    if not all(math.isfinite(v) for v in result["losses"]):
        raise RuntimeError("the conversion's training loss was not finite")
    return result


def before_and_after(base: Path, converted: dict, settings: DemoSettings) -> tuple[Side, Side]:
    from diffusers import StableDiffusionPipeline

    from ..schedulers import ZTSNRUniPCMultistepScheduler

    prompts, tones, seeds = figure_prompts(settings.images_per_prompt)
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    common = dict(steps=settings.sampling_steps, guidance_scale=settings.guidance_scale, size=IMAGE_SIZE)
    before = Side(f"before: epsilon, SD schedule, {type(pipe.scheduler).__name__}",
                  sample(pipe, prompts, seeds, **common), tones)
    pipe.load_lora_weights(str(converted["lora"]))
    pipe.scheduler = ZTSNRUniPCMultistepScheduler.from_pretrained(str(converted["scheduler"]))
    rescale = {"guidance_rescale": 0.7} if settings.guidance_scale > 1 else {}  # Lin et al.'s CFG rescale
    after = Side("after: v + ZTSNR LoRA, ZTSNRUniPCMultistepScheduler",
                 sample(pipe, prompts, seeds, **common, **rescale), tones)
    return before, after


def run_demo(output_dir: Path, settings: DemoSettings | None = None) -> DemoResult:
    """Run every stage into ``output_dir``; returns the paths written and the measured brightness spreads."""
    settings = settings or DemoSettings()
    output_dir.mkdir(parents=True, exist_ok=True)
    seconds, start = {}, time.perf_counter()
    with quiet_libraries():
        from .pretrain import build_base  # imports diffusers' pipelines, which log about optional dependencies

        shapes = make_shapes(settings.num_images, IMAGE_SIZE, settings.seed)
        data = write_imagefolder(shapes, output_dir / "data")
        base = build_base(shapes, settings, output_dir / "base-epsilon", stage_bar)
        seconds["base model"] = time.perf_counter() - start
        converted = convert(base, data, output_dir / "lora", settings)
        seconds["conversion"] = time.perf_counter() - start - sum(seconds.values())
        before, after = before_and_after(base, converted, settings)
    data_brightness = mean_brightness(shapes.images)
    figure = draw_figure(before, after, data_brightness, shapes.tones, output_dir / "before_after.png")
    seconds["figure"] = time.perf_counter() - start - sum(seconds.values())
    spreads = {"data": spread(data_brightness), "before": spread(before.brightness), "after": spread(after.brightness)}
    apart = {"data": separation(data_brightness, shapes.tones), "before": separation(before.brightness, before.tones),
             "after": separation(after.brightness, after.tones)}
    result = DemoResult(
        paths={"figure": str(figure), "base": str(base), "lora": str(converted["lora"]),
               "kohya": str(converted["kohya"]), "card": str(converted["card"]),
               "scheduler": str(converted["scheduler"]), "data": str(data)},
        spread=spreads, ratio={k: spreads[k] / spreads["data"] for k in ("before", "after")},
        separation={k: v / apart["data"] for k, v in apart.items() if k != "data"}, seconds=seconds)
    (output_dir / "results.json").write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return result


__all__ = ["DemoResult", "DemoSettings", "run_demo"]
