"""The streaming-data flags (``--train_data_shards``, ``--streaming``, ``--stream_retries``), their checks, and the
stages of a streaming run: the source, the loader, and the stream position a checkpoint holds.

Registered through :mod:`.data_flags` (both scripts). A stream has no known length, so a streaming run needs
``--max_train_steps``; it runs as one endless epoch in the loop (the stream counts its own epochs), and resumes at
the sample recorded in the checkpoint's ``stream_state.json`` (one position per process).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .arguments import InputError

STREAM_STATE_FILE = "stream_state.json"


def add_stream_flags(parser: argparse.ArgumentParser) -> None:
    """``--train_data_shards``, ``--streaming`` and ``--stream_retries``."""
    a = parser.add_argument
    a("--train_data_shards", type=shard_spec, nargs="+", default=None,
      help="webdataset-style tar shards to stream instead of --train_data_dir: local paths, http(s) URLs or "
           "fsspec URLs (s3://...), {000000..000009} ranges expanded; each sample is <key>.jpg|png|webp with "
           "<key>.txt or <key>.json. Needs --max_train_steps.")
    a("--streaming", action="store_true",
      help="stream --dataset_name (datasets' streaming=True) instead of loading it whole; needs --max_train_steps.")
    a("--stream_retries", type=int, default=3,
      help="times a failed shard (read error, truncated tar, HTTP error) is retried before the run stops.")


def shard_spec(value: str) -> str | list[str]:
    """One ``--train_data_shards`` value: a path or URL, or a JSON list of them (a ``--config`` file's list)."""
    if not value.startswith("["):
        return value
    try:
        names = json.loads(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a JSON list of shards ({error})") from error
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise argparse.ArgumentTypeError("give a non-empty list of shard paths or URLs")
    return names


shard_spec.structured = True  # a --config file may give a list (arguments.config_tokens)


def is_streaming(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "train_data_shards", None) or getattr(args, "streaming", False))


def stream_flag_problems(args: argparse.Namespace) -> list[str]:
    """Problems with the streaming flags (returned, like ``check_common_args``)."""
    problems = []
    if args.stream_retries < 0:
        problems.append(f"--stream_retries must be >= 0 (got {args.stream_retries})")
    if args.train_data_shards and (args.train_data_dir or args.dataset_name or args.datasets):
        problems.append("--train_data_shards replaces --train_data_dir / --dataset_name / datasets: pass one")
    if args.streaming and not args.dataset_name:
        problems.append("--streaming streams --dataset_name: add it (tar shards go in --train_data_shards)")
    if not is_streaming(args):
        return problems
    if args.max_train_steps is None:
        problems.append("a streamed dataset has no known length: give --max_train_steps")
    problems += _missing_shards(args)
    refused = {"cache_latents": "caching needs a finite dataset", "datasets": "a datasets: list is map-style",
               "with_prior_preservation": "class images are map-style", "max_train_samples": "cut the shard list",
               "masked_loss": "masks are not read from shards", "mask_column": "masks are not read from shards",
               "cond_image_column": "references are not read from shards"}
    for flag, why in refused.items():
        if getattr(args, flag, None):
            problems.append(f"--{flag} does not work with streaming data ({why}): drop it, or train from "
                            "--train_data_dir")
    return problems


def _missing_shards(args: argparse.Namespace) -> list[str]:
    """Local shards that do not exist (URLs are checked when the run fingerprints them)."""
    from .data.shards import expand_shards

    specs = [n for v in args.train_data_shards or [] for n in ([v] if isinstance(v, str) else v)]
    try:
        names = expand_shards(specs)
    except ValueError as error:
        return [str(error)]
    missing = [n for n in names if "://" not in n and not Path(n).expanduser().is_file()]
    if not missing:
        return []
    more = f" (and {len(missing) - 1} more of {len(names)})" if len(missing) > 1 else ""
    return [f"--train_data_shards {missing[0]}: no such file{more}"]


def load_stream(args: argparse.Namespace) -> Any:
    """The streaming dataset of this process (rank ``i`` of ``world`` reads shards ``i::world``)."""
    from accelerate import PartialState

    from .data import ImageTransform, make_buckets
    from .data.shards import HubStream, TarShards, expand_shards
    from .data.streaming import StreamingImageCaptionDataset

    if args.train_data_shards:
        specs = [n for v in args.train_data_shards for n in ([v] if isinstance(v, str) else v)]
        source: Any = TarShards(expand_shards(specs), args.caption_column)
    else:
        source = HubStream(args.dataset_name, args.dataset_config_name, "train", args.image_column,
                           args.caption_column, args.cache_dir)
    buckets = make_buckets(args.resolution, step=64 if args.resolution >= 256 else 8) if args.bucketing else None
    transform = ImageTransform(args.resolution, args.center_crop, args.random_flip)
    return StreamingImageCaptionDataset(source, transform=transform, batch_size=args.train_batch_size,
                                        seed=args.seed, buckets=buckets, rank=PartialState().process_index,
                                        world=PartialState().num_processes, retries=args.stream_retries)


def stream_loader(args: argparse.Namespace, dataset: Any, options: dict[str, Any]) -> Any:
    from .data.streaming import StreamLoader

    return StreamLoader(dataset, num_workers=int(options.get("num_workers", 0)),
                        pin_memory=bool(options.get("pin_memory", False)))


def save_stream_state(loader: Any, folder: str) -> None:
    """Write every process's stream position (gathered before the checkpoint) into the checkpoint folder."""
    (Path(folder) / STREAM_STATE_FILE).write_text(json.dumps({"positions": loader.gathered}))


def load_stream_state(loader: Any, folder: Path, rank: int, world: int) -> None:
    """Start this process's stream at the position ``folder`` recorded for it (the same number of processes)."""
    path = Path(folder) / STREAM_STATE_FILE
    if not path.is_file():
        raise InputError(f"{folder} has no {STREAM_STATE_FILE}: it was not written by a streaming run")
    positions = json.loads(path.read_text())["positions"]
    if len(positions) != world:
        raise InputError(f"{folder} was written by {len(positions)} process(es), this run has {world}: resume "
                         "a streaming run with as many processes as it had")
    loader.start_at(positions[rank])
