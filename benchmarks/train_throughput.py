"""Training throughput: steps/s and peak memory of our LoRA trainer (latent cache on / off) vs a plain loop.

Run: ``python benchmarks/train_throughput.py`` (``--quick`` for a smoke run on the tiny model only, < 90 s;
``--json PATH`` to dump every number). CPU, Linux (the runs are forked children, see below).

Rows, side by side on the same data, batch size, LoRA rank, resolution and number of steps:

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

Both trainers are epsilon-prediction MSE in fp32 with gradient clipping at 1.0, ``dataloader_num_workers=0``.

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

Models: the tiny SD1.5-style pipeline of :func:`diffusers_ztsnr.tiny.save_tiny_pipeline` ("sd15") at 64 px,
and a "small" one: the same pipeline folder with its UNet replaced by a larger ``UNet2DConditionModel``
(block_out_channels (64, 128, 256), 2 layers per block, 8 heads, cross-attention dim 32 = the tiny text
encoder's width, cross-attention in the two lower levels only, as in SDXL's layout) at ``--small_resolution``
(default 64 px: at 128 px one training step of it took ~8 s on one thread of the 2-core machine this was
written on, too slow for a few-minute run). The tiny VAE has a spatial factor of 2, so 64 px images are
32 x 32 latents.

Reading the result: caching removes the VAE encode and the text encoder from every step and nothing else,
so what it can give is capped by their share of a step, which is set by the model, not by the trainer: the
small model keeps the tiny VAE (two blocks of 32 / 64 channels) under a 24x larger UNet, so its share is
small; a real SD1.5 at 512 px has its own ratio, which these tiny models do not represent. The printed notes
give ours-cached / ours-uncached and the share it implies. On a shared CPU, differences of ~5-10 % between
rows can be run-to-run noise.
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
    import diffusers_ztsnr.training.unet  # noqa: F401

    for name in ("StableDiffusionPipeline", "AutoencoderKL", "UNet2DConditionModel", "DDPMScheduler"):
        getattr(diffusers, name)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


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


def build_assets(root: str, small: bool, small_resolution: int, num_images: int) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from diffusers_ztsnr.demo_data import make_demo_dataset
    from diffusers_ztsnr.tiny import save_tiny_pipeline

    root = Path(root)
    tiny = save_tiny_pipeline("sd15", root / "tiny-sd15")
    out = {"tiny": str(tiny), "data": {}, "unet_params": {}}
    out["unet_params"]["tiny"] = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny / "unet")
                                     .parameters())
    resolutions = {64} | ({small_resolution} if small else set())
    for res in sorted(resolutions):
        out["data"][res] = str(make_demo_dataset(root / f"data-{res}", num_images=num_images, size=res))
    if small:
        folder = root / "small-sd15"
        shutil.copytree(tiny, folder)
        width = CLIPTextConfig.from_pretrained(tiny / "text_encoder").hidden_size
        vae_factor = 2 ** (len(json.loads((tiny / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**small_unet_config(width, small_resolution // vae_factor))
        shutil.rmtree(folder / "unet")
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        out["small"] = str(folder)
        out["unet_params"]["small"] = sum(p.numel() for p in unet.parameters())
    return out


# --- the runs -----------------------------------------------------------------------------------------------


def run_ours(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int, output_dir: str,
             cache_dir: str | None) -> dict:
    import diffusers_ztsnr.training.data as data_module
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


# --- the benchmark ------------------------------------------------------------------------------------------


def bench_model(name: str, pipeline: str, data: str, resolution: int, args, work: Path, n1: int, n2: int,
                log) -> dict:
    threads = args.threads
    cache_dir = work / f"cache-{name}"
    common = dict(pipeline=pipeline, data=data, resolution=resolution, batch_size=args.batch_size, rank=args.rank)
    counter = iter(range(10**6))

    def out_dir() -> str:
        return str(work / f"out-{name}-{next(counter)}")

    log(f"[{name}] building the encodings cache (1-step run, cache miss)")
    build = in_child(threads, work / "child.log", run_ours, **common, steps=1, output_dir=out_dir(),
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
                    rec = in_child(threads, work / "child.log", run_plain, **common, steps=n)
                else:
                    cached = row == ROW_CACHED
                    rec = in_child(threads, work / "child.log", run_ours, **common, steps=n, output_dir=out_dir(),
                                   cache_dir=str(cache_dir) if cached else None)
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
    return {"model": name, "pipeline": pipeline, "resolution": resolution, "n1": n1, "n2": n2,
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


def report(results: list[dict], args, unet_params: dict, header: str, elapsed: float) -> str:
    lines = ["# Training throughput: our LoRA trainer (latent cache on / off) vs a plain diffusers-example loop", "",
             header, "",
             f"mode: {'quick' if args.quick else 'full'}; torch threads {args.threads} in every row; batch "
             f"{args.batch_size}, LoRA rank {args.rank} on to_q/to_k/to_v/to_out.0, fp32, {args.num_images} "
             f"images; steps/s = (N2 - N1) / (t(N2) - t(N1)) over whole runs (setup cancels), median of "
             f"{args.repeats} repeat(s); peak RSS = ru_maxrss of the N2 run's forked child; growth = peak minus "
             "the child's RSS at start.", ""]
    table = []
    for res in results:
        s = res["summary"]
        plain = s[ROW_PLAIN]
        label = f"{res['model']} ({unet_params[res['model']] / 1e6:.2f}M-param UNet)"
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
            f"  ours cached / ours no cache: steps/s x{uncached_step / cached_step:.2f}, i.e. the VAE + text "
            f"encoding was {share:.0%} of our uncached step: {resolved}."
        )
    lines.append(f"- total benchmark wall time {elapsed:.0f} s.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model only, fewer steps (< 90 s)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write all numbers to PATH as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every row (default 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="N1/N2 pairs per row, rows interleaved; the median is reported (default 2; quick 1)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank) in every row")
    p.add_argument("--num_images", type=int, default=16, help="images in the demo dataset")
    p.add_argument("--tiny_steps", type=int, nargs=2, metavar=("N1", "N2"), default=None,
                   help="step counts of the tiny model's two runs (default 4 64; quick 2 22)")
    p.add_argument("--small_steps", type=int, nargs=2, metavar=("N1", "N2"), default=(2, 12),
                   help="step counts of the small model's two runs (default 2 12)")
    p.add_argument("--small_resolution", type=int, default=64, help="resolution of the small model (default 64)")
    p.add_argument("--no_small", action="store_true", help="tiny model only (implied by --quick)")
    p.add_argument("--workdir", default=None, help="keep models, data, caches and outputs here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.tiny_steps is None:
        args.tiny_steps = (2, 22) if args.quick else (4, 64)
    for n1, n2 in (args.tiny_steps, args.small_steps):
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
        log("building the tiny (and small) pipelines and the demo data")
        assets = in_child(args.threads, work / "child.log", build_assets, root=str(work), small=small,
                          small_resolution=args.small_resolution, num_images=args.num_images)
        results = [bench_model("tiny", assets["tiny"], assets["data"][64], 64, args, work, *args.tiny_steps, log)]
        if small:
            results.append(bench_model("small", assets["small"], assets["data"][args.small_resolution],
                                       args.small_resolution, args, work, *args.small_steps, log))
        elapsed = time.perf_counter() - began
        print(report(results, args, assets["unet_params"], header, elapsed))
        if args.json:
            payload = {"header": header, "args": vars(args), "unet_params": assets["unet_params"],
                       "elapsed_s": elapsed, "results": results}
            Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
