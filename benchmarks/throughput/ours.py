"""A row of our trainers: ``diffusers_ztsnr.training.unet`` / ``.flow`` ``main`` with the row's flags."""

from __future__ import annotations

import time


def run_ours(pipeline: str, data: str, resolution: int, batch_size: int, rank: int, steps: int, output_dir: str,
             cache_dir: str | None, family: str = "unet", extra_args: tuple[str, ...] = ()) -> dict:
    """One run of our trainer (``--cache_latents`` into ``cache_dir`` when given): its seconds, steps, cache
    report, the seconds spent building the encodings cache (on a miss) and the last loss."""
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
