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


def saved_new_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass beyond the model's own tensors (a quantized weight saved as it is
    counts nothing: it is resident anyway)."""
    resident = {p.untyped_storage().data_ptr() for p in model.parameters() if type(p) is torch.nn.Parameter}
    total = 0

    def pack(t):
        nonlocal total
        if type(t) in (torch.Tensor, torch.nn.Parameter) and t.untyped_storage().data_ptr() not in resident:
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().pow(2).mean().backward()
    return total


def lora_on(choice: str, seed: int) -> torch.nn.Sequential:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]).to(torch.bfloat16)
    model.requires_grad_(False)
    quantize_base(model, choice, torch.bfloat16)
    return inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "1", "2", "3"]), model)


@pytest.mark.parametrize("choice", ["int8", "fp8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_backward_pass_keeps_no_dequantized_copy_of_the_weights(choice, seed):
    x = torch.randn(4, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))
    # the bf16 weights of the layers whose input needs a gradient (all but the first)
    weights = 3 * 256 * 256 * 2
    unquantized = saved_new_bytes(lora_on("none", seed), x)
    model = lora_on(choice, seed)
    assert saved_new_bytes(model, x) <= unquantized + 4096  # activations only, as without quantization
    for layer in model:  # torchao's own linear, as before the fix: a dequantized copy of every weight is kept
        del layer.base_layer.forward
    assert saved_new_bytes(model, x) >= unquantized + weights


def test_the_input_gradient_through_a_quantized_layer_uses_the_dequantized_weight():
    layer = torch.nn.Linear(256, 256)
    layer.requires_grad_(False)
    quantize_base(layer, "int8", torch.float32)
    x = torch.randn(8, 256, requires_grad=True)
    layer(x).pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    weight = layer.weight.dequantize()
    torch.nn.functional.linear(reference, weight, layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-4)
