"""Every run is a child forked from a parent that already imported the libraries; its peak RSS is its own."""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import traceback
from pathlib import Path

import torch


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
    """This process's resident set now (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident set (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

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
    """``fn(**kwargs)`` in a forked child on ``threads`` torch threads, its output to ``log_path``: the dict it
    returns plus the child's RSS at start, its peak and the growth; a failure raises here with the log's tail."""
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

