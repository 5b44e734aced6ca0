"""Both LoRA files, every family, every consumer, alpha = rank and alpha != rank: the delta each consumer applies
is the trained ``lora_B @ lora_A * alpha / rank``, on exactly the trained modules.

Adapters are added directly to the tiny models with seeded random weights and written by the training scripts'
save functions (tests/integration/interop/test_lora_training_runs.py does the same through the real scripts). Consumers:
diffusers (``load_lora_weights`` + ``fuse_lora``, fused minus base weights), and ComfyUI's and sd-scripts' key
conventions (tests/integration/interop/conventions.py) on the kohya file.
"""


import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_ztsnr.testing.tiny import make_tiny_pipeline
from tests.integration.interop.conventions import (
    apply_kohya,
    comfyui_key_map,
    expected_native,
    native_error,
    sd_scripts_names,
)
from tests.integration.interop.support import (
    KINDS,
    TOLERANCE,
    TrainedLora,
    add_random_loras,
    count,
    diffusers_applied,
    direct_lora,
    max_error,
    save_both_files,
)

RANK = 8
ALPHAS = (8.0, 4.0)  # alpha = rank, and alpha != rank (scale 0.5)
KOHYA = "lora_kohya.safetensors"


pytestmark = pytest.mark.usefixtures("quiet_loading")  # diffusers' and transformers' loading chatter


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {(kind, alpha): direct_lora(kind, root / f"{kind}-{alpha:g}", RANK, alpha, seed=7)
            for kind in KINDS for alpha in ALPHAS}


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_loads_the_diffusers_file_as_trained(loras, kind, alpha):
    lora = loras[kind, alpha]
    trained = lora.deltas()
    applied, patched = diffusers_applied(make_tiny_pipeline(kind), str(lora.folder), list(trained))
    assert max_error(applied, trained) <= TOLERANCE
    assert count(applied) == count(patched) == count(trained)
    assert {c: set(d) for c, d in applied.items()} == {c: set(d) for c, d in trained.items()}


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_loads_the_kohya_file_as_trained(loras, kind, alpha):
    lora = loras[kind, alpha]
    trained = lora.deltas()
    applied, patched = diffusers_applied(make_tiny_pipeline(kind), str(lora.folder / KOHYA), list(trained))
    assert max_error(applied, trained) <= TOLERANCE
    assert count(applied) == count(patched) == count(trained)


@pytest.mark.parametrize("consumer", ["comfyui", "sd-scripts"])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("kind", KINDS)
def test_comfyui_and_sd_scripts_apply_the_kohya_file_as_trained(loras, kind, alpha, consumer):
    lora = loras[kind, alpha]
    pipe = make_tiny_pipeline(kind)
    names = (comfyui_key_map if consumer == "comfyui" else sd_scripts_names)(lora.family, pipe)
    patches, unused = apply_kohya(load_file(lora.folder / KOHYA), names)
    assert unused == set()  # every key maps onto a module of the consumer's model
    expected = expected_native(lora.deltas(), names, pipe)
    assert native_error(patches, expected) <= TOLERANCE
    assert len(patches) == len(expected)


def test_flux_kohya_double_blocks_and_text_encoder_load_in_diffusers(tmp_path):
    """diffusers' Flux kohya converter splits ``linear1`` with FLUX.1's widths hard-coded, so the tiny model's
    single block is checked on a FLUX.1-wide block below; here every default target of the double block."""
    for alpha in ALPHAS:
        pipe = make_tiny_pipeline("flux")
        states = add_random_loras(pipe, "flux", RANK, alpha, seed=3, double_blocks_only=True)
        lora = TrainedLora("flux", states, alpha, save_both_files(pipe, "flux", states, alpha, tmp_path / f"{alpha}"))
        trained = lora.deltas()
        applied, patched = diffusers_applied(make_tiny_pipeline("flux"), str(lora.folder / KOHYA), list(trained))
        assert max_error(applied, trained) <= TOLERANCE
        assert count(applied) == count(patched) == count(trained) == 12 + 8


@pytest.mark.parametrize("alpha", ALPHAS)
def test_flux_kohya_single_block_qkv_loads_in_diffusers_at_flux1_width(tmp_path, alpha):
    from tests.integration.interop.support import wide_flux_single_block_check

    error, changed, patched = wide_flux_single_block_check(tmp_path, RANK, alpha)
    assert error <= TOLERANCE
    assert changed == {f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"}
    # diffusers' converter always makes all four parts of linear1: the MLP input gets a zero LoRA (no effect)
    assert patched == changed | {"single_transformer_blocks.0.proj_mlp"}


def test_kohya_file_holds_lora_weights_and_sd_scripts_metadata_only(loras):
    for (kind, alpha), lora in loras.items():
        with safe_open(str(lora.folder / KOHYA), "pt") as f:
            keys, metadata = set(f.keys()), f.metadata()
        assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys), kind
        assert not keys & {"v_pred", "ztsnr"}
        assert metadata["ss_network_dim"] == str(RANK) and float(metadata["ss_network_alpha"]) == alpha
        assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)
        assert any("_text_model_encoder_layers_" in k for k in keys)  # transformers 5 dropped that level


def test_fused_qkv_is_block_diagonal_with_alpha_scaled_to_its_rank(loras):
    lora = loras["sd3", 4.0]
    kohya = load_file(lora.folder / KOHYA)
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
    assert down.shape[0] == 3 * RANK and float(kohya[f"{name}.alpha"]) == 3 * 4.0
    inner = up.shape[0] // 3
    for j in range(3):
        for k in range(3):
            block = up[j * inner:(j + 1) * inner, k * RANK:(k + 1) * RANK]
            assert (block.abs().sum() > 0) == (j == k)
    assert torch.equal(down[:RANK], lora.states["transformer"]["transformer_blocks.0.attn.to_q.lora_A.weight"])


@pytest.mark.parametrize("alpha", ALPHAS)
def test_sd3_kohya_file_loads_through_our_loader_where_diffusers_has_no_converter(loras, alpha):
    from diffusers_ztsnr.markers import load_lora_weights

    lora = loras["sd3", alpha]
    trained = lora.deltas()
    # diffusers 0.42 has no kohya converter for SD3: it loads nothing (and logs "No LoRA keys associated ...")
    applied, patched = diffusers_applied(make_tiny_pipeline("sd3"), str(lora.folder / KOHYA), list(trained))
    assert count(applied) == count(patched) == 0
    applied, patched = diffusers_applied(make_tiny_pipeline("sd3"), str(lora.folder / KOHYA), list(trained),
                                         load=load_lora_weights)
    assert max_error(applied, trained) <= TOLERANCE
    assert count(applied) == count(patched) == count(trained)


def test_flux_kohya_file_of_any_width_loads_through_our_loader(loras):
    from diffusers_ztsnr.markers import load_lora_weights

    for alpha in ALPHAS:
        lora = loras["flux", alpha]
        trained = lora.deltas()
        applied, patched = diffusers_applied(make_tiny_pipeline("flux"), str(lora.folder / KOHYA), list(trained),
                                             load=load_lora_weights)
        assert max_error(applied, trained) <= TOLERANCE
        assert count(applied) == count(patched) == count(trained)
