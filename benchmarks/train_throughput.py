"""Training throughput: steps/s and peak memory of our LoRA trainers (latent cache on / off) vs plain loops.

Run: ``python benchmarks/train_throughput.py`` (``--family unet|flow|all``, default all: about 4 min for unet and
6 min for flow (SD3 + Flux) on a 2-core machine; ``--quick`` for a smoke run on the tiny models only (tiny-flux
included), about 1.5 min for both families; ``--json PATH`` to dump every number). CPU, Linux (the runs are
forked children, see below). This file is the entry point; the forked runs, the pipelines, our rows, the plain
loops and the report are in ``benchmarks/throughput/``.

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

``--device cuda`` runs the GPU rows instead (:mod:`throughput.gpu`): SD1.5 and SD3-medium architectures with
random weights at 512 px in bf16, diffusers' example loops beside ours cached, compiled and on quantized bases, in
one process; about 8 minutes on an H200, within ``--budget``; ``--gpu_scale tiny`` smoke-tests those rows on a
CPU.

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
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# measure the checkout this file lives in, whatever `pip install -e` points at
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import machine_header  # noqa: E402
from throughput.assets import build_assets  # noqa: E402
from throughput.bench import bench_model  # noqa: E402
from throughput.children import in_child, preimport  # noqa: E402
from throughput.report import report  # noqa: E402
from throughput.trainer_settings import FAMILIES  # noqa: E402


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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the tiny/small rows above; cuda: the GPU rows of throughput/gpu.py (real SD1.5 and "
                        "SD3-medium architectures, random weights, 512 px bf16)")
    p.add_argument("--gpu_scale", choices=("real", "tiny"), default="real",
                   help="with --device cuda: tiny runs the same rows on tiny models (a smoke test, also on a CPU)")
    p.add_argument("--budget", type=float, default=480, help="with --device cuda: seconds; rows that would end "
                   "later are skipped (default 480)")
    p.add_argument("--rows", nargs="+", default=None, help="with --device cuda: only these rows, in this order "
                   "(names as in throughput/gpu.py ORDER, plus full-sd3)")
    p.add_argument("--out", default="gpu-throughput", help="with --device cuda: folder for the table, JSON and "
                   "the SD3 profile (default ./gpu-throughput)")
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


def main_gpu(args: argparse.Namespace) -> None:
    """The GPU rows (:mod:`throughput.gpu`); the table is printed and written to ``--out``."""
    from throughput.gpu import run_gpu_rows

    began = time.perf_counter()
    real = args.gpu_scale == "real"
    if real and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU (--gpu_scale tiny smoke-tests the rows on the CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {"scale": args.gpu_scale, "device": device, "resolution": 512 if real else 32,
                "batch_size": args.batch_size, "rank": args.rank, "steps": 40 if real else 14,
                "skip": 10 if real else 4, "num_images": 64 if real else 8, "budget": args.budget,
                "precision": "bf16", "out": args.out, "rows": args.rows,
                "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU"}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")

    def log(message: str) -> None:
        print(f"  {time.perf_counter() - began:6.1f} s  {message}", file=sys.stderr, flush=True)

    try:
        run_gpu_rows(settings, work, began, log)
        print((Path(args.out) / "gpu_throughput.md").read_text())
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda":
        return main_gpu(args)
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
