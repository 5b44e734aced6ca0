"""Kill/resume campaigns and damaged checkpoints: a killed run resumed with ``--resume_from_checkpoint latest``,
however often and wherever it was killed, ends with the LoRA an uninterrupted run makes, bit for bit (CPU).

A campaign starts ``train_scripts/train_lora_unet.py`` (tiny SD1.5, 32 px, a checkpoint every step) as a separate
process and SIGKILLs it at points drawn from a seeded RNG: as soon as a ``checkpoint-N.tmp`` folder appears
(*during a checkpoint write*), a random moment after ``checkpoint-N`` appears (mid-step, mid-write or in the final
output), or a random moment after the start (loading, resuming). After every kill it resumes with
``--resume_from_checkpoint latest``; when no intact checkpoint exists yet (killed before the first one was
complete) it starts the run again without the flag, and says so in its log -- the trainer itself refuses ``latest``
without an intact checkpoint (never a silent restart from step 0), which ``test_latest_without_an_intact_checkpoint``
checks. This repeats until a run exits 0; then the LoRA must equal the uninterrupted run's, bit for bit, and the
newest checkpoint must verify. Should a run finish before the planned kills were made (the RNG aimed too late), a
new round starts in a fresh folder; trials, kills and kills during a checkpoint write (a ``.tmp`` folder that the
killed process had created or changed) are counted over all rounds and printed (``-s``).

Processes: the slow campaign runs each trial as ``python train_scripts/train_lora_unet.py ...`` (about 20 s of
imports each on the 2-core CI machine). The CI subset runs the same script file (``runpy``, as ``__main__``) in a
process forked from a ``forkserver`` that imported torch/diffusers once: a real separate process, SIGKILLed the same
way, without paying the imports per trial.

    python -m pytest -m slow tests/campaigns/test_kill_resume.py -s    # the >= 10-kill campaign, prints its numbers
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_ztsnr.training.checkpointing import (
    COMPLETE_MARKER,
    checkpoint_folders,
    intact_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from diffusers_ztsnr.training.flow import main as flow_main
from diffusers_ztsnr.training.unet import main
from tests.train_utils import tiny_assets

RES = 32
STEPS = 8
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_scripts" / "train_lora_unet.py"
FLOW_SCRIPT = REPO / "train_scripts" / "train_lora_flow.py"
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("killresume"), "sd15", "flux")


def flow_train_args(assets, out, *extra, steps=STEPS):
    """The flow script on the tiny Flux model (packing, guidance, dynamic shift), same data and schedule of saves."""
    return ["--pretrained_model_name_or_path", str(assets["flux"]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "4", "--report_to", "none",
            "--checkpointing_steps", "1", "--seed", "3", *extra]


def train_args(assets, out, *extra, steps=STEPS):
    """4 images at batch 2: 2 steps an epoch, so resumes land mid-epoch and on epoch boundaries."""
    return ["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--learning_rate", "1e-2", "--rank", "4", "--report_to", "none",
            "--checkpointing_steps", "1", "--prediction_type", "v_prediction", "--zero_terminal_snr",
            "--seed", "3", *extra]


def run(assets, out, *extra, steps=STEPS):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?!ignoring damaged|resuming from)")  # loading chatter
        return main(train_args(assets, out, *extra, steps=steps))


def lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / LORA)


def assert_warned(record, *patterns):
    messages = [str(w.message) for w in record]
    for pattern in patterns:
        assert any(re.search(pattern, m) for m in messages), (pattern, messages)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} LoRA tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted run (in this process, single-threaded like the campaign's processes)."""
    out = tmp_path_factory.mktemp("reference")
    result = run(assets, out)
    assert result["global_step"] == STEPS
    return lora(out)


# --- the campaign -------------------------------------------------------------------------------------


def _script_child(script: str, argv: list[str], log: str) -> None:
    """Forkserver child: run the training script as __main__ with ``argv``, output to ``log``."""
    import runpy

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


class Forked:
    """The script in a process forked from a forkserver that has imported the heavy modules once."""

    context = None
    startup_s = 1.5  # fork, load the tiny pipeline, resume

    def __init__(self, script, argv, log):
        threads = os.environ.get("OMP_NUM_THREADS")
        if Forked.context is None:
            os.environ["OMP_NUM_THREADS"] = "1"  # the forkserver (started by the first start()) inherits it
            Forked.context = multiprocessing.get_context("forkserver")
            Forked.context.set_forkserver_preload(["torch", "diffusers", "transformers", "accelerate", "peft",
                                                   "datasets", "diffusers_ztsnr.training.unet",
                                                   "diffusers_ztsnr.training.flow"])
        self.process = Forked.context.Process(target=_script_child, args=(str(script), argv, str(log)),
                                              daemon=True)
        try:
            self.process.start()
        finally:
            if threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = threads

    def poll(self):
        return None if self.process.is_alive() else self.process.exitcode

    def kill(self):
        os.kill(self.process.pid, signal.SIGKILL)

    def wait(self, timeout):
        self.process.join(timeout)
        return self.poll()


class Exec:
    """``python train_scripts/train_lora_unet.py ...``: a fresh interpreter per trial."""

    startup_s = 20.0  # imports on the 2-core CI machine

    def __init__(self, script, argv, log):
        self.log = open(log, "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, str(script), *argv], stdout=self.log,
                                        stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def poll(self):
        return self.process.poll()

    def kill(self):
        self.process.send_signal(signal.SIGKILL)

    def wait(self, timeout):
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.log.close()


def tmp_folders(out: Path) -> dict[str, tuple[int, int]]:
    """``checkpoint-N.tmp`` folders with (inode, mtime): a changed entry is a write that was under way."""
    found = {}
    for p in out.glob("checkpoint-*.tmp") if out.is_dir() else []:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        found[p.name] = (st.st_ino, st.st_mtime_ns)
    return found


def plan_kill(rng: random.Random, done: int, remaining: int, force_write: bool, startup_s: float):
    """(mode, step, delay): ``write`` kills as soon as a checkpoint-<n>.tmp with n >= step appears; ``step`` at
    ``delay`` s after checkpoint-<step> appears; ``start`` at ``delay`` s after the process started. The step is
    drawn so that the ``remaining`` kills fit in the steps left."""
    step = rng.randint(done + 1, done + max(1, (STEPS - done) // max(remaining, 1)))
    mode = "write" if force_write else rng.choices(["write", "step", "start"], weights=[4, 4, 2])[0]
    delay = {"write": 0.0, "step": rng.uniform(0.0, 0.3), "start": rng.uniform(0.0, startup_s)}[mode]
    return mode, step, delay


def execute(proc, out: Path, plan, timeout: float, before: dict) -> bool:
    """Carry out ``plan`` on the running ``proc``; True if it was killed (False: it exited first)."""
    mode, step, delay = plan
    started = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - started > timeout:
            proc.kill()
            raise AssertionError(f"trial ran past {timeout} s")
        if mode == "write":  # a stale .tmp left by an earlier kill is no write under way
            fire = any(int(name[len("checkpoint-"):-len(".tmp")]) >= step and sig != before.get(name)
                       for name, sig in tmp_folders(out).items())
        else:
            fire = mode == "start" or (out / f"checkpoint-{step}").is_dir()
        if fire:
            if delay:
                end = time.monotonic() + delay
                while proc.poll() is None and time.monotonic() < end:
                    time.sleep(0.002)
            if proc.poll() is not None:
                return False
            proc.kill()
            return True
        time.sleep(0.0005)
    return False


def campaign(assets, root: Path, launcher, reference, seed: int, kills: int, write_kills: int = 1,
             max_rounds: int = 3, timeout: float = 300.0, script: Path = SCRIPT, args=train_args) -> dict:
    """Rounds of kill/resume, each until a run completes and its LoRA is checked against ``reference``; a new
    round (new output folder) starts while fewer than ``kills`` / ``write_kills`` kills have been made."""
    rng = random.Random(seed)
    stats = {"rounds": 0, "trials": 0, "kills": 0, "write_kills": 0, "fresh_starts": 0, "bitwise_equal": 0,
             "trial_log": []}
    began = time.monotonic()
    while stats["kills"] < kills or stats["write_kills"] < write_kills:
        assert stats["rounds"] < max_rounds, stats
        stats["rounds"] += 1
        out = root / f"round-{stats['rounds']}"
        run_round(assets, out, launcher, rng, stats, kills, write_kills, timeout, script, args)
        assert_bitwise_equal(lora(out), reference)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no damaged checkpoint left behind
            assert intact_checkpoints(out)[-1].name == f"checkpoint-{STEPS}"
        stats["bitwise_equal"] += 1
    stats["wall_s"] = round(time.monotonic() - began, 1)
    print("\ncampaign:", {k: v for k, v in stats.items() if k != "trial_log"})
    for record in stats["trial_log"]:
        print("   ", record)
    return stats


def run_round(assets, out: Path, launcher, rng, stats: dict, kills: int, write_kills: int, timeout: float,
              script: Path, args):
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    first = True
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            intact = intact_checkpoints(out)
        resume = ["--resume_from_checkpoint", "latest"] if intact else []
        note = f"resume from {intact[-1].name}" if intact else "first start"
        if not intact and not first:
            stats["fresh_starts"] += 1
            note = "no intact checkpoint yet: starting the run again without --resume_from_checkpoint"
        first = False
        stats["trials"] += 1
        log = logs / f"trial-{stats['trials']:02d}.log"
        log.write_text(f"# campaign: {note}\n")
        before = tmp_folders(out)
        proc = launcher(script, args(assets, out, *resume), log)
        record = {"round": stats["rounds"], "trial": stats["trials"], "start": note}
        remaining = kills - stats["kills"]
        missing_writes = write_kills - stats["write_kills"]
        if remaining > 0 or missing_writes > 0:
            done = int(intact[-1].name.split("-")[1]) if intact else 0
            plan = plan_kill(rng, done, max(remaining, missing_writes), missing_writes >= remaining,
                             launcher.startup_s)
            record["plan"] = plan
            if execute(proc, out, plan, timeout, before):
                proc.wait(60)
                stats["kills"] += 1
                writes = [name for name, sig in tmp_folders(out).items() if before.get(name) != sig]
                stats["write_kills"] += bool(writes)
                record["killed"] = "yes"
                if writes:  # what the interrupted write had got to
                    record["killed"] = {name: sorted(p.name for p in (out / name).iterdir()) for name in writes}
        code = proc.wait(timeout)
        record["exit"] = code
        stats["trial_log"].append(record)
        text = log.read_text(errors="replace")
        resumed = re.search(r"^resuming from (\S+)$", text, re.M)
        if intact and (resumed or "killed" not in record):  # it resumed from the checkpoint expected
            assert resumed and resumed.group(1) == str(intact[-1]), text[-3000:]
        if "killed" not in record:
            assert code == 0, f"trial {stats['trials']} failed (exit {code}):\n{text[-4000:]}"
            return


def test_kill_resume_campaign_ci_subset(assets, reference, tmp_path):
    """3 kills (at least 1 during a checkpoint write), fixed seed; processes forked from a forkserver."""
    stats = campaign(assets, tmp_path, Forked, reference, seed=2024, kills=3, write_kills=1)
    assert stats["kills"] >= 3 and stats["write_kills"] >= 1 and stats["bitwise_equal"] == stats["rounds"]


def test_kill_resume_campaign_flow_script(assets, tmp_path_factory, tmp_path):
    """The flow script (tiny Flux) under the same campaign: 2 kills, 1 during a checkpoint write, bitwise equal."""
    reference_dir = tmp_path_factory.mktemp("flow-reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flow_main(flow_train_args(assets, reference_dir))
    stats = campaign(assets, tmp_path, Forked, lora(reference_dir), seed=11, kills=2, write_kills=1,
                     script=FLOW_SCRIPT, args=flow_train_args)
    assert stats["kills"] >= 2 and stats["write_kills"] >= 1 and stats["bitwise_equal"] == stats["rounds"]


@pytest.mark.slow
def test_kill_resume_campaign_slow(assets, reference, tmp_path):
    """>= 10 kills of real ``python train_scripts/train_lora_unet.py`` processes, >= 3 during checkpoint writes.

    Measured (2-core CPU box, shared): 13 trials, 12 kills, 8 of them during a checkpoint write, 4 fresh starts
    (killed before checkpoint-1 was complete), LoRA bitwise equal to the uninterrupted run, 230 s."""
    stats = campaign(assets, tmp_path, Exec, reference, seed=7, kills=12, write_kills=3, max_rounds=4,
                     timeout=600)
    assert stats["kills"] >= 10 and stats["write_kills"] >= 3 and stats["bitwise_equal"] == stats["rounds"]


# --- damaged checkpoints --------------------------------------------------------------------------------


def test_latest_without_an_intact_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-1.tmp").mkdir()  # killed during the first checkpoint write
    with pytest.raises(ValueError, match=r"no intact .*checkpoint-1\.tmp .*starts again without "
                                         r"--resume_from_checkpoint"):
        resolve_resume_checkpoint(tmp_path, "latest")


def test_corrupted_latest_checkpoint_resumes_from_the_previous_one(assets, reference, tmp_path):
    out = tmp_path / "out"
    first = run(assets, out, steps=5)
    assert first["global_step"] == 5
    weights = out / "checkpoint-5" / "lora_0.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.warns(UserWarning) as record:
        resumed = run(assets, out, "--resume_from_checkpoint", "latest")
    assert_warned(record, r"ignoring damaged or incomplete checkpoint \S+checkpoint-5: lora_0\.safetensors is "
                          r"\d+ bytes, the manifest says \d+ \(truncated or changed\)", "resuming from checkpoint-4")
    assert len(resumed["losses"]) == STEPS - 4  # from checkpoint-4
    assert_bitwise_equal(lora(out), reference)
    assert verify_checkpoint(out / "checkpoint-5") is None  # rewritten on the way


def test_total_limit_1_with_a_corrupted_newest_checkpoint(assets, reference, tmp_path):
    out = tmp_path / "out"
    run(assets, out, "--checkpoints_total_limit", "2", steps=4)
    assert [p.name for p in checkpoint_folders(out)] == ["checkpoint-3", "checkpoint-4"]
    (out / "checkpoint-4" / "optimizer.bin").unlink()
    with pytest.warns(UserWarning) as record:
        resumed = run(assets, out, "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1")
    assert_warned(record, r"checkpoint-4: optimizer\.bin is missing",
                  r"resuming from checkpoint-3, the newest intact checkpoint, not from the newer but damaged")
    assert len(resumed["losses"]) == STEPS - 3
    assert [p.name for p in checkpoint_folders(out)] == [f"checkpoint-{STEPS}"]
    assert verify_checkpoint(out / f"checkpoint-{STEPS}") is None
    assert_bitwise_equal(lora(out), reference)


def fake_state(folder: str, payload: bytes = b"x" * 100) -> None:
    (Path(folder) / "lora_0.pt").write_bytes(payload)
    (Path(folder) / "sub").mkdir()
    (Path(folder) / "sub" / "optimizer.bin").write_bytes(payload * 2)


def test_total_limit_1_never_deletes_the_only_intact_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, fake_state, total_limit=1)
    stale = save_checkpoint(tmp_path, 5, fake_state, total_limit=None)  # a newer one, then damaged
    (stale / "sub" / "optimizer.bin").write_bytes(b"")
    # before manifests this checkpoint counted as intact and the limit deleted checkpoints 1 and 2
    save_checkpoint(tmp_path, 2, fake_state, total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-5"]
    with pytest.warns(UserWarning) as record:
        assert resolve_resume_checkpoint(tmp_path, "latest").name == "checkpoint-2"
    assert_warned(record, r"checkpoint-5: sub/optimizer\.bin is 0 bytes, the manifest says 200",
                  "resuming from checkpoint-2, the newest intact checkpoint, not from the newer but damaged")
    # writing the damaged step again replaces it; the limit then keeps the newest intact one only
    save_checkpoint(tmp_path, 5, fake_state, total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"] and verify_checkpoint(stale) is None


def test_manifest_catches_changed_and_missing_files_and_unverifiable_markers(tmp_path):
    ckpt = save_checkpoint(tmp_path, 3, fake_state)
    assert verify_checkpoint(ckpt) is None
    (ckpt / "lora_0.pt").write_bytes(b"y" * 100)  # same size, other bytes
    assert "sha256" in verify_checkpoint(ckpt) and verify_checkpoint(ckpt, deep=False) is None
    (ckpt / "lora_0.pt").unlink()
    assert verify_checkpoint(ckpt) == "lora_0.pt is missing"
    (ckpt / COMPLETE_MARKER).write_text('{"format": 1, "st')
    assert verify_checkpoint(ckpt) == f"damaged {COMPLETE_MARKER} manifest"
    (ckpt / COMPLETE_MARKER).write_text("3")  # the step-only marker of an early format: nothing is verified
    assert "holds no manifest" in verify_checkpoint(ckpt)
    with pytest.raises(ValueError, match="no intact checkpoint"):
        resolve_resume_checkpoint(tmp_path, "latest")
    (ckpt / COMPLETE_MARKER).unlink()
    assert "no COMPLETE" in verify_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"not an intact checkpoint \(no COMPLETE file"):
        resolve_resume_checkpoint(tmp_path, "checkpoint-3")


def test_a_kill_while_pruning_never_leaves_a_complete_looking_half(tmp_path, monkeypatch):
    """Pruning renames a folder away before deleting it: a kill mid-delete leaves ``checkpoint-N.old``."""
    import shutil

    save_checkpoint(tmp_path, 1, fake_state)
    real = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        if str(path).endswith("checkpoint-1.old") and not kwargs.get("ignore_errors"):
            (Path(path) / "lora_0.pt").unlink()
            raise KeyboardInterrupt  # stands in for the kill
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, fake_state, total_limit=1)
    monkeypatch.setattr(shutil, "rmtree", real)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.name for p in intact_checkpoints(tmp_path)] == ["checkpoint-2"]
    save_checkpoint(tmp_path, 3, fake_state)
    assert not list(tmp_path.glob("*.old"))
