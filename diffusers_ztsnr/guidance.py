"""Classifier-free-guidance rescale (Lin et al. 2023, arXiv:2305.08891, §3.4, eqs. 15-16) for any pipeline.

With a zero-terminal-SNR schedule large guidance scales over-expose; the fix rescales the guided
prediction to the standard deviation of the conditional one and blends:
``x_cfg = u + w (c - u)``, ``x_rescaled = x_cfg * std(c) / std(x_cfg)``,
``x = phi * x_rescaled + (1 - phi) * x_cfg`` (``phi ~ 0.7``), std per sample over all other dims.

StableDiffusion(XL)Pipeline has this as its ``guidance_rescale`` argument; StableDiffusion3Pipeline and
FluxPipeline have none. :func:`generate_with_guidance_rescale` gives it to all four: for SD3 and Flux
it hooks the denoiser for the duration of one call and replaces the unconditional prediction ``u`` by
``u'`` such that the pipeline's own ``u' + w (c - u')`` equals the rescaled ``x``.
"""

from __future__ import annotations

from typing import Any

import torch


def rescale_guided_prediction(guided: torch.Tensor, conditional: torch.Tensor, phi: float) -> torch.Tensor:
    """Eqs. 15-16 of Lin et al.: match ``std(conditional)`` per sample, then blend with weight ``phi``."""
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance_rescale={phi} must lie in [0, 1] (the paper uses 0.7).")
    dims = tuple(range(1, guided.ndim))
    work = torch.promote_types(guided.dtype, torch.float32)
    g, c = guided.to(work), conditional.to(work)
    std_g = g.std(dim=dims, keepdim=True)
    std_c = c.std(dim=dims, keepdim=True)
    # a constant prediction has std 0: nothing to rescale there
    scale = torch.where(std_g > 0, std_c / std_g.clamp(min=torch.finfo(work).tiny), torch.ones_like(std_g))
    return (phi * g * scale + (1 - phi) * g).to(guided.dtype)


def _unconditional_for(target: torch.Tensor, conditional: torch.Tensor, scale: float) -> torch.Tensor:
    """``u'`` with ``u' + scale * (c - u') == target`` (needs ``scale != 1``)."""
    return (scale * conditional - target) / (scale - 1)


class _GuidanceRescaleHook:
    """Forward hook on a denoiser that rewrites its unconditional output (see module docstring)."""

    def __init__(self, phi: float, scale: float, mode: str):
        self.phi, self.scale, self.mode = phi, scale, mode
        self._conditional: torch.Tensor | None = None

    def __call__(self, module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        if self.mode == "batched":  # [uncond, cond] in one call: SD3
            uncond, cond = sample.chunk(2)
            target = rescale_guided_prediction(uncond + self.scale * (cond - uncond), cond, self.phi)
            new = torch.cat([_unconditional_for(target, cond, self.scale), cond])
        else:  # sequential: Flux calls cond, then uncond
            if self._conditional is None:
                self._conditional = sample
                return None
            cond, uncond = self._conditional, sample
            self._conditional = None
            target = rescale_guided_prediction(uncond + self.scale * (cond - uncond), cond, self.phi)
            new = _unconditional_for(target, cond, self.scale)
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output


def generate_with_guidance_rescale(pipe, guidance_rescale: float = 0.7, **call_kwargs: Any):
    """Call ``pipe(**call_kwargs)`` with CFG rescale ``guidance_rescale`` (phi), for SD 1.x/2.x, SDXL,
    SD3 and Flux pipelines. Returns what the pipeline returns.

    Flux applies true CFG only with ``true_cfg_scale > 1`` and a negative prompt; SD3 with
    ``guidance_scale > 1``. Without CFG there is nothing to rescale, and the call runs unchanged.
    """
    rescale_guided_prediction(torch.zeros(1, 1), torch.zeros(1, 1), guidance_rescale)  # validates phi
    name = type(pipe).__name__
    if name.startswith("StableDiffusion") and not name.startswith("StableDiffusion3"):
        return pipe(guidance_rescale=guidance_rescale, **call_kwargs)
    if name.startswith("StableDiffusion3"):
        if call_kwargs.get("skip_guidance_layers"):
            raise ValueError("generate_with_guidance_rescale does not support skip_guidance_layers (extra passes).")
        scale, mode, module = call_kwargs.get("guidance_scale", 7.0), "batched", pipe.transformer
    elif name.startswith("Flux"):
        has_negative = call_kwargs.get("negative_prompt") is not None or (
            call_kwargs.get("negative_prompt_embeds") is not None
        )
        scale = call_kwargs.get("true_cfg_scale", 1.0) if has_negative else 1.0
        mode, module = "sequential", pipe.transformer
    else:
        raise ValueError(
            f"{name} is not supported; generate_with_guidance_rescale knows StableDiffusionPipeline, "
            "StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline."
        )
    if scale <= 1:
        return pipe(**call_kwargs)
    handle = module.register_forward_hook(_GuidanceRescaleHook(guidance_rescale, scale, mode), with_kwargs=True)
    try:
        return pipe(**call_kwargs)
    finally:
        handle.remove()
