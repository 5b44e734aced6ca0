"""--base_quantization on plain layers: which layers, how much smaller, how close the output stays."""

import pytest
import torch

from diffusers_ztsnr.training.quantization import quantize_base, quantized_bytes

pytest.importorskip("torchao", reason="int8 / fp8 need torchao (the test extra installs it)")


def layers(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                               torch.nn.Linear(256, 10))  # the last: 10 outputs, not a multiple of 16


@pytest.mark.parametrize("choice,bits,tolerance", [("int8", 8, 0.02), ("fp8", 8, 0.1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eligible_layers_shrink_and_the_output_stays_close(choice, bits, tolerance, seed):
    model = layers(seed)
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(seed))
    reference, before = model(x).detach(), quantized_bytes(model)
    assert quantize_base(model, choice, torch.float32) == 2
    assert type(model[3].weight) is torch.nn.Parameter  # left as it was
    weights_before = 2 * 256 * 256 * 4
    saved = before - quantized_bytes(model)
    assert saved > 0.7 * weights_before * (1 - bits / 32)  # about 4x smaller weights, scales aside
    error = (model(x) - reference).norm() / reference.norm()
    assert error < tolerance


def test_none_leaves_the_model_alone():
    model = layers(0)
    assert quantize_base(model, "none", torch.float32) == 0 and type(model[0].weight) is torch.nn.Parameter
