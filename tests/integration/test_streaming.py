"""Streaming training data: webdataset-style tar shards (local and over HTTP) and ``datasets`` streaming.

* an epoch serves every sample once, in batches of one bucket, each rank reading its own shards (``i::world``);
* a stream started from a mid-epoch position (samples waiting in bucket buffers) yields exactly the remaining
  batches; a training run interrupted at a checkpoint and resumed gives the uninterrupted run's losses and LoRA
  bitwise;
* shards over HTTP give the local shards' batches; the run identity holds shard names and sizes;
* a truncated tar or a vanished shard is retried, then a one-line error naming the shard; a transient failure is
  retried from the sample where it stopped (no sample lost or repeated);
* a ``--dataset_name`` folder with ``--streaming``; bad flag combinations are one-line errors.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ztsnr.training.arguments import InputError
from diffusers_ztsnr.training.data import ImageTransform
from diffusers_ztsnr.training.data import shards as shards_module
from diffusers_ztsnr.training.data.shards import StreamError, TarShards, expand_shards
from diffusers_ztsnr.training.data.streaming import StreamingImageCaptionDataset, StreamState
from diffusers_ztsnr.training.unet import main, parse_args
from tests.train_utils import REPO, RES, launch_two_cpu_processes, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")
SIZES = [(RES, 2 * RES), (2 * RES, RES), (RES, RES)]  # (h, w): wide, tall, square


def _png(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, num_shards: int = 3, per_shard: int = 5) -> str:
    """``shard-{000000..}.tar`` of ``per_shard`` samples each (sizes cycling through :data:`SIZES`); captions in
    ``.txt``, every third sample's in ``.json`` as a list of two alternatives. Returns the brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(num_shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                _add(tar, f"{key}.png", _png(rng, SIZES[(s + i) % 3]))
                if i % 3 == 2:
                    _add(tar, f"{key}.json", json.dumps({"text": [f"{key} one", f"{key} two"]}).encode())
                else:
                    _add(tar, f"{key}.txt", f"caption {key}".encode())
    return str(folder / f"shard-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return {**tiny_assets(root, "sd15", "sd3"), "shards": write_shards(root / "shards")}


def stream(spec, *, batch_size=2, rank=0, world=1, buckets=SIZES, retries=0, seed=3):
    transform = ImageTransform(RES, center_crop=False, random_flip=True)
    return StreamingImageCaptionDataset(TarShards(expand_shards(spec)), transform=transform, batch_size=batch_size,
                                        seed=seed, buckets=buckets, rank=rank, world=world, retries=retries)


def epoch(ds, state=None):
    return list(ds.epoch_batches(state or StreamState()))


def test_an_epoch_serves_every_sample_once_in_one_bucket_per_batch(assets):
    assert expand_shards("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    batches = epoch(stream(assets["shards"]))
    captions = [next(w for w in c.split() if w.startswith("s")) for b in batches for c in b["caption"]]
    assert sorted(captions) == sorted(f"s{s}_{i:03d}" for s in range(3) for i in range(5))
    for b in batches:
        sizes = {tuple(map(int, s)) for s in b["original_size"]}
        assert len(sizes) == 1 and b["pixel_values"].shape[0] == len(b["caption"])
        assert tuple(b["pixel_values"].shape[2:]) == next(iter(sizes))  # at the bucket of its aspect ratio
    assert sum(len(b["caption"]) == 2 for b in batches) >= 5  # full batches; leftovers close the epoch
    ranks = [[c for b in epoch(stream(assets["shards"], rank=r, world=2)) for c in b["caption"]] for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 15
    with pytest.raises(InputError, match=r"3 shard\(s\) for 4 processes"):
        stream(assets["shards"], world=4)
    order = stream(assets["shards"], rank=0, world=2)
    assert {tuple(order.shard_order(e)) for e in range(6)} != {tuple(order.shard_order(0))}  # shuffled per epoch


def test_a_stream_started_mid_epoch_yields_the_remaining_batches(assets):
    ds = stream(assets["shards"])
    full = epoch(ds)
    cut = next(k for k, b in enumerate(full) if b["stream_state"]["pending"])  # samples waiting in buffers
    resumed = epoch(ds, StreamState.from_dict(full[cut]["stream_state"]))
    assert len(resumed) == len(full) - cut - 1
    for got, want in zip(resumed, full[cut + 1:], strict=True):
        assert got["caption"] == want["caption"] and got["stream_state"] == want["stream_state"]
        assert torch.equal(got["pixel_values"], want["pixel_values"])  # same crops and flips
    def pixels(batches):
        return {c.split()[-2 if c.endswith(("one", "two")) else -1]: b["pixel_values"][n]
                for b in batches for n, c in enumerate(b["caption"])}

    first, second = pixels(full), pixels(epoch(ds, StreamState(1)))
    assert first.keys() == second.keys()  # each epoch serves every sample; crops and flips are drawn anew
    assert sum(not torch.equal(first[k], second[k]) for k in first) >= 5


def test_a_worker_process_gives_the_same_batches_and_positions(assets):
    from diffusers_ztsnr.training.data.streaming import StreamLoader

    runs = []
    for workers in (0, 1):
        loader = StreamLoader(stream(assets["shards"]), num_workers=workers)
        loader.start_at({"epoch": 0, "cursor": [1, 2], "pending": []})
        batches, positions = [], []
        for batch in loader:
            batches.append(batch)
            positions.append(loader.position)
            if len(batches) == 6:  # past the end of epoch 0
                break
        runs.append((batches, positions))
    (a, pa), (b, pb) = runs
    assert pa == pb and pa[-1]["epoch"] == 1
    assert all(x["caption"] == y["caption"] and torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in
               zip(a, b, strict=True))


def _flags(assets, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_shards", assets["shards"],
            "--output_dir", str(out), "--resolution", str(RES), "--train_batch_size", "2", "--max_train_steps",
            str(steps), "--checkpointing_steps", "3", "--report_to", "none", "--learning_rate", "1e-3",
            "--prediction_type", "v_prediction", "--zero_terminal_snr", "--bucketing", "--random_flip", *extra]


def test_an_interrupted_streaming_run_resumes_bitwise(assets, tmp_path):
    dropout = ("--caption_dropout", "0.3")  # drawn per step, as for a folder
    full = main(_flags(assets, tmp_path / "full", 9, *dropout))
    out = tmp_path / "out"
    main(_flags(assets, out, 3, *dropout))
    positions = json.loads((out / "checkpoint-3" / "stream_state.json").read_text())["positions"]
    assert len(positions) == 1 and positions[0]["epoch"] == 0
    assert positions[0]["pending"]  # samples waiting in a bucket buffer: the resume must re-read them
    resumed = main(_flags(assets, out, 9, *dropout, "--resume_from_checkpoint", "latest"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert len(resumed["losses"]) == 6 and summary["losses"] == full["losses"]  # 9 steps: over an epoch boundary
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors"), load_file(
        out / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    identity = json.loads((out / "run_identity.json").read_text())
    assert identity["data"] == stream(assets["shards"]).fingerprint()


def test_shards_over_http_or_fsspec_give_the_local_batches(assets, tmp_path):
    folder = Path(expand_shards(assets["shards"])[0]).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/shard-{{000000..000002}}.tar"
        remote, local = stream(url), stream(assets["shards"])
        for got, want in zip(epoch(remote), epoch(local), strict=True):
            assert got["caption"] == want["caption"] and torch.equal(got["pixel_values"], want["pixel_values"])
        sizes = [shards_module.shard_size(n) for n in expand_shards(url)]
        assert sizes == [Path(n).stat().st_size for n in expand_shards(assets["shards"])]  # Content-Length
        assert remote.fingerprint() != local.fingerprint()
        via_fsspec = stream("file://" + assets["shards"])  # other schemes go through fsspec
        assert [b["caption"] for b in epoch(via_fsspec)] == [b["caption"] for b in epoch(local)]
    finally:
        server.shutdown()


def test_samples_without_caption_or_image_are_skipped_and_reported(tmp_path):
    rng = np.random.default_rng(1)
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for key, files in [("ok1", {"png": _png(rng, (RES, RES)), "txt": b"one"}),
                           ("nocap", {"png": _png(rng, (RES, RES))}),
                           ("broken", {"png": b"not a png", "txt": b"broken"}),
                           ("ok2", {"png": _png(rng, (RES, RES)), "json": b'{"caption": "two"}'})]:
            for ext, data in files.items():
                _add(tar, f"{key}.{ext}", data)
    from diffusers_ztsnr.training.data.streaming import StreamLoader

    ds = stream(str(tmp_path / "mixed.tar"), buckets=None)
    loader = StreamLoader(ds, num_workers=1)  # skips are reported from a worker process too
    assert [c for _, b in zip(range(1), loader, strict=False) for c in b["caption"]] == ["one", "two"]
    assert [n.split(":")[-1] for n, _ in ds.report.missing_captions] == ["nocap"]
    assert [n.split(":")[-1] for n, _ in ds.report.bad_images] == ["broken"]
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        _add(tar, "a.png", b"not a png")
        _add(tar, "a.txt", b"caption")
    with pytest.raises(StreamError, match="no usable sample in 1 shard"):
        next(iter(stream(str(tmp_path / "bad.tar"))))


def test_a_failing_shard_is_retried_then_named(assets, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shards_module, "BACKOFF_SECONDS", 0.0)
    spec = write_shards(tmp_path / "bad", num_shards=2, per_shard=4)
    names = expand_shards(spec)
    data, before = Path(names[1]).read_bytes(), stream(spec).fingerprint()
    Path(names[1]).write_bytes(data[: len(data) // 2])  # cut mid-member
    assert stream(spec).fingerprint() != before  # the run identity sees the new size
    with pytest.raises(StreamError) as error:
        epoch(stream(spec, retries=2))
    message = str(error.value)
    assert names[1] in message and "after 3 tries" in message and "\n" not in message
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    end = data.rindex(b"caption s1_003") + 512  # cut at a member boundary: only the end blocks are missing
    Path(names[1]).write_bytes(data[: end - end % 512])
    with pytest.raises(StreamError, match="truncated"):
        epoch(stream(spec))
    Path(names[1]).unlink()  # a shard that disappears after the run listed it
    with pytest.raises(StreamError, match=f"shard {names[1]} failed at sample 0"):
        epoch(stream(spec))


def test_a_transient_failure_resumes_at_the_sample_it_owed(assets, monkeypatch):
    monkeypatch.setattr(shards_module, "BACKOFF_SECONDS", 0.0)
    want = [c for b in epoch(stream(assets["shards"])) for c in b["caption"]]
    read, failed = TarShards.read, []

    def flaky(self, shard, start):
        for sample in read(self, shard, start):
            if sample.offset == 2 and not failed:
                failed.append(shard)
                raise OSError("connection reset")
            yield sample

    monkeypatch.setattr(TarShards, "read", flaky)
    got = [c for b in epoch(stream(assets["shards"], retries=1)) for c in b["caption"]]
    assert failed and got == want


def test_a_datasets_folder_streams(assets, tmp_path):
    from diffusers_ztsnr.training.data.shards import HubStream

    rows = [json.loads(line) for line in (assets["data"] / "metadata.jsonl").read_text().splitlines()]
    source = HubStream(str(assets["data"]), None, "train", "image", "text")
    samples = [s for shard in range(len(source.names)) for s in source.read(shard, 0)]
    assert [s.caption for s in samples] == [r["text"] for r in rows]
    assert all(Image.open(io.BytesIO(s.image)).size == (RES, RES) for s in samples)
    assert [s.offset for s in source.read(0, 2)] == [2, 3]
    result = main(["--pretrained_model_name_or_path", str(assets["sd15"]), "--dataset_name", str(assets["data"]),
                   "--streaming", "--output_dir", str(tmp_path / "out"), "--resolution", str(RES),
                   "--train_batch_size", "2", "--max_train_steps", "3", "--report_to", "none", "--center_crop"])
    assert result["global_step"] == 3 and len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))


def test_the_flow_script_streams_shards(assets, tmp_path):
    from diffusers_ztsnr.training.flow import main as flow_main

    flags = _flags(assets, tmp_path / "flow", 2)
    flags[flags.index(str(assets["sd15"]))] = str(assets["sd3"])
    for flag in ("--prediction_type", "v_prediction", "--zero_terminal_snr"):
        flags.remove(flag)
    result = flow_main(flags)
    assert result["global_step"] == 2 and all(np.isfinite(result["losses"]))
    assert (tmp_path / "flow" / "checkpoint-2" / "stream_state.json").is_file()


@pytest.mark.parametrize(("extra", "expected"), [
    (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
    (["--cache_latents", "--center_crop"], "--cache_latents does not work with streaming data (caching needs"),
    (["--train_data_dir", "x"], "--train_data_shards replaces --train_data_dir"),
    (["--stream_retries", "-1"], "--stream_retries must be >= 0"),
    (["--train_data_shards", "no-{0..3}.tar"], "--train_data_shards no-0.tar: no such file (and 3 more of 4)"),
])
def test_bad_streaming_flags_are_one_line_errors(assets, tmp_path, capsys, extra, expected):
    flags = _flags(assets, tmp_path / "o", 3, *extra)
    with pytest.raises(SystemExit) as error:
        parse_args(flags)
    code = error.value.code
    line = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in line and "\n" not in line


def test_a_config_file_lists_shards(assets, tmp_path):
    import yaml

    from diffusers_ztsnr.training.stream_flags import load_stream

    names = expand_shards(assets["shards"])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train_data_shards": [names[2], assets["shards"].replace("000002", "000001")]}))
    flags = _flags(assets, tmp_path / "o", 3, "--config", str(config))
    del flags[2:4]  # the file's list replaces the flag
    assert load_stream(parse_args(flags)).source.names == [names[2], names[0], names[1]]


def test_streaming_needs_max_train_steps(assets, tmp_path):
    flags = _flags(assets, tmp_path / "o", 3)
    flags.remove("--max_train_steps")
    flags.remove("3")
    with pytest.raises(SystemExit, match="a streamed dataset has no known length: give --max_train_steps"):
        parse_args(flags)


def _launch_two(assets, out, steps, *extra):
    """The UNet script on two CPU processes (DDP over gloo), as ``accelerate launch`` starts it."""
    done = launch_two_cpu_processes(["--config_file", str(REPO / "examples" / "accelerate_configs" /
                                                          "ddp_multi_gpu.yaml")],
                                    REPO / "train_scripts" / "train_lora_unet.py", _flags(assets, out, steps, *extra))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_read_their_own_shards_and_resume_bitwise(assets, tmp_path):
    _launch_two(assets, tmp_path / "full", 4)
    out = tmp_path / "out"
    _launch_two(assets, out, 3)
    positions = json.loads((out / "checkpoint-3" / "stream_state.json").read_text())["positions"]
    assert len(positions) == 2 and positions[0] != positions[1]  # rank i reads shards i::2
    _launch_two(assets, out, 4, "--resume_from_checkpoint", "latest")
    losses = [json.loads((d / "training_summary.json").read_text())["losses"] for d in (tmp_path / "full", out)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    from safetensors.torch import load_file

    a, b = (load_file(d / "pytorch_lora_weights.safetensors") for d in (tmp_path / "full", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runs_recorded_before_the_streaming_flags_still_resume(assets, tmp_path):
    from diffusers_ztsnr.training.identity import describe_changes, training_flags

    flags = _flags(assets, tmp_path / "o", 3)
    del flags[2:4]
    current = training_flags(parse_args([*flags, "--train_data_dir", str(assets["data"])]))
    assert current["train_data_shards"] is None and "stream_retries" not in current  # retries: resume-insensitive
    old = {k: v for k, v in current.items() if k not in ("train_data_shards", "streaming")}
    assert describe_changes({"flags": old}, {"flags": current}) == []
    streamed = training_flags(parse_args(_flags(assets, tmp_path / "o", 3)))
    assert describe_changes({"flags": old}, {"flags": streamed}) != []  # a switch to shards is another run
