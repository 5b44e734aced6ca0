"""``--base_quantization``: the frozen denoiser's linear layers stored in 8 or 4 bits, LoRA trained on top in fp32.

The LoRA weights never see the quantization: peft wraps each quantized linear layer (its torchao and bitsandbytes
layer types) and adds ``B @ A`` in full precision, so the exported LoRA has the keys of an unquantized model and
loads on the original base (what users sample with). Only the denoiser is quantized; it is the bulk of the memory,
and a cached run parks the encoders off the GPU anyway.

========  ==============================================  ===================  ============
choice    format                                          backend              runs on
========  ==============================================  ===================  ============
int8      int8 weights, per-channel scale (weight-only)   torchao              CPU and GPU
fp8       float8 e4m3 weights, per-channel scale          torchao              GPU (sm 89+; CPU)
nf4       4-bit NormalFloat, blocks of 64 (QLoRA)         bitsandbytes         GPU
========  ==============================================  ===================  ============
"""

from __future__ import annotations

import functools
import importlib.util

import torch

QUANTIZATIONS = ("none", "int8", "fp8", "nf4")
#: ``{choice: (module it imports, pip extra that installs it)}``
BACKENDS = {"int8": ("torchao", "quantization"), "fp8": ("torchao", "quantization"),
            "nf4": ("bitsandbytes", "nf4")}
#: the choices that need a CUDA device
GPU_ONLY = ("nf4",)


def quantization_problem(choice: str, device: torch.device) -> str | None:
    """Why ``--base_quantization choice`` cannot run here (backend missing, or a GPU format on the CPU), else
    ``None``."""
    if choice == "none":
        return None
    module, extra = BACKENDS[choice]
    if importlib.util.find_spec(module) is None:
        return (f"--base_quantization {choice} needs {module}: pip install 'diffusers-ztsnr[{extra}]'")
    if choice in GPU_ONLY and device.type != "cuda":
        return f"--base_quantization {choice} needs a CUDA GPU; on the CPU use --base_quantization int8"
    return None


def quantizable(module: torch.nn.Module) -> bool:
    """Linear layers whose both sides are multiples of 16 (the quantized kernels' tile), the rest stay as they
    are (in SD-style models: none of the large ones)."""
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_base(model: torch.nn.Module, choice: str, compute_dtype: torch.dtype,
                  device: torch.device | str | None = None) -> int:
    """Quantize ``model``'s eligible linear layers in place (call before the LoRA adapters are added), each on
    ``device`` (default: where it is): one layer at a time reaches the device unquantized, so the peak memory is
    the quantized model plus one layer. Returns how many linear layers now hold quantized weights."""
    if choice == "none":
        return 0
    layers = [m for m in model.modules() if quantizable(m)]
    if choice == "nf4":
        _to_nf4(model, compute_dtype, device)
    else:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if choice == "int8" else Float8WeightOnlyConfig()
        for layer in layers:
            if device is not None:
                layer.to(device)
            quantize_(layer, config)
            layer.forward = functools.partial(_frozen_quantized_linear, layer)
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and is_quantized(m.weight))


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """``x @ W.T + b`` for a frozen quantized ``W`` that keeps only ``W`` (quantized) for the backward pass and
    dequantizes it there, one layer at a time. Without it autograd records torchao's dequantization and saves
    every layer's dequantized weight until the backward pass: a full-precision copy of the model (measured on an
    H200 with SD3-medium: peak 11.6 GiB int8 vs 9.6 GiB unquantized bf16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.dequantize().to(grad.dtype), None, None


def _frozen_quantized_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _FrozenQuantizedMatmul.apply(x, layer.weight, layer.bias)


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao tensor subclass, or bitsandbytes' packed 4-bit parameter."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def _to_nf4(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device | str | None) -> None:
    """Swap each eligible ``nn.Linear`` for a bitsandbytes ``Linear4bit`` holding its weights; bitsandbytes
    quantizes them when they reach the GPU."""
    import bitsandbytes as bnb

    device = device if device is not None else next(model.parameters()).device
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not quantizable(child):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
            layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            setattr(parent, name, layer.to(device))


def quantized_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers hold as stored (quantized tensors count their packed data)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        inner = getattr(tensor, "__tensor_flatten__", None)
        if inner is not None:  # a torchao tensor subclass: sum its inner tensors
            names, _ = inner()
            total += sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)
        else:
            total += tensor.numel() * tensor.element_size()
    return total
