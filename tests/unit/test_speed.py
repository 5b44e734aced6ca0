"""Speed settings: which blocks --torch_compile compiles, the fused AdamW, dataloader defaults, encoder parking."""

import argparse

import pytest
import torch

from diffusers_ztsnr.training.speed import (
    EncoderParking,
    compile_denoiser,
    dataloader_options,
    optimizer_options,
    repeated_block_names,
)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8,
                                attention_head_dim=2, norm_num_groups=4)


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                                 pooled_projection_dim=8, out_channels=4)


def test_regional_blocks_are_diffusers_own_else_ours():
    assert repeated_block_names(tiny_unet()) == ("BasicTransformerBlock",)
    assert repeated_block_names(tiny_sd3()) == ("JointTransformerBlock",)  # diffusers declares none for SD3
    with pytest.raises(ValueError, match=r"Linear declares no repeated blocks; use --torch_compile full"):
        repeated_block_names(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("build,count", [(tiny_unet, 4), (tiny_sd3, 3)])  # UNet: down 1, mid 1, up 2
def test_regional_compile_wraps_each_block_and_keeps_the_state_dict_keys(build, count):
    model = build()
    keys = list(model.state_dict())
    assert compile_denoiser(model, "regional") == count
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == count and {type(m).__name__ for m in compiled} == set(repeated_block_names(model))
    assert list(model.state_dict()) == keys  # checkpoints and LoRA exports see the eager names
    assert compile_denoiser(build(), "none") == 0


def test_adamw_is_fused_only_when_every_parameter_is_on_a_gpu():
    assert optimizer_options([torch.nn.Parameter(torch.zeros(2))]) == {}
    assert optimizer_options([]) == {}
    if torch.cuda.is_available():
        assert optimizer_options([torch.nn.Parameter(torch.zeros(2, device="cuda"))]) == {"fused": True}


def test_dataloader_defaults_depend_on_the_device():
    default = argparse.Namespace(dataloader_num_workers=None)
    assert dataloader_options(default, torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}
    gpu = dataloader_options(default, torch.device("cuda"))
    assert gpu["pin_memory"] is True and 1 <= gpu["num_workers"] <= 4
    assert "persistent_workers" not in gpu  # workers restart each epoch, so they see the epoch's seed
    given = dataloader_options(argparse.Namespace(dataloader_num_workers=2), torch.device("cpu"))
    assert given == {"num_workers": 2, "pin_memory": False}


class Recorder(torch.nn.Module):
    """Records where it is sent instead of moving (there is no GPU to move to here)."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_parked_encoders_come_to_the_device_only_while_used():
    vae, te = Recorder(), Recorder()
    parking = EncoderParking([vae, te], torch.device("cuda", 0))
    parking.park()
    parking.park()  # already parked: no second move
    assert vae.moves == te.moves == ["cpu"]
    with parking.on_device():
        assert te.moves == ["cpu", "cuda:0"] and not parking.parked
        with parking.on_device():  # nested: nothing moves
            pass
    assert te.moves == ["cpu", "cuda:0", "cpu"] and parking.parked
    unparked = EncoderParking([Recorder()], torch.device("cuda", 0))
    with unparked.on_device():  # never parked: stays where it is
        pass
    assert unparked.modules[0].moves == []
    cpu = EncoderParking([Recorder()], torch.device("cpu"))
    cpu.park()
    assert cpu.modules[0].moves == [] and not cpu.parked  # on the CPU there is nothing to free
