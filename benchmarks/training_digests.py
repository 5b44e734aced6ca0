"""Digests of the LoRA files and losses of short fixed-seed training runs: the evidence that a change to the
training library keeps its behaviour bitwise.

Run: ``python benchmarks/training_digests.py --json before.json`` on one commit, the same with ``after.json`` on
another, then ``python benchmarks/training_digests.py --compare before.json after.json``. CPU, one torch thread,
about 30 s. Digests are bitwise facts of this machine's float arithmetic: compare files made on the same machine
and torch build.

The runs (4 optimizer steps each, tiny offline pipelines, 6 generated images): SD1.5-style UNet with epsilon,
v-prediction and v + zero terminal SNR (uncached and cached; with min-SNR, offset noise, input perturbation and a
timestep shift; with debiased weighting, text-encoder LoRA and gradient accumulation), the UNet as a rectified
flow (plain and preconditioned), SDXL (v + ZTSNR; cached with EMA), SD3 (plain, cached, mode density with a static
shift) and Flux (plain; cached with the resolution-dependent shift). Five of them are also resumed from their
step-2 checkpoint: a resumed run must equal its uninterrupted twin.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

UNET_ZTSNR = ["--prediction_type", "v_prediction", "--zero_terminal_snr"]
RUNS = {
    "unet_eps": ("unet", "sd15", []),
    "unet_v": ("unet", "sd15", ["--prediction_type", "v_prediction"]),
    "unet_v_ztsnr": ("unet", "sd15", UNET_ZTSNR),
    "unet_v_ztsnr_cached": ("unet", "sd15", [*UNET_ZTSNR, "--cache_latents"]),
    "unet_v_ztsnr_extras": ("unet", "sd15", [*UNET_ZTSNR, "--snr_gamma", "5", "--noise_offset", "0.05",
                                             "--input_perturbation", "0.1", "--timestep_shift", "2"]),
    "unet_eps_debiased_te": ("unet", "sd15", ["--debiased_estimation", "--train_text_encoder",
                                              "--gradient_accumulation_steps", "2"]),
    "unet_flow": ("unet", "sd15", [*UNET_ZTSNR, "--objective", "flow"]),
    "unet_flow_precond": ("unet", "sd15", [*UNET_ZTSNR, "--objective", "flow", "--weighting_scheme", "cosmap",
                                           "--precondition_outputs", "1"]),
    "sdxl_v_ztsnr": ("unet", "sdxl", UNET_ZTSNR),
    "sdxl_cached_ema": ("unet", "sdxl", ["--cache_latents", "--use_ema"]),
    "sd3": ("flow", "sd3", []),
    "sd3_cached": ("flow", "sd3", ["--cache_latents"]),
    "sd3_mode_shift": ("flow", "sd3", ["--weighting_scheme", "mode", "--timestep_shift", "3"]),
    "flux": ("flow", "flux", []),
    "flux_dynamic_cached": ("flow", "flux", ["--timestep_shift", "dynamic", "--cache_latents",
                                             "--weighting_scheme", "sigma_sqrt"]),
}
RESUMED = ("unet_v_ztsnr", "unet_v_ztsnr_cached", "unet_eps_debiased_te", "sdxl_cached_ema", "sd3")


def digest(folder: Path) -> dict[str, str]:
    """sha256 (first 16 hex digits) of every tensor, in key order, of each safetensors file in ``folder``."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        state = load_file(path)
        h = hashlib.sha256()
        for key in sorted(state):
            h.update(key.encode())
            h.update(state[key].float().contiguous().numpy().tobytes())
        out[path.name] = h.hexdigest()[:16]
    return out


def flags(root: Path, assets: dict[str, Path], model: str, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(assets[model]), "--train_data_dir", str(assets["data"]),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4", "--center_crop",
            "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "4", "--report_to", "none",
            "--checkpointing_steps", "2", "--seed", "7", "--cache_latents_dir", str(root / "cache")]


def resume_copy(out: Path, main, argv: list[str]) -> dict:
    """Resume a copy of ``out`` from its step-2 checkpoint to step 4."""
    copy = out.with_name(out.name + "_resumed")
    shutil.copytree(out, copy)
    for path in copy.iterdir():
        if path.name.startswith("checkpoint-") and path.name != "checkpoint-2":
            shutil.rmtree(path)
    for path in copy.glob("*.safetensors"):
        path.unlink()
    argv = [copy if a == str(out) else a for a in argv]
    result = main([str(a) for a in argv] + ["--resume_from_checkpoint", "latest", "--resume_despite_changes"])
    return {"lora": digest(copy), "losses": [float(x).hex() for x in result["losses"]]}


def record(root: Path) -> dict[str, dict]:
    try:
        from diffusers_ztsnr.testing.demo_data import make_demo_dataset
        from diffusers_ztsnr.testing.tiny import save_tiny_pipeline
    except ImportError:  # releases before diffusers_ztsnr.testing kept the fixtures at the package root
        from diffusers_ztsnr.demo_data import make_demo_dataset
        from diffusers_ztsnr.tiny import save_tiny_pipeline
    from diffusers_ztsnr.training.flow import main as flow_main
    from diffusers_ztsnr.training.unet import main as unet_main

    assets = {kind: save_tiny_pipeline(kind, root / kind) for kind in ("sd15", "sdxl", "sd3", "flux")}
    assets["data"] = make_demo_dataset(root / "data", num_images=6, size=32)
    results = {}
    for name, (script, model, extra) in RUNS.items():
        main = unet_main if script == "unet" else flow_main
        argv = flags(root, assets, model, root / name) + extra
        result = main(argv)
        results[name] = {"lora": digest(root / name), "losses": [float(x).hex() for x in result["losses"]]}
        if name in RESUMED:
            results[name + "_resumed"] = resume_copy(root / name, main, argv)
        print(f"{name}: {results[name]['lora']}", flush=True)
    return results


def compare(before: dict, after: dict) -> int:
    """Print the runs whose LoRA or losses differ; returns how many differ or are missing."""
    bad = 0
    for name in before:
        if name not in after:
            print(f"missing: {name}")
            bad += 1
        elif before[name] != after[name]:
            print(f"differs: {name} (LoRA equal: {before[name]['lora'] == after[name]['lora']}, "
                  f"losses equal: {before[name]['losses'] == after[name]['losses']})")
            bad += 1
    twins = [n for n in after if n.endswith("_resumed") and after[n]["lora"] != after[n[:-8]]["lora"]]
    for name in twins:
        print(f"resume not exact: {name}")
    print("all equal" if not bad else f"{bad} of {len(before)} differ or are missing")
    return bad + len(twins)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--json", type=str, default=None, help="write the digests to this file")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                        help="compare two digest files instead of training")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        return 1 if compare(before, after) else 0
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        results = record(Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
