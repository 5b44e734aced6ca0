"""--full_finetune: the epsilon -> v-prediction + zero-terminal-SNR conversion of the whole UNet.

The output folder is a pipeline stock diffusers loads (``from_pretrained``, this package unused by the loading) with
the trained UNet bit for bit, the base's other components unchanged and a stock scheduler configured for what was
trained; ``--export_checkpoint`` writes the same model as one file that ``from_single_file`` reads back with the
``v_pred`` / ``ztsnr`` keys; resume is exact; flags a full fine-tune cannot honour are refused.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from diffusers_ztsnr.markers import scheduler_settings_from_checkpoint
from diffusers_ztsnr.training.config import UsageError
from diffusers_ztsnr.training.unet import main
from tests.train_utils import RES, tiny_assets

pytestmark = pytest.mark.usefixtures("quiet_loading")
CONVERSION = ("--prediction_type", "v_prediction", "--zero_terminal_snr")


def run(assets, out, *extra, steps=3):
    return main(["--pretrained_model_name_or_path", str(assets["sd15"]), "--train_data_dir", str(assets["data"]),
                 "--resolution", str(RES), "--center_crop", "--train_batch_size", "2", "--max_train_steps", str(steps),
                 "--learning_rate", "1e-3", "--checkpointing_steps", "1", "--report_to", "none", "--full_finetune",
                 "--output_dir", str(out), *CONVERSION, *extra])


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    assets = tiny_assets(root, "sd15")
    out = root / "out"
    result = run(assets, out, "--export_checkpoint", "model.safetensors", "--export_dtype", "fp32")
    return assets, out, result


def test_the_output_folder_is_a_stock_pipeline_with_the_trained_unet(trained):
    assets, out, result = trained
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(assets["sd15"], safety_checker=None)
    checkpoint = load_file(out / "checkpoint-3" / "model_0.safetensors")
    unet = pipe.unet.state_dict()
    assert unet.keys() == checkpoint.keys() and all(torch.equal(unet[k], checkpoint[k]) for k in unet)
    moved = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, unet[k])]
    assert len(moved) > 0.9 * len(unet)  # every weight trains, not an adapter
    assert same(pipe.vae, base.vae) and same(pipe.text_encoder, base.text_encoder)
    assert type(pipe.scheduler).__module__.startswith("diffusers.")  # stock class, in model_index.json too
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"][0] == "diffusers" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "lora_kohya.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "# Fine-tune of" in card and "Every weight of the denoiser" in card and "load_lora_weights" not in card
    assert len(result["losses"]) == 3 and all(loss == loss for loss in result["losses"])


def test_the_single_file_reads_back_with_its_markers(trained):
    assets, out, _ = trained
    path = out / "model.safetensors"
    state = load_file(path)
    assert {"v_pred", "ztsnr"} <= state.keys()
    assert scheduler_settings_from_checkpoint(path) == {"prediction_type": "v_prediction",
                                                        "rescale_betas_zero_snr": True}
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(assets["sd15"]), local_files_only=True,
                                                      safety_checker=None)
    assert same(loaded.unet, UNet2DConditionModel.from_pretrained(out / "unet"))


def test_resume_is_exact(trained, tmp_path):
    assets = trained[0]
    straight = run(assets, tmp_path / "straight", steps=4)
    run(assets, tmp_path / "resumed", steps=2)
    resumed = run(assets, tmp_path / "resumed", "--resume_from_checkpoint", "latest", steps=4)
    assert resumed["losses"] == straight["losses"][2:]
    a = UNet2DConditionModel.from_pretrained(tmp_path / "straight" / "unet")
    b = UNet2DConditionModel.from_pretrained(tmp_path / "resumed" / "unet")
    assert same(a, b)


@pytest.mark.parametrize("flag", [("--adapter", "dora"), ("--adapter", "lokr"), ("--train_text_encoder",),
                                  ("--base_quantization", "int8")])
def test_flags_a_full_fine_tune_cannot_honour_are_refused(trained, tmp_path, flag):
    with pytest.raises(UsageError, match=rf"--full_finetune trains the whole denoiser without an adapter: drop "
                       rf"{' '.join(flag)}"):
        run(trained[0], tmp_path / "refused", *flag)
    assert not (tmp_path / "refused").exists()


def test_a_flow_transformer_full_fine_tune_is_a_stock_sd3_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from diffusers_ztsnr.training.flow import main as flow_main

    assets = tiny_assets(tmp_path, "sd3", num_images=2)
    out = tmp_path / "out"
    flow_main(["--pretrained_model_name_or_path", str(assets["sd3"]), "--train_data_dir", str(assets["data"]),
               "--resolution", str(RES), "--center_crop", "--max_train_steps", "2", "--checkpointing_steps", "1",
               "--learning_rate", "1e-3", "--report_to", "none", "--full_finetune", "--output_dir", str(out)])
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    checkpoint = load_file(out / "checkpoint-2" / "model_0.safetensors")
    state = pipe.transformer.state_dict()
    assert state.keys() == checkpoint.keys() and all(torch.equal(state[k], checkpoint[k]) for k in state)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler


def test_under_bf16_the_trained_weights_start_from_the_exact_base(trained, tmp_path):
    """The UNet is trained in fp32 whatever --mixed_precision says: at a learning rate of 1e-30 the exported UNet is
    the base to 1e-20 (only weights at exactly 0 can move, by about the learning rate); rounded through bf16 first,
    about 0.4% of every weight would differ."""
    from accelerate.state import AcceleratorState

    assets = trained[0]
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier in-process runs fixed mixed_precision="no"
    try:
        run(assets, tmp_path / "bf16", "--mixed_precision", "bf16", "--learning_rate", "1e-30", steps=1)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    base = UNet2DConditionModel.from_pretrained(assets["sd15"] / "unet").state_dict()
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "bf16" / "unet").state_dict()
    assert trained.keys() == base.keys() and all(trained[k].dtype == torch.float32 for k in trained)
    assert max(float((trained[k] - base[k]).abs().max()) for k in base) < 1e-20
