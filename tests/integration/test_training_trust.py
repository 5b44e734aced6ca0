"""What a training run leaves behind is safe to keep, share and resume: no secret in any byte it writes or uploads,
nothing unpickled from a checkpoint, no non-finite weights checkpointed or exported, no resume or cache reuse across
a changed model, data or flags, one run per folder. Tiny SD1.5 runs in this process (CPU, seconds each)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_ztsnr.testing.tiny import save_tiny_pipeline
from diffusers_ztsnr.training import unet
from diffusers_ztsnr.training.checkpointing import checkpoint_folders, write_manifest
from diffusers_ztsnr.training.identity import FolderInUseError, lock_folder
from diffusers_ztsnr.training.output import NonFiniteWeightsError
from tests.train_utils import tiny_assets

RES = 32
TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"


pytestmark = pytest.mark.usefixtures("quiet_loading")  # diffusers' and transformers' loading chatter


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("trust"), "sd15")


def argv(model: Path, data: Path, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", str(RES),
            "--center_crop", "--train_batch_size", "2", "--max_train_steps", str(steps), "--output_dir", str(out),
            "--learning_rate", "1e-3", "--rank", "4", "--report_to", "none", "--checkpointing_steps", "1",
            "--prediction_type", "v_prediction", "--zero_terminal_snr", *extra]


def run(assets, out, *extra, steps=2, model=None, data=None):
    return unet.main(argv(model or assets["sd15"], data or assets["data"], out, *extra, steps=steps))


def every_byte(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_hub_token_reaches_no_file_and_the_upload_is_private_and_allow_listed(assets, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    remote, calls = tmp_path / "remote", {}

    def create_repo(repo_id, exist_ok=False, token=None, private=None, **_):
        calls["create"] = {"repo_id": repo_id, "token": token, "private": private}
        return huggingface_hub.RepoUrl(f"https://huggingface.co/user/{repo_id}")

    def upload_folder(repo_id, folder_path, token=None, allow_patterns=None, **_):
        calls["upload"] = list(allow_patterns)
        for name in allow_patterns:  # exact relative paths: copy what a real upload would send
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(folder_path) / name, remote / name)

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "out"
    run(assets, out, "--push_to_hub", "--hub_token", TOKEN, "--hub_model_id", "my-lora", "--report_to", "tensorboard",
        "--validation_prompt", "a red disc", "--num_validation_images", "1", "--validation_inference_steps", "2")
    assert calls["create"] == {"repo_id": "my-lora", "token": TOKEN, "private": True}
    # a ZTSNR run on an SD 1.x base: the conversion probe's numbers go with the card they are quoted in
    assert sorted(calls["upload"]) == ["README.md", "conversion_probe.json", "lora_kohya.safetensors",
                                       "pytorch_lora_weights.safetensors", "samples.png",
                                       "scheduler/scheduler_config.json"]
    assert (out / "training_args.json").is_file() and list((out / "logs").rglob("*events*"))  # written, not sent
    assert TOKEN.encode() not in every_byte(out) and TOKEN.encode() not in every_byte(remote)
    assert "hub_token" not in json.loads((out / "training_args.json").read_text())
    assert "(private): README.md, conversion_probe.json, lora_kohya.safetensors" in capsys.readouterr().out


def _planted_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    return pickle.dumps(Payload())


# accelerate loads its own files weights-only: the optimizer and LR-scheduler states are refused loudly; a refused
# RNG-state file is skipped with a log line (this package's noise streams do not depend on global RNG state)
@pytest.mark.parametrize("name,refused", [("optimizer.bin", True), ("scheduler.bin", True),
                                          ("random_states_0.pkl", False)])
def test_a_planted_pickle_in_a_checkpoint_never_runs(assets, tmp_path, name, refused):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    run(assets, out, "--use_ema")
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "ema.safetensors").is_file() and (checkpoint / "lora_0.safetensors").is_file()
    (checkpoint / name).write_bytes(_planted_pickle(marker))
    # the files this package reads by name in the old pickle format are planted too: they must be ignored
    for stale in ("ema.pt", "lora_0.pt"):
        (checkpoint / stale).write_bytes(_planted_pickle(marker))
    write_manifest(checkpoint, 2)  # an attacker can rewrite the manifest too: loading itself must be safe
    if refused:
        with pytest.raises(pickle.UnpicklingError):
            run(assets, out, "--use_ema", "--resume_from_checkpoint", "latest", steps=3)
    else:
        assert run(assets, out, "--use_ema", "--resume_from_checkpoint", "latest", steps=3)["global_step"] == 3
    assert not marker.exists()


def test_planted_pickles_under_old_names_are_not_loaded(assets, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    run(assets, out, "--use_ema")
    checkpoint = out / "checkpoint-2"
    for stale in ("ema.pt", "lora_0.pt"):
        (checkpoint / stale).write_bytes(_planted_pickle(marker))
    write_manifest(checkpoint, 2)
    assert run(assets, out, "--use_ema", "--resume_from_checkpoint", "latest", steps=3)["global_step"] == 3
    assert not marker.exists()


@pytest.fixture
def nan_weights_after(monkeypatch):
    """``nan_weights_after(k)``: the k-th optimizer step (1-based) writes a NaN into one LoRA weight, the way an
    overflowing update does, while its loss stays finite."""
    original = torch.optim.AdamW.step

    def install(bad_step: int):
        count = {"n": 0}

        def step(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            count["n"] += 1
            if count["n"] == bad_step:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
            return result

        monkeypatch.setattr(torch.optim.AdamW, "step", step)

    return install


@pytest.mark.parametrize("steps,bad_step", [(4, 3), (2, 2)])
def test_non_finite_weights_are_never_checkpointed_or_exported(assets, tmp_path, nan_weights_after, steps, bad_step):
    out = tmp_path / "out"
    nan_weights_after(bad_step)
    with pytest.raises(NonFiniteWeightsError, match=rf"step {bad_step}: the trainable weights became NaN/Inf after "
                       rf"a finite loss.*the last checkpoint, checkpoint-{bad_step - 1}, holds finite weights"):
        run(assets, out, "--checkpoints_total_limit", "1", steps=steps)
    assert [p.name for p in checkpoint_folders(out)] == [f"checkpoint-{bad_step - 1}"]
    weights = load_file(out / f"checkpoint-{bad_step - 1}" / "lora_0.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "lora_kohya.safetensors").exists()


def test_non_finite_weights_between_checkpoints_stop_the_run_at_the_next_step(assets, tmp_path, nan_weights_after):
    """Step 2's update goes bad with no checkpoint due: step 3's one host sync reads the flag and stops the run
    naming step 2, before step 3 updates and before anything is written."""
    out = tmp_path / "out"
    nan_weights_after(2)
    with pytest.raises(NonFiniteWeightsError, match=r"step 2: the trainable weights became NaN/Inf after a finite "
                       r"loss.*no checkpoint was written yet"):
        run(assets, out, "--checkpointing_steps", "3", steps=4)
    assert checkpoint_folders(out) == [] and not (out / "pytorch_lora_weights.safetensors").exists()


def test_stale_encodings_are_not_reused_after_the_model_changed_at_the_same_path(assets, tmp_path):
    model = save_tiny_pipeline("sd15", tmp_path / "model", seed=0)
    cache = ["--cache_latents", "--cache_latents_dir", str(tmp_path / "cache")]
    first = run(assets, tmp_path / "a", *cache, model=model, steps=1)
    again = run(assets, tmp_path / "b", *cache, model=model, steps=1)
    assert first["cache"]["misses"] == 4 and again["cache"] == {"hits": 4, "misses": 0}
    shutil.rmtree(model)
    save_tiny_pipeline("sd15", model, seed=1)  # other weights, same path and file sizes
    changed = run(assets, tmp_path / "c", *cache, model=model, steps=1)
    assert changed["cache"] == {"hits": 0, "misses": 4}


def test_overwrite_output_dir_deletes_the_old_runs_checkpoints(assets, tmp_path):
    out = tmp_path / "out"
    run(assets, out, steps=3)
    assert len(checkpoint_folders(out)) == 3
    with pytest.raises(ValueError, match=r"holds a different run \(--rank 4 -> 8\)\. Use a new --output_dir"):
        run(assets, out, "--rank", "8", steps=1)
    run(assets, out, "--rank", "8", "--overwrite_output_dir", steps=1)
    assert [p.name for p in checkpoint_folders(out)] == ["checkpoint-1"]
    ranks = {w.shape[0] for k, w in load_file(out / "checkpoint-1" / "lora_0.safetensors").items() if "lora_A" in k}
    assert ranks == {8}  # the new run's weights, not the old rank-4 run's
    resumed = run(assets, out, "--rank", "8", "--resume_from_checkpoint", "latest", steps=2)
    assert resumed["global_step"] == 2 and len(resumed["losses"]) == 1


def test_resume_refuses_changed_data_or_model_unless_told(assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(assets["data"], data)
    model = save_tiny_pipeline("sd15", tmp_path / "model", seed=0)
    out = tmp_path / "out"
    run(assets, out, model=model, data=data)
    rows = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text("\n".join([rows[0].replace("a ", "one ", 1), *rows[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"holds a different run \(the training data .*--resume_despite_changes"):
        run(assets, out, "--resume_from_checkpoint", "latest", model=model, data=data, steps=3)
    resumed = run(assets, out, "--resume_from_checkpoint", "latest", "--resume_despite_changes", model=model,
                  data=data, steps=3)
    assert resumed["global_step"] == 3
    record = json.loads((out / "run_identity.json").read_text())
    assert record["resumed_despite_changes"] == [{"step": 2, "changes": [
        "the training data (files, sizes, mtimes or captions)"]}]
    shutil.rmtree(model)
    save_tiny_pipeline("sd15", model, seed=1)
    with pytest.raises(ValueError, match=r"holds a different run \(the base model's files"):
        run(assets, out, "--resume_from_checkpoint", "latest", model=model, data=data, steps=4)


def test_the_same_run_resumes_under_another_spelling_of_its_paths(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(assets, Path("out"))
    resumed = run(assets, tmp_path / "out", "--resume_from_checkpoint", "latest", steps=3)
    assert resumed["global_step"] == 3 and len(resumed["losses"]) == 1


def test_a_datasets_list_resumes_from_another_working_directory(assets, tmp_path, monkeypatch):
    """A ``datasets:`` entry's relative folder is recorded resolved: the same folder from another directory is the
    same run, and a different folder is not."""
    shutil.copytree(assets["data"], tmp_path / "data")
    shutil.copytree(assets["data"], tmp_path / "other")
    (tmp_path / "elsewhere").mkdir()

    def datasets_run(folder, *extra, steps):
        args = argv(assets["sd15"], Path(), tmp_path / "out", "--datasets", json.dumps([{"train_data_dir": folder}]),
                    *extra, steps=steps)
        del args[args.index("--train_data_dir"):args.index("--train_data_dir") + 2]
        return unet.main(args)

    monkeypatch.chdir(tmp_path)
    datasets_run("data", steps=2)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"holds a different run \(--datasets .*other"):
        datasets_run("../other", "--resume_from_checkpoint", "latest", steps=3)
    resumed = datasets_run("../data", "--resume_from_checkpoint", "latest", steps=3)
    assert resumed["global_step"] == 3 and len(resumed["losses"]) == 1
    recorded = json.loads((tmp_path / "out" / "run_identity.json").read_text())["flags"]["datasets"]
    assert recorded == [{"train_data_dir": str((tmp_path / "data").resolve())}]


def test_a_second_run_on_the_same_output_dir_is_refused_with_the_holders_pid(assets, tmp_path):
    out = tmp_path / "out"
    with lock_folder(out), pytest.raises(FolderInUseError, match=rf"--output_dir {out} is in use by another "
                                                                  rf"training run \(pid {os.getpid()}\)"):
        run(assets, out)
    assert not (out / "training_args.json").exists()
    assert run(assets, out)["global_step"] == 2  # the lock is released with its holder


def test_fp16_on_the_cpu_is_a_clear_error(assets, tmp_path):
    with pytest.raises(SystemExit, match="--mixed_precision fp16 needs a GPU.*bf16"):
        run(assets, tmp_path / "out", "--mixed_precision", "fp16")
