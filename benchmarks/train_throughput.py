"""Training throughput: steps/s and peak memory of our LoRA trainers (latent cache on / off) vs plain loops.

Run: ``python benchmarks/train_throughput.py`` (``--family unet|flow|all``, default all: about 4 min for unet and
6 min for flow (SD3 + Flux) on a 2-core machine; ``--quick`` for a smoke run on the tiny models only (tiny-flux
included), about 1.5 min for both families; ``--json PATH`` to dump every number). CPU, Linux (the runs are
forked children, see below).

Two families, each with the same three rows side by side on the same data, batch size, LoRA rank, resolution and
number of steps:

* **unet** (SD1.5-style models, ``diffusers_ztsnr.training.unet``):

  * **ours, --cache_latents**: ``diffusers_ztsnr.training.unet.main`` with ``--cache_latents --center_crop``,
    timed on runs that HIT the encodings cache. The cache is built first by a separate 1-step run into an empty
    cache folder; its build time (``cache_image_encodings`` on a miss) is reported on its own, as is the time a
    hit spends loading and verifying the cache. Neither is in steps/s.
  * **ours, no cache**: the same script without ``--cache_latents`` (VAE + text encoder run every step).
  * **plain loop**: what diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` does, written here:
    load the components (``DDPMScheduler``, ``CLIPTokenizer``, ``CLIPTextModel``, ``AutoencoderKL``,
    ``UNet2DConditionModel``), freeze them, ``unet.add_adapter(LoraConfig(r, lora_alpha=r,
    init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``, AdamW on the LoRA
    parameters, an ``imagefolder`` dataset with the example's preprocessing (resize, center crop, to tensor,
    normalize; captions tokenized to ``model_max_length``) and accelerate's ``prepare`` / ``accumulate`` /
    ``backward`` / ``clip_grad_norm_``; per step: ``vae.encode(x).latent_dist.sample() * scaling_factor``,
    text-encode the ids, ``DDPMScheduler.add_noise`` at uniform timesteps, UNet forward, MSE to the noise,
    backward, step. No caching. (torchvision is not required: its transforms are reproduced with PIL.)

  Both are epsilon-prediction MSE.

* **flow** (SD3 and Flux models, ``diffusers_ztsnr.training.flow``):

  * **ours, --cache_latents** / **ours, no cache**: as above with ``diffusers_ztsnr.training.flow.main``
    (defaults: ``--weighting_scheme logit_normal``, the scheduler's static shift 3.0, T5 length 77, LoRA on
    the eight attention projections below). The cache holds the VAE latents and the prompt embeddings of all
    three text encoders (CLIP-L-like, CLIP-G-like, T5).
  * **plain loop**: what diffusers' ``examples/dreambooth/train_dreambooth_lora_sd3.py`` does when every image
    has its own caption (a dataset with a caption column: the prompts are then encoded every step), written
    here: load ``FlowMatchEulerDiscreteScheduler`` (and a deep copy of it for the time tables), the three
    tokenizers, ``CLIPTextModelWithProjection`` x 2, ``T5EncoderModel``, ``AutoencoderKL`` and
    ``SD3Transformer2DModel`` with ``from_pretrained(subfolder=...)``, freeze them,
    ``transformer.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", target_modules=[
    attn.add_k_proj, attn.add_q_proj, attn.add_v_proj, attn.to_add_out, attn.to_k, attn.to_out.0, attn.to_q,
    attn.to_v]))``, AdamW on the LoRA parameters, the ``imagefolder`` images preprocessed once up front (resize,
    center crop, to tensor, normalize: the example's DreamBooth dataset does this in its constructor) and
    accelerate's ``prepare`` / ``accumulate`` / ``backward`` / ``clip_grad_norm_``; per step: the prompts
    through both CLIPs (penultimate hidden states + pooled projections, concatenated, zero-padded to the T5
    width) and T5 (``max_length`` 77), joined along the sequence, under ``no_grad``;
    ``(vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor``;
    ``compute_density_for_timestep_sampling(weighting_scheme="logit_normal")``, indices into the scheduler
    copy's ``timesteps`` / ``sigmas``, ``noisy = (1 - sigma) * x0 + sigma * noise``, transformer forward,
    target ``noise - x0``, ``compute_loss_weighting_for_sd3``, weighted MSE, backward, clip, step. No caching.

  Both are velocity (flow-matching) MSE with the same time density and shift.

  Flux rows (tiny-flux): **ours** with ``--lora_layers attn.to_k,attn.to_q,attn.to_v,attn.to_out.0
  --weighting_scheme none --max_sequence_length 512 --guidance_scale 3.5`` (the last two are its Flux defaults
  anyway); its cache holds the VAE latents and the CLIP pooled + T5 prompt embeddings. The **plain loop**
  (``run_plain_flux``) is what diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` does with
  per-image captions, written here: ``FlowMatchEulerDiscreteScheduler`` (+ deep copy), ``CLIPTokenizer``,
  ``T5TokenizerFast``, ``CLIPTextModel``, ``T5EncoderModel``, ``AutoencoderKL``, ``FluxTransformer2DModel``
  via ``from_pretrained(subfolder=...)``, frozen, ``transformer.add_adapter(LoraConfig(r, lora_alpha=r,
  init_lora_weights="gaussian", target_modules=[attn.to_k, attn.to_q, attn.to_v, attn.to_out.0]))`` (the
  script's default before diffusers PR #9646; since then it defaults to these plus attn.add_k/q/v_proj,
  attn.to_add_out and the ff / ff_context projections, which is also our trainer's Flux default: here both
  trainers get the four), AdamW, images preprocessed once up front, accelerate as above; per step, under
  ``no_grad``: CLIP's ``pooler_output`` (77 tokens) and T5's last hidden states (512 tokens), ``txt_ids`` all
  zero; ``(vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor``,
  ``FluxPipeline._prepare_latent_image_ids``, ``compute_density_for_timestep_sampling("none")`` (the script's
  default: uniform), indices into the scheduler copy's tables, ``noisy = (1 - sigma) * x0 + sigma * noise``,
  ``FluxPipeline._pack_latents``, guidance 3.5 expanded over the batch, ``transformer(packed, timestep=t / 1000,
  guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids)``, ``FluxPipeline._unpack_latents``,
  target ``noise - x0``, ``compute_loss_weighting_for_sd3("none")`` (1), MSE, backward, clip, step. One
  difference that costs nothing: the script takes the copy's sigma table, unshifted for Flux's
  ``use_dynamic_shifting`` scheduler, while ours (``--timestep_shift auto``) applies Flux's resolution-dependent
  ``mu`` shift to the same uniform draw.

All trainers run in fp32 with gradient clipping at 1.0, ``dataloader_num_workers=0``.

Timing: every run is one forked child (see memory) and ``time.perf_counter`` brackets the whole call, model
loading, dataset, cache load, training and saving included. Each row is run with N1 and N2 > N1 steps and
steps/s = (N2 - N1) / (t(N2) - t(N1)), so everything that does not scale with the step count (loading, cache
hits, our end-of-run checkpoint and LoRA export) cancels; the SAME method is used for the plain loop. As a
cross-check the plain loop's step loop is also timed directly (steps after the first), reported in a note.
With ``--repeats R`` > 1 the N1/N2 pairs are repeated (rows interleaved) and the median is reported. torch
runs on ``--threads`` threads (default 1, ``torch.set_num_threads``) in every row. Absolute numbers depend on
the CPU and on other load; the ratios between rows are the figures to read. No speed is asserted.

Memory: each run is a child forked (``multiprocessing`` "fork") from a parent that has already imported
torch, diffusers, transformers, accelerate, peft and datasets, so the import cost is paid once; the
child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is its own peak resident set (on Linux a forked child
starts from its current RSS, not the parent's peak), read at the end of the N2 run. "peak RSS" is that value;
"growth" is it minus the child's RSS at its start (what the run itself added: models, activations, optimizer
state, data, cache). A fresh interpreter running the same thing shows some tens of MiB more (import-time pages
the child never touches again).

Models, unet family: the tiny SD1.5-style pipeline of :func:`diffusers_ztsnr.testing.tiny.save_tiny_pipeline` ("sd15")
at 64 px, and a "small" one: the same pipeline folder with its UNet replaced by a larger ``UNet2DConditionModel``
(block_out_channels (64, 128, 256), 2 layers per block, 8 heads, cross-attention dim 32 = the tiny text
encoder's width, cross-attention in the two lower levels only, as in SDXL's layout) at ``--small_resolution``
(default 64 px: at 128 px one training step of it took ~8 s on one thread of the 2-core machine this was
written on, too slow for a few-minute run). The tiny VAE has a spatial factor of 2, so 64 px images are
32 x 32 latents.

Models, flow family: the tiny SD3 pipeline of ``save_tiny_pipeline("sd3")`` ("tiny-sd3": two CLIPs of width 16
and 32, a 2-layer T5 of width 64, the 16-channel tiny VAE, a 2-layer SD3 transformer of width 32) at 64 px, and
"small-sd3": the same pipeline folder with its transformer replaced by a larger ``SD3Transformer2DModel`` (6 joint
blocks, 4 heads of 64, width 256, patch 2; joint_attention_dim 64 = the T5 width, pooled_projection_dim 48 =
the two CLIP widths, 16 input channels = the VAE's latents) at ``--small_resolution``. Prompts are 77 CLIP +
77 T5 tokens, so the transformer sees 154 text tokens next to 256 image tokens (32 x 32 latents, 2 x 2 patches)
at 64 px. "tiny-flux": ``save_tiny_pipeline("flux")`` as is (one CLIP of width 32 whose pooled output is the
pooled projection, a 2-layer T5 of width 64, the 16-channel tiny VAE, a Flux transformer with 1 double- and 1
single-stream block, 2 heads of 16, guidance embedding) at 64 px: 256 packed image tokens (32 x 32 latents,
2 x 2 packing) next to 512 T5 tokens, so on these tiny models the T5 encoding at 512 tokens is a large part of
the uncached step (Flux's 512 vs SD3's 77 T5 tokens enlarges what the cache removes). No small Flux model is
benchmarked; tiny-flux also runs with ``--quick``.

The SD3-medium-sized number (a 24-block, width-1536 transformer at 512 px in bf16) needs a GPU and is not
measured by this script.

Reading the result: caching removes the VAE encode and the text encoders from every step and nothing else
(SD3: VAE + both CLIPs + T5; Flux: VAE + CLIP + T5), so what it can give is capped by their share of a step, which is
set by the model, not by the trainer: the small models keep the tiny VAE (two blocks of 32 / 64 channels) and
the tiny text encoders under a much larger denoiser, so their share is small; a real SD1.5 / SD3 at 512 px has
its own ratio, which these tiny models do not represent. The printed notes give ours-cached / ours-uncached
and the share it implies. On a shared CPU, differences of ~5-10 % between rows can be run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# measure the checkout this file lives in, whatever `pip install -e` points at
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import machine_header, markdown_table  # noqa: E402

ROW_CACHED = "ours, --cache_latents (cache hit)"
ROW_UNCACHED = "ours, no cache"
ROW_PLAIN = "plain diffusers-example loop"
ROWS = (ROW_CACHED, ROW_UNCACHED, ROW_PLAIN)
TARGET_SPEEDUP = 1.5
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# diffusers' train_dreambooth_lora_sd3.py default (and our flow trainer's default for SD3)
SD3_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v"]
# Flux rows: the attention projections of the image stream (double and single blocks), passed to our trainer as
# --lora_layers so both trainers put LoRA on the same modules
FLUX_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]
FLUX_WEIGHTING = "none"  # diffusers' train_dreambooth_lora_flux.py default; passed to our trainer too
FLUX_MAX_SEQUENCE_LENGTH = 512  # the Flux script's default T5 length (and our trainer's for Flux)
FLUX_GUIDANCE = 3.5  # the Flux script's default --guidance_scale (and our trainer's)
FAMILIES = ("unet", "flow")
# keyed by a result's "kind" (its family where it has none: the UNet and SD3 rows)
DENOISER = {"unet": "UNet", "flow": "SD3 transformer", "flux": "Flux transformer"}
ENCODERS = {"unet": "VAE + text", "flow": "VAE + CLIP x 2 + T5", "flux": "VAE + CLIP + T5"}


def preimport() -> None:
    """Import, in the parent, everything the runs import lazily, so no child pays (or times) an import."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import diffusers
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401
    import peft  # noqa: F401
    import tqdm.auto  # noqa: F401
    import transformers  # noqa: F401

    import diffusers_ztsnr.training.data  # noqa: F401
    import diffusers_ztsnr.training.flow  # noqa: F401
    import diffusers_ztsnr.training.unet  # noqa: F401

    for name in ("StableDiffusionPipeline", "AutoencoderKL", "UNet2DConditionModel", "DDPMScheduler",
                 "StableDiffusion3Pipeline", "SD3Transformer2DModel", "FlowMatchEulerDiscreteScheduler",
                 "FluxPipeline", "FluxTransformer2DModel"):
        getattr(diffusers, name)
    from transformers import (  # noqa: F401
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- forked children ----------------------------------------------------------------------------------------


def _child(conn, threads: int, log_path: str, fn, kwargs) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # progress bars and library chatter go to the log, not the table
    os.dup2(log, 2)
    try:
        torch.set_num_threads(threads)
        rss_start = rss_mib()
        out = fn(**kwargs)
        out.update(rss_start_mib=rss_start, peak_rss_mib=peak_rss_mib())
        out["growth_mib"] = out["peak_rss_mib"] - rss_start
        conn.send(out)
    except BaseException:  # noqa: B036 - report anything to the parent, then die
        conn.send({"error": traceback.format_exc()})
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.close()
        os._exit(0)


def in_child(threads: int, log_path: Path, fn, **kwargs) -> dict:
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, threads, str(log_path), fn, kwargs))
    proc.start()
    send.close()
    try:
        out = receive.recv()
    except EOFError:
        out = {"error": f"child died (exit code {proc.exitcode})"}
    proc.join()
    if "error" in out:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"{fn.__name__}({kwargs}) failed:\n{out['error']}\n--- log tail ---\n{tail}")
    return out


# --- assets -------------------------------------------------------------------------------------------------


def small_unet_config(cross_attention_dim: int, sample_size: int) -> dict:
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=32,
    )


def small_sd3_config(joint_attention_dim: int, pooled_projection_dim: int, latent_channels: int,
                     sample_size: int) -> dict:
    heads, head_dim = 4, 64
    return dict(
        sample_size=sample_size, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=6, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=max(32, sample_size // 2),
    )


def _vae_factor(pipeline: Path) -> int:
    return 2 ** (len(json.loads((pipeline / "vae" / "config.json").read_text())["block_out_channels"]) - 1)


def build_assets(root: str, families: tuple[str, ...], small: bool, small_resolution: int, num_images: int,
                 flux: bool = False) -> dict:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, T5Config

    from diffusers_ztsnr.testing.demo_data import make_demo_dataset
    from diffusers_ztsnr.testing.tiny import save_tiny_pipeline

    root = Path(root)
    out = {"pipelines": {}, "data": {}, "params": {}}
    resolutions = {64} | ({small_resolution} if small else set())
    for res in sorted(resolutions):
        out["data"][res] = str(make_demo_dataset(root / f"data-{res}", num_images=num_images, size=res))
    if "unet" in families:
        tiny = save_tiny_pipeline("sd15", root / "tiny-sd15")
        out["pipelines"]["tiny"] = str(tiny)
        out["params"]["tiny"] = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny / "unet")
                                    .parameters())
        if small:
            folder = root / "small-sd15"
            shutil.copytree(tiny, folder)
            width = CLIPTextConfig.from_pretrained(tiny / "text_encoder").hidden_size
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**small_unet_config(width, small_resolution // _vae_factor(tiny)))
            shutil.rmtree(folder / "unet")
            unet.save_pretrained(folder / "unet", safe_serialization=True)
            out["pipelines"]["small"] = str(folder)
            out["params"]["small"] = sum(p.numel() for p in unet.parameters())
    if "flow" in families:
        tiny = save_tiny_pipeline("sd3", root / "tiny-sd3")
        out["pipelines"]["tiny-sd3"] = str(tiny)
        out["params"]["tiny-sd3"] = sum(p.numel() for p in SD3Transformer2DModel.from_pretrained(
            tiny / "transformer").parameters())
        if small:
            folder = root / "small-sd3"
            shutil.copytree(tiny, folder)
            # the text wiring of the tiny pipeline: T5 width -> joint attention, both CLIP projections -> pooled
            t5_width = T5Config.from_pretrained(tiny / "text_encoder_3").d_model
            pooled = sum(CLIPTextConfig.from_pretrained(tiny / sub).projection_dim
                         for sub in ("text_encoder", "text_encoder_2"))
            latent_channels = json.loads((tiny / "vae" / "config.json").read_text())["latent_channels"]
            torch.manual_seed(0)
            transformer = SD3Transformer2DModel(**small_sd3_config(t5_width, pooled, latent_channels,
                                                                   small_resolution // _vae_factor(tiny)))
            shutil.rmtree(folder / "transformer")
            transformer.save_pretrained(folder / "transformer", safe_serialization=True)
            out["pipelines"]["small-sd3"] = str(folder)
            out["params"]["small-sd3"] = sum(p.numel() for p in transformer.parameters())
        if flux:
            tiny = save_tiny_pipeline("flux", root / "tiny-flux")
            out["pipelines"]["tiny-flux"] = str(tiny)
            out["params"]["tiny-flux"] = sum(p.numel() for p in FluxTransformer2DModel.from_pretrained(
                tiny / "transformer").parameters())
    return out


# --- the runs -----------------------------------------------------------------------------------------------


def run_ours(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int, output_dir: str,
             cache_dir: str | None, family: str = "unet", extra_args: tuple[str, ...] = ()) -> dict:
    import diffusers_ztsnr.training.data as data_module

    if family == "flow":
        from diffusers_ztsnr.training.flow import main
    else:
        from diffusers_ztsnr.training.unet import main

    cache_seconds = []
    original = data_module.cache_image_encodings

    def timed_cache(*args, **kwargs):  # train() imports it from the module at call time: this wrapper is used
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            cache_seconds.append(time.perf_counter() - start)

    data_module.cache_image_encodings = timed_cache
    argv = [
        "--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", str(resolution),
        "--train_batch_size", str(batch_size), "--max_train_steps", str(steps), "--center_crop",
        "--output_dir", output_dir, "--rank", str(rank), "--report_to", "none",
        "--checkpointing_steps", str(10**9), "--learning_rate", "1e-4", "--seed", "0",
    ]
    if cache_dir is not None:
        argv += ["--cache_latents", "--cache_latents_dir", cache_dir]
    argv += list(extra_args)
    start = time.perf_counter()
    result = main(argv)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": result["global_step"], "cache": result["cache"],
            "cache_seconds": sum(cache_seconds) if cache_seconds else None, "final_loss": result["losses"][-1]}


def _example_transform(image, resolution: int) -> torch.Tensor:
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


def run_plain(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> dict:
    """diffusers' train_text_to_image_lora.py, reduced to what one CPU process at fp32 runs (no caching)."""
    import math

    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from datasets import load_dataset
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    start = time.perf_counter()
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    set_seed(0)
    noise_scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    weight_dtype = torch.float32
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    dataset = load_dataset("imagefolder", data_dir=data)["train"]

    def preprocess_train(examples):
        examples["pixel_values"] = [_example_transform(im.convert("RGB"), resolution) for im in examples["image"]]
        examples["input_ids"] = tokenizer(examples["text"], max_length=tokenizer.model_max_length,
                                          padding="max_length", truncation=True, return_tensors="pt").input_ids
        return examples

    train_dataset = dataset.with_transform(preprocess_train)

    def collate_fn(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).contiguous().float()
        return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}

    train_dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn,
                                                   batch_size=batch_size, num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    num_epochs = math.ceil(steps / len(train_dataloader))
    global_step, step_times, loss_value = 0, [], float("nan")
    for _epoch in range(num_epochs):
        unet.train()
        train_loss = 0.0
        for batch in train_dataloader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                target = noise  # epsilon prediction
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(batch_size)).mean()
                train_loss += avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                loss_value = train_loss
                train_loss = 0.0
                step_times.append(time.perf_counter())
            if global_step >= steps:
                break
        if global_step >= steps:
            break
    seconds = time.perf_counter() - start
    direct = (len(step_times) - 1) / (step_times[-1] - step_times[0]) if len(step_times) > 1 else None
    accelerator.end_training()
    return {"seconds": seconds, "steps": global_step, "direct_steps_per_s": direct, "final_loss": loss_value}


def _plain_flow_loop(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int, *,
                     transformer_class, lora_targets: list[str], weighting_scheme: str, text_encoders: list,
                     encode_prompts, predict) -> dict:
    """What diffusers' SD3 and Flux DreamBooth-LoRA examples share, reduced to one CPU process at fp32: freeze,
    LoRA on ``lora_targets``, AdamW, images transformed once up front (the examples' DreamBooth dataset does it in
    its constructor), and per step: ``encode_prompts(captions)`` (every step, per-image captions), VAE sample,
    ``compute_density_for_timestep_sampling``, sigmas from a FlowMatchEulerDiscreteScheduler copy, ``predict(
    transformer, noisy, timesteps, embeddings)``, target ``noise - x0``, ``compute_loss_weighting_for_sd3``, MSE."""
    import copy
    import math

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from datasets import load_dataset
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig

    start = time.perf_counter()
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    set_seed(0)
    noise_scheduler_copy = copy.deepcopy(FlowMatchEulerDiscreteScheduler.from_pretrained(pipeline,
                                                                                         subfolder="scheduler"))
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    transformer = transformer_class.from_pretrained(pipeline, subfolder="transformer")
    weight_dtype = torch.float32
    for model in (transformer, vae, *text_encoders):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=weight_dtype)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=lora_targets))
    lora_layers = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)

    dataset = load_dataset("imagefolder", data_dir=data)["train"]
    pixel_values = [_example_transform(im.convert("RGB"), resolution) for im in dataset["image"]]
    examples = [{"pixel_values": x, "prompt": c} for x, c in zip(pixel_values, dataset["text"], strict=True)]

    def collate_fn(batch):
        pixels = torch.stack([e["pixel_values"] for e in batch]).to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": pixels, "prompts": [e["prompt"] for e in batch]}

    train_dataloader = torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True,
                                                   collate_fn=collate_fn, num_workers=0)

    def get_sigmas(timesteps, n_dim: int, dtype):
        sigmas = noise_scheduler_copy.sigmas.to(device=accelerator.device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(accelerator.device)
        indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps.to(accelerator.device)]
        sigma = sigmas[indices].flatten()
        return sigma.reshape(sigma.shape + (1,) * (n_dim - sigma.ndim))

    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer,
                                                                                 train_dataloader, lr_scheduler)
    shift_factor, scaling_factor = vae.config.shift_factor, vae.config.scaling_factor
    num_train_timesteps = noise_scheduler_copy.config.num_train_timesteps
    num_epochs = math.ceil(steps / len(train_dataloader))
    global_step, step_times, loss_value = 0, [], float("nan")
    for _epoch in range(num_epochs):
        transformer.train()
        for batch in train_dataloader:
            with accelerator.accumulate([transformer]):
                with torch.no_grad():
                    embeddings = encode_prompts(batch["prompts"], accelerator.device)
                model_input = vae.encode(batch["pixel_values"].to(dtype=vae.dtype)).latent_dist.sample()
                model_input = ((model_input - shift_factor) * scaling_factor).to(dtype=weight_dtype)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=bsz,
                                                          logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
                indices = (u * num_train_timesteps).long()
                timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
                noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
                model_pred = predict(transformer, noisy_model_input, timesteps, embeddings)
                weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
                target = noise - model_input
                loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)
                loss = loss.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                loss_value = loss.detach().item()
                step_times.append(time.perf_counter())
            if global_step >= steps:
                break
        if global_step >= steps:
            break
    seconds = time.perf_counter() - start
    direct = (len(step_times) - 1) / (step_times[-1] - step_times[0]) if len(step_times) > 1 else None
    accelerator.end_training()
    return {"seconds": seconds, "steps": global_step, "direct_steps_per_s": direct, "final_loss": loss_value}


def run_plain_flow(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> dict:
    """diffusers' train_dreambooth_lora_sd3.py with per-image captions (two CLIPs + T5, logit-normal times)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    max_sequence_length = 77  # the example's default
    tokenizers = [CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer"),
                  CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer_2"),
                  T5TokenizerFast.from_pretrained(pipeline, subfolder="tokenizer_3")]
    text_encoders = [CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder"),
                     CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder_2"),
                     T5EncoderModel.from_pretrained(pipeline, subfolder="text_encoder_3")]

    def clip_embeddings(tokenizer, text_encoder, prompt: list[str], device):
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = text_encoder(ids.to(device), output_hidden_states=True)
        return out.hidden_states[-2].to(dtype=text_encoder.dtype), out[0]  # penultimate layer, pooled projection

    def encode_prompts(prompt: list[str], device):
        clip = [clip_embeddings(t, e, prompt, device) for t, e in zip(tokenizers[:2], text_encoders[:2], strict=True)]
        clip_embeds = torch.cat([c[0] for c in clip], dim=-1)
        pooled_embeds = torch.cat([c[1] for c in clip], dim=-1)
        t5_ids = tokenizers[2](prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        t5_embeds = text_encoders[2](t5_ids.to(device))[0].to(dtype=text_encoders[2].dtype)
        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        return torch.cat([clip_embeds, t5_embeds], dim=-2), pooled_embeds

    def predict(transformer, noisy, timesteps, embeddings):
        prompt_embeds, pooled = embeddings
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled, return_dict=False)[0]

    return _plain_flow_loop(pipeline, data, resolution, batch_size, rank, steps,
                            transformer_class=SD3Transformer2DModel, lora_targets=SD3_LORA_TARGETS,
                            weighting_scheme="logit_normal", text_encoders=text_encoders,
                            encode_prompts=encode_prompts, predict=predict)


def run_plain_flux(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int) -> dict:
    """diffusers' train_dreambooth_lora_flux.py with per-image captions (CLIP pooled + T5, packed latents,
    guidance embedding)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    clip_tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    t5_tokenizer = T5TokenizerFast.from_pretrained(pipeline, subfolder="tokenizer_2")
    clip_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    t5_encoder = T5EncoderModel.from_pretrained(pipeline, subfolder="text_encoder_2")
    vae_scale_factor = _vae_factor(Path(pipeline))
    guidance_embeds = json.loads((Path(pipeline) / "transformer" / "config.json").read_text())["guidance_embeds"]

    def encode_prompts(prompt: list[str], device):
        """CLIP's pooled output (77 tokens) and T5's last hidden states (max_sequence_length), text ids all 0."""
        clip_ids = clip_tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = clip_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=clip_encoder.dtype)
        t5_ids = t5_tokenizer(prompt, padding="max_length", max_length=FLUX_MAX_SEQUENCE_LENGTH, truncation=True,
                              return_tensors="pt").input_ids
        embeds = t5_encoder(t5_ids.to(device))[0].to(dtype=t5_encoder.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=clip_encoder.dtype)
        return embeds, pooled, text_ids

    def predict(transformer, noisy, timesteps, embeddings):
        prompt_embeds, pooled, text_ids = embeddings
        bsz, channels, height, width = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, noisy.device, noisy.dtype)
        packed = FluxPipeline._pack_latents(noisy, batch_size=bsz, num_channels_latents=channels, height=height,
                                            width=width)
        guidance = torch.tensor([FLUX_GUIDANCE], device=noisy.device).expand(bsz) if guidance_embeds else None
        out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                          img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height=height * vae_scale_factor, width=width * vae_scale_factor,
                                            vae_scale_factor=vae_scale_factor)

    return _plain_flow_loop(pipeline, data, resolution, batch_size, rank, steps,
                            transformer_class=FluxTransformer2DModel, lora_targets=FLUX_LORA_TARGETS,
                            weighting_scheme=FLUX_WEIGHTING, text_encoders=[clip_encoder, t5_encoder],
                            encode_prompts=encode_prompts, predict=predict)


PLAIN = {"unet": run_plain, "flow": run_plain_flow, "flux": run_plain_flux}


# --- the benchmark ------------------------------------------------------------------------------------------


def bench_model(name: str, pipeline: str, data: str, resolution: int, args, work: Path, n1: int, n2: int,
                log, family: str = "unet", kind: str | None = None) -> dict:
    threads = args.threads
    kind = kind or family
    ours = dict(family=family)
    if kind == "flux":  # the plain Flux loop's LoRA targets, time density / weighting, T5 length and guidance
        ours["extra_args"] = ("--lora_layers", ",".join(FLUX_LORA_TARGETS), "--weighting_scheme", FLUX_WEIGHTING,
                              "--max_sequence_length", str(FLUX_MAX_SEQUENCE_LENGTH),
                              "--guidance_scale", str(FLUX_GUIDANCE))
    cache_dir = work / f"cache-{name}"
    common = dict(pipeline=pipeline, data=data, resolution=resolution, batch_size=args.batch_size, rank=args.rank)
    counter = iter(range(10**6))

    def out_dir() -> str:
        return str(work / f"out-{name}-{next(counter)}")

    log(f"[{name}] building the encodings cache (1-step run, cache miss)")
    build = in_child(threads, work / "child.log", run_ours, **common, **ours, steps=1, output_dir=out_dir(),
                     cache_dir=str(cache_dir))
    if not build["cache"] or build["cache"]["misses"] == 0:
        raise RuntimeError(f"the cache-building run did not build anything: {build['cache']}")
    runs: dict[str, list[dict]] = {row: [] for row in ROWS}
    for repeat in range(args.repeats):
        pair: dict[str, dict[int, dict]] = {row: {} for row in ROWS}
        for n in (n1, n2):
            for row in ROWS:
                log(f"[{name}] repeat {repeat + 1}/{args.repeats}: {row}, {n} steps")
                if row == ROW_PLAIN:
                    rec = in_child(threads, work / "child.log", PLAIN[kind], **common, steps=n)
                else:
                    cached = row == ROW_CACHED
                    rec = in_child(threads, work / "child.log", run_ours, **common, **ours, steps=n,
                                   output_dir=out_dir(), cache_dir=str(cache_dir) if cached else None)
                    if cached and rec["cache"]["misses"]:
                        raise RuntimeError(f"the timed cached run missed the cache: {rec['cache']}")
                if rec["steps"] != n:
                    raise RuntimeError(f"{row} ran {rec['steps']} steps, not {n}")
                pair[row][n] = rec
        for row in ROWS:
            a, b = pair[row][n1], pair[row][n2]
            runs[row].append({"n1": a, "n2": b, "steps_per_s": (n2 - n1) / (b["seconds"] - a["seconds"])})
    summary = {}
    for row in ROWS:
        summary[row] = {
            "steps_per_s": statistics.median(r["steps_per_s"] for r in runs[row]),
            "peak_rss_mib": statistics.median(r["n2"]["peak_rss_mib"] for r in runs[row]),
            "growth_mib": statistics.median(r["n2"]["growth_mib"] for r in runs[row]),
            "steps_per_s_min": min(r["steps_per_s"] for r in runs[row]),
            "steps_per_s_max": max(r["steps_per_s"] for r in runs[row]),
        }
    summary[ROW_PLAIN]["direct_steps_per_s"] = statistics.median(r["n2"]["direct_steps_per_s"]
                                                                 for r in runs[ROW_PLAIN])
    hits = [r[k]["cache_seconds"] for r in runs[ROW_CACHED] for k in ("n1", "n2")]
    return {"model": name, "family": family, "kind": kind, "pipeline": pipeline, "resolution": resolution,
            "n1": n1, "n2": n2,
            "cache_build": {"seconds": build["cache_seconds"], "run_seconds": build["seconds"],
                            "peak_rss_mib": build["peak_rss_mib"], "growth_mib": build["growth_mib"],
                            "items": build["cache"]["misses"]},
            "cache_hit_seconds": statistics.median(hits), "summary": summary, "runs": runs}


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def speed_cell(summary: dict, repeats: int) -> str:
    if repeats == 1:
        return fmt(summary["steps_per_s"])
    return f"{fmt(summary['steps_per_s'])} ({fmt(summary['steps_per_s_min'])}-{fmt(summary['steps_per_s_max'])})"


def _kind(result: dict) -> str:
    """"unet", "flow" (SD3) or "flux"."""
    return result.get("kind", result.get("family", "unet"))


def report(results: list[dict], args, params: dict, header: str, elapsed: float) -> str:
    kinds = [k for k in DENOISER if any(_kind(r) == k for r in results)]
    targets = {"unet": "to_q/to_k/to_v/to_out.0 (UNet rows)",
               "flow": "attn.to_q/k/v/out.0 + attn.add_q/k/v_proj/to_add_out (SD3 rows)",
               "flux": "attn.to_q/k/v/out.0 (Flux rows)"}
    plains = {"unet": "the plain loop is diffusers' train_text_to_image_lora.py (UNet rows)",
              "flow": "train_dreambooth_lora_sd3.py with per-image captions (SD3 rows)",
              "flux": f"train_dreambooth_lora_flux.py with per-image captions, weighting '{FLUX_WEIGHTING}', T5 "
                      f"length {FLUX_MAX_SEQUENCE_LENGTH}, guidance {FLUX_GUIDANCE} (Flux rows)"}
    lines = ["# Training throughput: our LoRA trainers (latent cache on / off) vs plain diffusers-example loops", "",
             header, "",
             f"mode: {'quick' if args.quick else 'full'}, family {args.family}; torch threads {args.threads} in every "
             f"row; batch {args.batch_size}, LoRA rank {args.rank} on {' / '.join(targets[k] for k in kinds)}, "
             f"fp32, {args.num_images} images; {'; '.join(plains[k] for k in kinds)}; "
             f"steps/s = (N2 - N1) / (t(N2) - t(N1)) over whole runs (setup cancels), median of "
             f"{args.repeats} repeat(s); peak RSS = ru_maxrss of the N2 run's forked child; growth = peak minus "
             "the child's RSS at start.", ""]
    table = []
    for res in results:
        s = res["summary"]
        plain = s[ROW_PLAIN]
        label = f"{res['model']} ({params[res['model']] / 1e6:.2f}M-param {DENOISER[_kind(res)]})"
        for row in ROWS:
            r = s[row]
            table.append([
                label, f"{res['resolution']} px", f"{res['n1']}/{res['n2']}", row, speed_cell(r, args.repeats),
                fmt(1 / r["steps_per_s"], 3), f"{r['peak_rss_mib']:.0f}", f"{r['growth_mib']:.0f}",
                f"x{r['steps_per_s'] / plain['steps_per_s']:.2f}", f"x{r['peak_rss_mib'] / plain['peak_rss_mib']:.3f}",
            ])
    speed_header = "steps/s" if args.repeats == 1 else "steps/s (min-max)"
    lines.append(markdown_table(["model", "res", "N1/N2", "trainer", speed_header, "s/step", "peak RSS MiB",
                                 "growth MiB", "steps/s vs plain", "peak RSS vs plain"], table))
    lines += ["", "Encodings cache (not in steps/s):", ""]
    cache_rows = []
    for res in results:
        c = res["cache_build"]
        cache_rows.append([res["model"], f"{res['resolution']} px", str(c["items"]), fmt(c["seconds"], 2),
                           fmt(res["cache_hit_seconds"], 2), fmt(c["run_seconds"], 1), f"{c['peak_rss_mib']:.0f}"])
    lines.append(markdown_table(["model", "res", "items", "build s (miss)", "load+verify s (hit)",
                                 "build run total s", "build run peak RSS MiB"], cache_rows))
    lines.append("")
    for res in results:
        s = res["summary"]
        speed = s[ROW_CACHED]["steps_per_s"] / s[ROW_PLAIN]["steps_per_s"]
        memory = s[ROW_CACHED]["peak_rss_mib"] / s[ROW_PLAIN]["peak_rss_mib"]
        lines.append(
            f"- {res['model']} @ {res['resolution']} px, ours cached / plain: steps/s x{speed:.2f} (target >= "
            f"x{TARGET_SPEEDUP}: {'met' if speed >= TARGET_SPEEDUP else 'NOT met'}), peak RSS x{memory:.3f} "
            f"(target <= x1.000: {'met' if memory <= 1.0 else 'NOT met'}); plain loop's step loop timed directly: "
            f"{s[ROW_PLAIN]['direct_steps_per_s']:.2f} steps/s (vs {s[ROW_PLAIN]['steps_per_s']:.2f} by "
            "differencing)."
        )
        uncached_step, cached_step = 1 / s[ROW_UNCACHED]["steps_per_s"], 1 / s[ROW_CACHED]["steps_per_s"]
        share = (uncached_step - cached_step) / uncached_step
        spread = max((s[row]["steps_per_s_max"] - s[row]["steps_per_s_min"]) / s[row]["steps_per_s"]
                     for row in (ROW_CACHED, ROW_UNCACHED))
        resolved = (f"below the {spread:.0%} run-to-run spread of those rows, so not resolved by this run"
                    if args.repeats > 1 and abs(share) < spread else "that share caps what caching can give here")
        lines.append(
            f"  ours cached / ours no cache: steps/s x{uncached_step / cached_step:.2f}, i.e. the "
            f"{ENCODERS[_kind(res)]} encoding was {share:.0%} of our uncached step: {resolved}."
        )
    lines.append(f"- total benchmark wall time {elapsed:.0f} s.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny models only, fewer steps (< 90 s per family)")
    p.add_argument("--family", choices=("unet", "flow", "all"), default="all",
                   help="unet: SD1.5-style UNet trainer; flow: SD3 transformer trainer; all: both (default)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write all numbers to PATH as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every row (default 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="N1/N2 pairs per row, rows interleaved; the median is reported (default 2; quick 1)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank) in every row")
    p.add_argument("--num_images", type=int, default=16, help="images in the demo dataset")
    p.add_argument("--tiny_steps", type=int, nargs=2, metavar=("N1", "N2"), default=None,
                   help="step counts of the tiny UNet model's two runs (default 4 64; quick 2 22)")
    p.add_argument("--small_steps", type=int, nargs=2, metavar=("N1", "N2"), default=(2, 12),
                   help="step counts of the small UNet model's two runs (default 2 12)")
    p.add_argument("--flow_tiny_steps", type=int, nargs=2, metavar=("N1", "N2"), default=None,
                   help="step counts of the tiny SD3 model's two runs (default 4 64; quick 2 22)")
    p.add_argument("--flow_small_steps", type=int, nargs=2, metavar=("N1", "N2"), default=(2, 22),
                   help="step counts of the small SD3 model's two runs (default 2 22)")
    p.add_argument("--flux_steps", type=int, nargs=2, metavar=("N1", "N2"), default=None,
                   help="step counts of the tiny Flux model's two runs (default 4 64; quick 2 22)")
    p.add_argument("--small_resolution", type=int, default=64,
                   help="resolution of the small models (default 64)")
    p.add_argument("--no_small", action="store_true", help="tiny models only (implied by --quick)")
    p.add_argument("--workdir", default=None, help="keep models, data, caches and outputs here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.tiny_steps is None:
        args.tiny_steps = (2, 22) if args.quick else (4, 64)
    if args.flow_tiny_steps is None:
        args.flow_tiny_steps = (2, 22) if args.quick else (4, 64)
    if args.flux_steps is None:
        args.flux_steps = (2, 22) if args.quick else (4, 64)
    for n1, n2 in (args.tiny_steps, args.small_steps, args.flow_tiny_steps, args.flow_small_steps, args.flux_steps):
        if not 1 <= n1 < n2:
            p.error(f"need 1 <= N1 < N2, got {n1} {n2}")
    if args.small_resolution % 16:
        p.error("--small_resolution must be a multiple of 16")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("this benchmark forks one child per run and reads /proc: Linux only")
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="train-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")  # keep the imagefolder arrow files out of ~/.cache

    def log(message: str) -> None:
        print(f"  {time.perf_counter() - began:6.1f} s  {message}", file=sys.stderr, flush=True)

    try:
        preimport()
        header = machine_header()
        small = not (args.quick or args.no_small)
        families = FAMILIES if args.family == "all" else (args.family,)
        log(f"building the tiny (and small) pipelines of {'/'.join(families)} and the demo data")
        flux = "flow" in families
        assets = in_child(args.threads, work / "child.log", build_assets, root=str(work), families=families,
                          small=small, small_resolution=args.small_resolution, num_images=args.num_images,
                          flux=flux)
        # (name, resolution, steps, kind, run when): "always", "small" (not with --quick / --no_small)
        models = {"unet": [("tiny", 64, args.tiny_steps, "unet", "always"),
                           ("small", args.small_resolution, args.small_steps, "unet", "small")],
                  "flow": [("tiny-sd3", 64, args.flow_tiny_steps, "flow", "always"),
                           ("small-sd3", args.small_resolution, args.flow_small_steps, "flow", "small"),
                           ("tiny-flux", 64, args.flux_steps, "flux", "always")]}
        wanted = {"always": True, "small": small}
        results = []
        for family in families:
            for name, resolution, steps, kind, when in models[family]:
                if wanted[when]:
                    results.append(bench_model(name, assets["pipelines"][name], assets["data"][resolution],
                                               resolution, args, work, *steps, log, family=family, kind=kind))
        elapsed = time.perf_counter() - began
        print(report(results, args, assets["params"], header, elapsed))
        if args.json:
            payload = {"header": header, "args": vars(args), "denoiser_params": assets["params"],
                       "elapsed_s": elapsed, "results": results}
            Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
