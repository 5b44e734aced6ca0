"""A LoRA trained on a quantized base (``--base_quantization int8``, torchao) is an ordinary LoRA: it loads on the
unquantized base in diffusers with every trained module patched and the trained deltas applied, and its kohya file
carries the names ComfyUI maps. Formats that need a GPU or a missing backend are refused with the fix."""

import pytest
import torch
from safetensors.torch import load_file

from diffusers_ztsnr.testing.tiny import make_tiny_pipeline
from diffusers_ztsnr.training.checkpointing import load_tensor_state
from diffusers_ztsnr.training.config import UsageError
from diffusers_ztsnr.training.flow import main as flow_main
from diffusers_ztsnr.training.quantization import quantizable, quantization_problem
from diffusers_ztsnr.training.unet import main as unet_main
from tests.integration.interop.conventions import apply_kohya, comfyui_key_map, expected_native, native_error
from tests.integration.interop.support import TOLERANCE, TrainedLora, count, denoiser_name, diffusers_applied, max_error
from tests.train_utils import RES, tiny_assets

pytest.importorskip("torchao", reason="--base_quantization int8 needs torchao (the test extra installs it)")
pytestmark = pytest.mark.usefixtures("quiet_loading")
KINDS = ("sd15", "sd3")
RANK, ALPHA = 4, 4.0


def argv(assets, kind, out, *extra):
    return ["--pretrained_model_name_or_path", str(assets[kind]), "--train_data_dir", str(assets["data"]),
            "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", "1",
            "--learning_rate", "1e-2", "--rank", str(RANK), "--checkpointing_steps", "1", "--report_to", "none",
            "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    assets = tiny_assets(root, *KINDS, num_images=2)
    out = {}
    for kind in KINDS:
        folder = root / f"out-{kind}"
        (unet_main if kind == "sd15" else flow_main)(argv(assets, kind, folder, "--base_quantization", "int8"))
        (checkpoint,) = sorted(folder.glob("checkpoint-*"))
        states = {denoiser_name(kind): load_tensor_state(checkpoint / "lora_0.safetensors")[0]}
        out[kind] = TrainedLora(kind, states, ALPHA, folder)
    return {"assets": assets, "loras": out}


@pytest.mark.parametrize("kind", KINDS)
def test_an_int8_trained_lora_loads_on_the_unquantized_base(runs, kind, capsys):
    lora = runs["loras"][kind]
    trained = lora.deltas()
    name = denoiser_name(kind)
    applied, patched = diffusers_applied(make_tiny_pipeline(kind), str(lora.folder), [name])
    assert count(trained) > 0 and max_error(applied, trained) <= TOLERANCE and count(patched) == count(trained)
    kohya = load_file(lora.folder / "lora_kohya.safetensors")
    pipe = make_tiny_pipeline(kind)
    patches, unused = apply_kohya(kohya, comfyui_key_map(lora.family, pipe))
    expected = expected_native(trained, comfyui_key_map(lora.family, pipe), pipe)
    assert unused == set() and native_error(patches, expected) <= TOLERANCE and len(patches) == len(expected)


@pytest.mark.parametrize("kind", KINDS)
def test_the_run_quantized_every_eligible_linear_layer(runs, kind, tmp_path, capsys):
    main = unet_main if kind == "sd15" else flow_main
    main(argv(runs["assets"], kind, tmp_path / "out", "--base_quantization", "int8", "--max_train_steps", "1"))
    denoiser = getattr(make_tiny_pipeline(kind), denoiser_name(kind))
    eligible = sum(1 for m in denoiser.modules() if quantizable(m))
    assert eligible > 0
    assert f"--base_quantization int8: {eligible} linear layers of {type(denoiser).__name__} quantized" \
        in capsys.readouterr().out


def test_quantization_backends_and_devices_are_checked_first(runs, tmp_path, monkeypatch):
    import importlib.util

    assert quantization_problem("int8", torch.device("cpu")) is None
    assert quantization_problem("nf4", torch.device("cpu")) in (
        "--base_quantization nf4 needs a CUDA GPU; on the CPU use --base_quantization int8",
        "--base_quantization nf4 needs bitsandbytes: pip install 'diffusers-ztsnr[nf4]'")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert quantization_problem("int8", torch.device("cpu")) == \
        "--base_quantization int8 needs torchao: pip install 'diffusers-ztsnr[quantization]'"
    with pytest.raises(UsageError, match=r"needs torchao: pip install 'diffusers-ztsnr\[quantization\]'"):
        unet_main(argv(runs["assets"], "sd15", tmp_path / "refused", "--base_quantization", "int8"))
    assert not (tmp_path / "refused").exists()
