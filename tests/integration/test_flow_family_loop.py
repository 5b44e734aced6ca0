"""The shared loop on every newer flow family (SD3.5, FLUX.1 Kontext, Chroma, Qwen-Image, Z-Image, FLUX.2 Klein
and dev): aspect-ratio buckets hand each transformer non-square latents, a second run hits the encodings cache and
trains exactly as the run that built it, and two DDP processes end with identical LoRA weights."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from diffusers_ztsnr.testing import tiny_flow_builders as builders
from diffusers_ztsnr.testing.tiny_flux2_builders import build_flux2
from diffusers_ztsnr.training.flow import main as flow_main
from tests.train_utils import two_process_run

BUILDERS = {"sd35": builders.build_sd35, "kontext": builders.build_flux_kontext, "chroma": builders.build_chroma,
            "qwen-image": builders.build_qwen_image, "z-image": builders.build_z_image,
            "flux2-klein": builders.build_flux2_klein, "flux2": build_flux2}
#: FLUX.2 dev's system message alone is about 230 character-level tokens of the tiny tokenizer
EXTRA = {"flux2": ("--max_sequence_length", "288")}
SIZES = [(48, 32), (48, 32), (32, 48), (32, 48)]  # landscape and portrait: two buckets at 32 px

pytestmark = pytest.mark.usefixtures("quiet_loading")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-loop")
    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, build in BUILDERS.items():
            folders[kind] = root / kind
            build(0).save_pretrained(folders[kind])
    data = root / "mixed"
    data.mkdir()
    rows = []
    for i, size in enumerate(SIZES):
        Image.new("RGB", size, (50 * i, 200 - 40 * i, 90)).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a flat colour number {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return {**folders, "data": data}


def argv(assets, kind, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(assets[kind]), "--train_data_dir", str(assets["data"]),
            "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2", "--max_train_steps",
            str(steps), "--rank", "4", "--learning_rate", "1e-3", "--report_to", "none", "--bucketing",
            *EXTRA.get(kind, ()), *extra]


@pytest.mark.parametrize("kind", BUILDERS)
def test_buckets_and_a_cache_hit_train_as_the_run_that_built_the_cache(assets, tmp_path, kind):
    cache = ["--cache_latents", "--cache_latents_dir", str(tmp_path / "cache"), "--center_crop"]
    built = flow_main(argv(assets, kind, tmp_path / "a", 4, *cache))
    hit = flow_main(argv(assets, kind, tmp_path / "b", 4, *cache))
    assert built["global_step"] == hit["global_step"] == 4
    assert np.isfinite(built["losses"]).all()
    assert built["cache"]["misses"] == len(SIZES) and hit["cache"]["misses"] == 0
    assert hit["cache"]["hits"] == len(SIZES)
    np.testing.assert_array_equal(hit["losses"], built["losses"])


def ddp_params():
    # one family in every CI run; the others (about 25 s each) behind the slow marker
    return [kind if kind == "z-image" else pytest.param(kind, marks=pytest.mark.slow) for kind in BUILDERS]


@pytest.mark.parametrize("kind", ddp_params())
def test_two_processes_hold_identical_weights(assets, tmp_path, kind):
    out = tmp_path / "ddp"
    args = argv(assets, kind, out, 3, "--checkpointing_steps", "2")
    summary = two_process_run("train_lora_flow.py", args, out)
    assert summary["global_step"] == 3 and (out / "pytorch_lora_weights.safetensors").is_file()
