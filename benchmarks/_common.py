"""Shared by the benchmark scripts: machine description and markdown tables."""

import datetime
import os
import platform

import diffusers
import torch


def cpu_name() -> str:
    """``platform.processor()``, or the model name from /proc/cpuinfo where that is empty (Linux)."""
    name = platform.processor()
    if not name or name in ("x86_64", "aarch64"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return name or platform.machine()


def machine_header() -> str:
    return (
        f"machine: {cpu_name()} ({os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}), "
        f"python {platform.python_version()}, torch {torch.__version__} (threads {torch.get_num_threads()}), "
        f"diffusers {diffusers.__version__}, date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
