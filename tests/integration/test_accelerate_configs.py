"""examples/accelerate_configs/*.yaml: what accelerate 1.15 makes of each file, and what a CPU can show of each path.

* every file goes through accelerate's own config loader and launcher argument handling: distributed type,
  process and machine counts, FSDP version / wrapping / state-dict type, ZeRO stage, and the environment the
  launcher hands to each process, from which accelerate's FSDP and DeepSpeed plugins are built here (no launch);
* the DDP file starts two CPU processes over gloo (``ACCELERATE_USE_CPU=true``); the FSDP2 file, launched the same
  way, gives DDP too (accelerate never selects FSDP on a CPU);
* the UNet training script under FSDP2, forced through torch's ``fully_shard`` on two CPU processes by
  ``accelerate_cpu_entry.py``: the denoiser's LoRA is sharded, gathers back to the unsharded values with the keys
  a 1-process run exports, both ranks train their steps -- and the run deadlocks at the first checkpoint, which is
  what this test pins down (see :mod:`diffusers_ztsnr.training.distributed`).

DeepSpeed runs nowhere here: it does not form a process group of CPU processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from safetensors.torch import load_file

from diffusers_ztsnr.training import distributed
from diffusers_ztsnr.training.config import UsageError
from diffusers_ztsnr.training.unet import main
from tests.train_utils import RES, tiny_assets

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "accelerate_configs"
ENTRY = Path(__file__).with_name("accelerate_cpu_entry.py")
# file -> (distributed type, processes, machines)
EXPECTED = {
    "ddp_multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "ddp_multi_node.yaml": (DistributedType.MULTI_GPU, 16, 2),
    "fsdp2_lora.yaml": (DistributedType.FSDP, 8, 1),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 8, 1),
}
# seconds a gloo collective waits for the other rank in the forced FSDP2 run before failing with its traceback
COLLECTIVE_TIMEOUT = 20

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("accelerate_configs"), "sd15")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_args(name: str, *extra: str):
    """``accelerate launch --config_file <name> *extra x.py`` as accelerate's launcher reads it: (args, config)."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), *extra, "x.py"])
    args, config, _ = _validate_launch_command(args)
    return args, config


def plugin_env(monkeypatch, env: dict[str, str], prefixes: tuple[str, ...]) -> None:
    """Set the launcher's variables that accelerate's plugins read, as each launched process sees them."""
    for key in list(os.environ):
        if key.startswith(prefixes):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(prefixes):
            monkeypatch.setenv(key, value)


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_config_loads_with_accelerates_loader(name):
    config = load_config_from_file(str(CONFIGS / name))
    kind, processes, machines = EXPECTED[name]
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.num_machines) == (kind, processes, machines)
    assert config.mixed_precision == "bf16" and config.use_cpu is False and config.machine_rank == 0
    header = (CONFIGS / name).read_text().split("\ncompute_environment:")[0]
    assert header.startswith("# ") and "accelerate launch --config_file examples/accelerate_configs/" + name in header
    assert "Tested:" in header and ("Unmeasured:" in header or "Measured" in header or "Nothing" in header)
    args, _ = launcher_args(name)  # the launcher takes the same values
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert args.use_fsdp == (kind == DistributedType.FSDP) and args.use_deepspeed == (kind == DistributedType.DEEPSPEED)


def test_multi_node_config_becomes_torchruns_two_nodes():
    config = load_config_from_file(str(CONFIGS / "ddp_multi_node.yaml"))
    assert (config.main_process_ip, config.main_process_port, config.rdzv_backend) == ("10.0.0.1", 29500, "static")
    port = free_port()  # the file's 29500 may be taken on this machine; the launcher checks it is free
    args, _ = launcher_args("ddp_multi_node.yaml", "--machine_rank", "1", "--main_process_port", str(port))
    env = prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == f"10.0.0.1:{port}" and args.rdzv_backend == "static"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and "ACCELERATE_USE_FSDP" not in env


def test_fsdp2_config_builds_accelerates_fsdp2_plugin(monkeypatch):
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    config = load_config_from_file(str(CONFIGS / "fsdp2_lora.yaml"))
    assert config.fsdp_config["fsdp_version"] == 2
    args, _ = launcher_args("fsdp2_lora.yaml")
    env = prepare_multi_gpu_env(args)
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["FSDP_STATE_DICT_TYPE"]) == \
        ("true", "2", "FULL_STATE_DICT")
    plugin_env(monkeypatch, env, ("FSDP_", "ACCELERATE_"))
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FSDP2's full sharding
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.state_dict_config.rank0_only and plugin.state_dict_config.offload_to_cpu
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None
    assert plugin.cpu_ram_efficient_loading is False and plugin.cpu_offload.__class__.__name__ == "OffloadPolicy"
    assert plugin.activation_checkpointing is False


def test_fsdp2_config_shards_the_unet_block_by_block(monkeypatch):
    """The wrap policy accelerate derives from the file picks the UNet's own blocks (its ``_no_split_modules``)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from diffusers_ztsnr.testing.tiny import make_tiny_pipeline

    args, _ = launcher_args("fsdp2_lora.yaml")
    plugin_env(monkeypatch, prepare_multi_gpu_env(args), ("FSDP_", "ACCELERATE_"))
    plugin = FullyShardedDataParallelPlugin()
    unet = make_tiny_pipeline("sd15").unet
    plugin.set_auto_wrap_policy(unet)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, unet)
    wrapped = {type(m).__name__ for m in unet.modules() if policy(m)}
    assert wrapped == set(type(unet)._no_split_modules) & {type(m).__name__ for m in unet.modules()}
    assert {"BasicTransformerBlock", "ResnetBlock2D"} <= wrapped


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_config_builds_accelerates_deepspeed_plugin(monkeypatch, name, stage):
    args, config = launcher_args(name)
    args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)  # as `accelerate launch` sets
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env  # the script's --gradient_accumulation_steps decides
    plugin_env(monkeypatch, env, ("ACCELERATE_",))
    plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == stage and ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_clipping"] == 1.0 and plugin.zero3_init_flag is False
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    # what stops the training scripts: filled only from a dataloader prepared together with the model
    assert ds["train_micro_batch_size_per_gpu"] == "auto"


def cpu_launch(name: str, reports: Path, *script_args: str, timeout: int = 240,
               **env: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file <name> --num_processes 2`` of ``accelerate_cpu_entry.py`` on CPU processes,
    which write their reports into ``reports``."""
    reports.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / name),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(ENTRY), *script_args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
                "ACCELERATE_TEST_REPORT_DIR": str(reports), **env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def reported(reports: Path, tag: str) -> list[dict]:
    """What each process of the entry script reported under ``tag``, by rank."""
    return [json.loads(path.read_text()) for path in sorted(reports.glob(f"{tag}-*.json"))]


@pytest.mark.parametrize("name", ["ddp_multi_gpu.yaml", "fsdp2_lora.yaml"])
def test_config_launches_two_cpu_processes_as_ddp(name, tmp_path):
    """Both files start two gloo processes on a CPU; the FSDP2 one arrives as DDP: the launcher hands FSDP over
    (ACCELERATE_USE_FSDP, FSDP_VERSION=2) and accelerate ignores it on a CPU, without a warning."""
    done = cpu_launch(name, tmp_path, "probe", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = reported(tmp_path, "probe")
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    assert all(r["distributed_type"] == "MULTI_CPU" and not r["is_fsdp2"] for r in ranks)
    fsdp = name.startswith("fsdp")
    assert all((r["env_use_fsdp"], r["env_fsdp_version"]) == (("true", "2") if fsdp else (None, None)) for r in ranks)
    assert all(r["fsdp_plugin"] is False for r in ranks)  # the plugin built from those variables is dropped


def test_unet_script_under_fsdp2_trains_sharded_then_deadlocks_at_the_first_checkpoint(assets, tmp_path):
    """FSDP2 through fully_shard on two CPU processes (gloo), the UNet script's real ``main``.

    What works: the LoRA parameters become DTensor shards (half of them on each rank), gathered they hold exactly the
    unsharded values under the names a 1-process run exports, and both ranks run their optimizer steps. What does
    not: at the first checkpoint rank 0 calls accelerate's ``save_state``, which under FSDP gathers the whole model
    (a collective), while rank 1 waits in the checkpoint's all-reduce; neither collective ever completes. A gloo
    timeout turns the hang into a failure carrying both tracebacks."""
    common = ["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
              "--resolution", str(RES), "--center_crop", "--train_batch_size", "1", "--report_to", "none"]
    main([*common, "--max_train_steps", "1", "--output_dir", str(tmp_path / "one")])
    one_process = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    out = tmp_path / "fsdp2"
    reports = tmp_path / "reports"
    done = cpu_launch("fsdp2_lora.yaml", reports, "fsdp2-unguarded", *common, "--max_train_steps", "2", "--output_dir",
                      str(out), ACCELERATE_TEST_PG_TIMEOUT=str(COLLECTIVE_TIMEOUT))
    sharded = reported(reports, "sharded")
    assert [s["rank"] for s in sharded] == [0, 1] and all(s["is_fsdp2"] for s in sharded)
    for s in sharded:
        assert s["dtensors"] == s["trainable"] > 0 and s["local_numel"] * 2 == s["numel"]
        assert s["same_parameter_objects"] is False  # a list collected before prepare is stale
        assert [f"unet.{k}" for k in s["keys"]] == sorted(one_process)
        assert s["checksum"] == s["unsharded_checksum"]
    assert sharded[0]["checksum"] == sharded[1]["checksum"]
    assert reported(reports, "steps") == [{"rank": 0, "steps": 2}, {"rank": 1, "steps": 2}]
    assert done.returncode != 0
    rank0, rank1 = (r["traceback"] for r in reported(reports, "traceback"))
    for frame in ("in write_checkpoint", "in save_checkpoint", "in save_state", "in save_fsdp_model",
                  "in get_model_state_dict"):
        assert frame in rank0, frame
    assert "in write_checkpoint" in rank1 and "in reduce" in rank1 and "in all_reduce" in rank1
    assert "Timed out waiting" in rank0 + rank1  # whichever rank's wait ended first; the other lost its peer
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not list(out.glob("checkpoint-*[0-9]"))


def test_the_scripts_refuse_fsdp2_on_every_rank_before_training(assets, tmp_path):
    """With the loop's guard (what users run): both ranks stop with the one-line reason before anything is sharded,
    trained or written."""
    out, reports = tmp_path / "fsdp2", tmp_path / "reports"
    done = cpu_launch("fsdp2_lora.yaml", reports, "fsdp2", "--pretrained_model_name_or_path", str(assets["sd15"]),
                      "--train_data_dir", str(assets["data"]), "--resolution", str(RES), "--center_crop",
                      "--max_train_steps", "2", "--report_to", "none", "--output_dir", str(out))
    assert done.returncode != 0
    tracebacks = [r["traceback"] for r in reported(reports, "traceback")]
    assert len(tracebacks) == 2
    assert all("error: fsdp2 is not supported by the training scripts yet" in t and "ddp_multi_gpu.yaml" in t
               for t in tracebacks)
    assert reported(reports, "sharded") == [] and reported(reports, "steps") == [] and not out.exists()


def fake_accelerator(kind: DistributedType, **plugins) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(distributed_type=kind, **plugins))


@pytest.mark.parametrize("kind,plugins,expected", [
    (DistributedType.NO, {}, None),
    (DistributedType.MULTI_GPU, {}, None),
    (DistributedType.MULTI_CPU, {}, None),
    (DistributedType.FSDP, {"fsdp_plugin": SimpleNamespace(fsdp_version=2)}, "fsdp2"),
    (DistributedType.FSDP, {"fsdp_plugin": SimpleNamespace(fsdp_version=1)}, "fsdp1"),
    (DistributedType.DEEPSPEED, {"deepspeed_plugin": SimpleNamespace(zero_stage=3)}, "deepspeed-zero3"),
])
def test_sharded_runs_are_named_and_refused_in_one_line(kind, plugins, expected):
    accelerator = fake_accelerator(kind, **plugins)
    assert distributed.sharding(accelerator) == expected
    if expected is None:
        assert distributed.unsupported_reason(accelerator) is None
        distributed.check_supported(accelerator)
        return
    with pytest.raises(UsageError, match=rf"^error: {expected} is not supported by the training scripts yet: .*"
                                         r"ddp_multi_gpu\.yaml"):
        distributed.check_supported(accelerator)
