"""Single-file export: LoRA merged into its base, original (LDM) layout, v_pred/ztsnr markers, read back by diffusers'
own single-file loader (``from_single_file`` and its converters) on tiny models trained in-process for 2 steps."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffusers_ztsnr import cli, ldm_keys
from diffusers_ztsnr.markers import scheduler_settings_from_checkpoint
from diffusers_ztsnr.single_file import export_single_file, lora_sampling_settings
from diffusers_ztsnr.training.unet import main as train
from tests.train_utils import RES, tiny_assets

V_ZTSNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
RANK, ALPHA = 8, 4.0


pytestmark = pytest.mark.usefixtures("quiet_loading")  # diffusers' and transformers' loading chatter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny SD1.5 / SDXL bases and 2-step LoRAs: v + ZTSNR (SD1.5, SDXL) and epsilon (SD1.5), alpha != rank."""
    root = tmp_path_factory.mktemp("single_file")
    assets = tiny_assets(root, "sd15", "sdxl")
    for name, model, extra in [("v15", "sd15", ["--prediction_type", "v_prediction", "--zero_terminal_snr"]),
                               ("eps15", "sd15", ["--prediction_type", "epsilon"]),
                               ("vxl", "sdxl", ["--prediction_type", "v_prediction", "--zero_terminal_snr"])]:
        train(["--pretrained_model_name_or_path", str(assets[model]), "--train_data_dir", str(assets["data"]),
               "--resolution", str(RES), "--train_batch_size", "4", "--max_train_steps", "2", "--center_crop",
               "--output_dir", str(root / name), "--learning_rate", "1e-2", "--rank", str(RANK), "--lora_alpha",
               str(ALPHA), "--report_to", "none", "--checkpointing_steps", "1000", *extra])
        assets[name] = root / name
    return assets


def fused(pipeline_class, base, lora):
    """diffusers' own merge; the file loads at the trained scale alpha / rank."""
    pipe = pipeline_class.from_pretrained(base)
    pipe.load_lora_weights(lora)
    assert pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.scaling["default_0"] == ALPHA / RANK
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def test_sd15_round_trip_is_bitwise_and_carries_the_markers(runs, tmp_path):
    out = tmp_path / "v15.safetensors"
    result = export_single_file(runs["v15"], out, dtype="fp32")
    assert result["family"] == "sd1" and result["base"] == str(runs["sd15"])
    assert result["markers"] == ["v_pred", "ztsnr"]
    state = load_file(out)
    assert {"v_pred", "ztsnr"} <= state.keys() and all(v.dtype == torch.float32 for v in state.values())
    assert sum(k.startswith("model.diffusion_model.") for k in state) == result["keys"]["unet"]
    assert sum(k.startswith("first_stage_model.") for k in state) == result["keys"]["vae"]
    clip_keys = sum(k.startswith("cond_stage_model.transformer.text_model.") for k in state)
    assert clip_keys == result["keys"]["text_encoder"]
    assert scheduler_settings_from_checkpoint(out) == V_ZTSNR  # the marker keys read back from the file
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(runs["sd15"]), local_files_only=True,
                                                      safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(runs["sd15"])
    assert_same(loaded.unet, fused(StableDiffusionPipeline, runs["sd15"], runs["v15"]).unet)
    assert_same(loaded.vae, base.vae)
    assert_same(loaded.text_encoder, base.text_encoder)
    # the merge is exactly the trained delta B @ A * alpha / rank, here on the first LoRA module of the file
    lora = load_file(runs["v15"] / "pytorch_lora_weights.safetensors")
    suffixes = {".lora_A.weight": ".lora_B.weight", ".lora.down.weight": ".lora.up.weight"}  # peft / diffusers names
    down, a, b = next((k, a, b) for k in sorted(lora) for a, b in suffixes.items() if k.endswith(a))
    module = down[len("unet."):-len(a)]
    delta = lora[module.join(("unet.", b))] @ lora[down] * ALPHA / RANK
    merged, original = loaded.unet.state_dict()[module + ".weight"], base.unet.state_dict()[module + ".weight"]
    assert float(delta.abs().max()) > 0
    torch.testing.assert_close(merged - original, delta, rtol=0, atol=1e-6)
    assert any("ModelSamplingDiscrete" in line and "v_prediction" in line and "zsnr = true" in line
               for line in result["instructions"])


def test_epsilon_export_has_no_markers(runs, tmp_path):
    result = export_single_file(runs["eps15"], tmp_path / "eps.safetensors", dtype="bf16")
    state = load_file(result["path"])
    assert "v_pred" not in state and "ztsnr" not in state and result["markers"] == [] and not result["instructions"]
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    epsilon = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    assert scheduler_settings_from_checkpoint(result["path"]) == epsilon


def test_sdxl_round_trip_and_comfyui_reads_the_markers(runs, tmp_path):
    out = tmp_path / "vxl.safetensors"
    result = export_single_file(runs["vxl"], out, dtype="fp32")
    assert result["family"] == "sdxl" and result["markers"] == ["v_pred", "ztsnr"]
    assert "no ModelSamplingDiscrete node" in result["instructions"][0]
    state = load_file(out)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert scheduler_settings_from_checkpoint(state) == V_ZTSNR
    base = StableDiffusionXLPipeline.from_pretrained(runs["sdxl"])
    # from_single_file tells the two CLIP towers apart by width; the tiny ones are both 32 wide (SDXL: 768 / 1280),
    # so the OpenCLIP tower goes through diffusers' own converter for it, below
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(runs["sdxl"]), local_files_only=True,
                                                        text_encoder_2=base.text_encoder_2)
    assert_same(loaded.unet, fused(StableDiffusionXLPipeline, runs["sdxl"], runs["vxl"]).unet)
    assert_same(loaded.vae, base.vae)
    assert_same(loaded.text_encoder, base.text_encoder)
    te2 = CLIPTextModelWithProjection(base.text_encoder_2.config)
    te2.load_state_dict(convert_open_clip_checkpoint(te2, state, prefix="conditioner.embedders.1.model."))
    assert_same(te2, base.text_encoder_2)


def test_sd2_open_clip_layout_round_trip(runs, tmp_path):
    """SD 2.x's OpenCLIP layout (fused in_proj attention) on the tiny CLIP text encoder, read by from_single_file."""
    result = export_single_file(runs["v15"], tmp_path / "sd2.safetensors", dtype="fp32",
                                text_encoder_layout="open_clip")
    state = load_file(result["path"])
    fused_qkv = state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert result["family"] == "sd2" and fused_qkv.shape == (3 * 32, 32)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    loaded = StableDiffusionPipeline.from_single_file(str(result["path"]), config=str(runs["sd15"]),
                                                      local_files_only=True, safety_checker=None)
    assert_same(loaded.text_encoder, StableDiffusionPipeline.from_pretrained(runs["sd15"]).text_encoder)
    assert any(line.startswith("A1111") and "v2-inference-v.yaml" in line for line in result["instructions"])


def test_cli_prints_the_settings_and_takes_the_base_from_training_args(runs, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert cli.main(["export-checkpoint", str(runs["v15"]), str(out), "--dtype", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert f"base {runs['sd15']}" in printed and "marker keys: v_pred, ztsnr" in printed
    assert "ModelSamplingDiscrete node after Load Checkpoint with sampling = v_prediction, zsnr = true" in printed
    assert 'parameterization: "v"' in printed and "Zero Terminal SNR" in printed
    assert load_file(out)["model.diffusion_model.out.2.weight"].dtype == torch.float16


def test_scheduler_config_and_metadata_must_agree(runs, tmp_path):
    lora = tmp_path / "lora"
    shutil.copytree(runs["v15"], lora, ignore=shutil.ignore_patterns("checkpoint-*"))
    config_path = lora / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, rescale_betas_zero_snr=False)))
    with pytest.raises(ValueError, match="scheduler_config.json"):
        lora_sampling_settings(lora)
    weights = lora / "pytorch_lora_weights.safetensors"
    save_file(load_file(weights), weights)  # no metadata: the scheduler config alone decides
    config_path.write_text(json.dumps(dict(config, prediction_type="sample")))
    with pytest.raises(ValueError, match="no single-file marker"):  # markers say epsilon or v_prediction only
        lora_sampling_settings(lora)
    (lora / "training_args.json").unlink()
    config_path.write_text(json.dumps(config))
    with pytest.raises(SystemExit):  # the CLI turns the missing base into a one-line usage error
        cli.main(["export-checkpoint", str(lora), str(tmp_path / "x.safetensors")])


SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], attention_head_dim=8,
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL_UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)


def clip(hidden, layers, act, cls=CLIPTextModel):
    return cls(CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=hidden // 64, hidden_act=act, projection_dim=hidden))


def inverted_exactly(back, original):
    """Same keys and shapes; ``text_model.`` aside (transformers >= 5.6 no longer nests CLIPTextModel in it)."""
    back, original = ({k.removeprefix("text_model."): v for k, v in d.items()} for d in (back, original))
    return back.keys() == original.keys() and all(back[k].shape == original[k].shape for k in original)


def test_full_size_architectures_map_completely_and_diffusers_reads_them_back():
    """Released SD 1.5 / 2.1 / SDXL shapes (weights on the meta device): every key maps, diffusers' converters invert
    the map exactly, and diffusers' single-file detection names each family from our keys."""
    with torch.device("meta"):
        unets = {name: UNet2DConditionModel(**config) for name, config in
                 [("v1", SD15_UNET), ("v2", SD21_UNET), ("xl_base", SDXL_UNET)]}
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        clip_l, clip_h = clip(768, 12, "quick_gelu"), clip(1024, 23, "gelu")
        clip_g = clip(1280, 32, "gelu", CLIPTextModelWithProjection)
    first_stage = ldm_keys.convert_vae(vae.state_dict(), vae.config)
    assert len(first_stage) == 248
    assert inverted_exactly(convert_ldm_vae_checkpoint(first_stage, dict(vae.config)), vae.state_dict())
    with pytest.raises(ValueError, match="no original"):  # a key the map does not know is an error, never dropped
        ldm_keys.convert_vae({**vae.state_dict(), "encoder.extra.weight": torch.zeros(1)}, vae.config)
    text = {"v1": ldm_keys.convert_clip(clip_l.state_dict(), ldm_keys.SD1_CLIP_PREFIX),
            "v2": ldm_keys.convert_open_clip(clip_h.state_dict(), ldm_keys.SD2_OPEN_CLIP_PREFIX),
            "xl_base": {**ldm_keys.convert_clip(clip_l.state_dict(), ldm_keys.SDXL_CLIP_PREFIX),
                        **ldm_keys.convert_open_clip(clip_g.state_dict(), ldm_keys.SDXL_OPEN_CLIP_PREFIX)}}
    assert [len(text["v1"]), len(text["v2"]), len(text["xl_base"])] == [196, 280, 196 + 389]
    for family, unet in unets.items():
        model = ldm_keys.convert_unet(unet.state_dict(), unet.config)
        assert len(model) == (1680 if family == "xl_base" else 686)
        assert inverted_exactly(convert_ldm_unet_checkpoint(model, dict(unet.config)), unet.state_dict())
        assert infer_diffusers_model_type({**model, **first_stage, **text[family]}) == family
    for model, prefix in [(clip_h, ldm_keys.SD2_OPEN_CLIP_PREFIX), (clip_g, ldm_keys.SDXL_OPEN_CLIP_PREFIX)]:
        back = convert_open_clip_checkpoint(model, text["v2" if model is clip_h else "xl_base"], prefix=prefix)
        assert inverted_exactly(back, model.state_dict())


def test_training_flag_exports_the_merged_checkpoint_and_uploads_it(runs, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    sent = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **_: huggingface_hub.RepoUrl(
        f"https://huggingface.co/me/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: sent.update(kw))
    out = tmp_path / "out"
    result = train(["--pretrained_model_name_or_path", str(runs["sd15"]), "--train_data_dir", str(runs["data"]),
                    "--resolution", str(RES), "--train_batch_size", "4", "--max_train_steps", "1", "--center_crop",
                    "--output_dir", str(out), "--report_to", "none", "--prediction_type", "v_prediction",
                    "--zero_terminal_snr", "--export_checkpoint", "merged.safetensors", "--export_dtype", "fp32",
                    "--push_to_hub", "--hub_model_id", "merged"])
    assert result["checkpoint"] == out / "merged.safetensors"
    merged = export_single_file(out, tmp_path / "again.safetensors", dtype="fp32")
    state, again = load_file(out / "merged.safetensors"), load_file(merged["path"])
    assert {"v_pred", "ztsnr"} <= state.keys() and state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)  # the flag and the command write the same file
    assert "merged.safetensors" in sent["allow_patterns"]
    assert "ModelSamplingDiscrete" in capsys.readouterr().out  # SD 1.x: the UI setting is printed
