"""``--adapter lokr`` / ``loha``: ``lycoris.safetensors`` applies, by ComfyUI's rules, exactly the delta peft trained.

The trained delta of each module is peft's own (``get_delta_weight`` after the run's checkpoint is loaded onto a
fresh model with the same adapter config). ComfyUI's rules, as its ``comfy/weight_adapter/lokr.py`` and ``loha.py``
apply a LyCORIS file, written out here: LoKr ``kron(w1, w2)`` (a factor stored as ``_a`` / ``_b`` is their product)
times ``alpha / dim`` when a factor is stored as a product (``dim`` its rank) and times 1 otherwise; LoHa
``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / dim`` with ``dim = w1_b.shape[0]``. Module names are ComfyUI's key map for
the model (``conventions.comfyui_key_map``); every file key must be used.
"""

import json

import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_ztsnr.testing.tiny import make_tiny_pipeline
from diffusers_ztsnr.training.checkpointing import load_tensor_state
from diffusers_ztsnr.training.config import UsageError
from diffusers_ztsnr.training.flow import main as flow_main
from diffusers_ztsnr.training.lora import add_lora
from diffusers_ztsnr.training.unet import main as unet_main
from tests.integration.interop.conventions import comfyui_key_map
from tests.integration.interop.support import TRAINED_TEXT_ENCODERS, plain_path
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")
KINDS, ALGORITHMS = ("sd15", "sdxl"), ("lokr", "loha")
RANK, ALPHA = 4, 8.0
FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}
TARGETS = {"unet": ("to_k", "to_q", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lycoris")
    assets = tiny_assets(root, *KINDS, "sd3", num_images=2)
    out = {}
    for kind in KINDS:
        for algorithm in ALGORITHMS:
            folder = root / f"{kind}-{algorithm}"
            unet_main(["--pretrained_model_name_or_path", str(assets[kind]), "--train_data_dir", str(assets["data"]),
                       "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", "1",
                       "--learning_rate", "1e-2", "--rank", str(RANK), "--lora_alpha", str(ALPHA), "--adapter",
                       algorithm, "--train_text_encoder", "--checkpointing_steps", "1", "--report_to", "none",
                       "--output_dir", str(folder)])
            out[kind, algorithm] = folder
    return {"assets": assets, "folders": out}


def peft_deltas(kind: str, algorithm: str, folder) -> dict[tuple[str, str], torch.Tensor]:
    """``{(component, module): delta}`` peft applies after the run's checkpoint is loaded onto a fresh model."""
    pipe = make_tiny_pipeline(kind)
    (checkpoint,) = sorted(folder.glob("checkpoint-*"))
    deltas = {}
    for i, component in enumerate(("unet", *TRAINED_TEXT_ENCODERS[kind])):
        model = getattr(pipe, component)
        add_lora(model, RANK, ALPHA, TARGETS["unet" if component == "unet" else "text_encoder"], adapter=algorithm)
        set_peft_model_state_dict(model, load_tensor_state(checkpoint / f"lora_{i}.safetensors")[0])
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and getattr(module, "active_adapters", None):
                deltas[component, plain_path(name)] = module.get_delta_weight("default").detach().double()
    return deltas


def comfyui_deltas(lycoris: dict[str, torch.Tensor], key_map) -> tuple[dict, set[str]]:
    """What ComfyUI adds to each module's weight (strength 1), and the file keys no module used."""
    out, used = {}, set()
    for name, native in key_map.items():
        get = {suffix: lycoris.get(f"{name}.{suffix}") for suffix in (
            "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "hada_w1_a", "hada_w1_b",
            "hada_w2_a", "hada_w2_b", "alpha")}
        used.update(f"{name}.{k}" for k, v in get.items() if v is not None)
        alpha = None if get["alpha"] is None else float(get["alpha"])
        if get["hada_w1_a"] is not None:
            product = (get["hada_w1_a"] @ get["hada_w1_b"]).double() * (get["hada_w2_a"] @ get["hada_w2_b"]).double()
            dim = get["hada_w1_b"].shape[0]
            delta = product * (alpha / dim if alpha is not None else 1.0)
        elif get["lokr_w1"] is not None or get["lokr_w1_a"] is not None:
            dim = None
            w1, w2 = get["lokr_w1"], get["lokr_w2"]
            if w1 is None:
                dim, w1 = get["lokr_w1_b"].shape[0], get["lokr_w1_a"] @ get["lokr_w1_b"]
            if w2 is None:
                dim, w2 = get["lokr_w2_b"].shape[0], get["lokr_w2_a"] @ get["lokr_w2_b"]
            scale = alpha / dim if alpha is not None and dim is not None else 1.0
            delta = torch.kron(w1.double(), w2.double()) * scale
        else:
            continue
        ((component, path),) = native.parts
        out[component, path] = delta
    return out, set(lycoris) - used


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", KINDS)
def test_comfyui_applies_the_trained_delta_to_every_module(runs, kind, algorithm):
    folder = runs["folders"][kind, algorithm]
    trained = peft_deltas(kind, algorithm, folder)
    lycoris = load_file(folder / "lycoris.safetensors")
    applied, unused = comfyui_deltas(lycoris, comfyui_key_map(FAMILY[kind], make_tiny_pipeline(kind)))
    assert unused == set() and set(applied) == set(trained) and len(trained) > 0
    worst = max(float((applied[k] - trained[k]).abs().max()) for k in trained)
    assert worst <= 1e-6
    assert sum(float(d.abs().max()) > 0 for d in trained.values()) >= len(trained) // 2  # one step moved most


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_files_say_what_loads_them(runs, algorithm):
    folder = runs["folders"]["sd15", algorithm]
    assert not (folder / "pytorch_lora_weights.safetensors").exists()
    assert not (folder / "lora_kohya.safetensors").exists()
    with safe_open(str(folder / "lycoris.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": algorithm}
    card = (folder / "README.md").read_text()
    assert "`lycoris.safetensors` holds it in LyCORIS' key names" in card and "load_lora_weights(" not in card


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flow_transformers_refuse_lycoris_adapters(runs, tmp_path, algorithm):
    assets = runs["assets"]
    with pytest.raises(UsageError, match=rf"--adapter {algorithm}: its LyCORIS export covers SD 1.x / 2.x / SDXL"):
        flow_main(["--pretrained_model_name_or_path", str(assets["sd3"]), "--train_data_dir", str(assets["data"]),
                   "--resolution", str(RES), "--adapter", algorithm, "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_merged_export_of_a_lycoris_adapter_is_refused_up_front(runs, tmp_path, algorithm):
    assets = runs["assets"]
    with pytest.raises(UsageError, match=rf"--adapter {algorithm} with --export_checkpoint: the merged export reads"):
        unet_main(["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
                   "--resolution", str(RES), "--adapter", algorithm, "--export_checkpoint", "m.safetensors",
                   "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
