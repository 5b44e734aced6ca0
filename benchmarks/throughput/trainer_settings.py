"""The rows of the table and the settings both trainers of a row share (LoRA targets, Flux defaults)."""

ROW_CACHED = "ours, --cache_latents (cache hit)"
ROW_UNCACHED = "ours, no cache"
ROW_PLAIN = "plain diffusers-example loop"
ROWS = (ROW_CACHED, ROW_UNCACHED, ROW_PLAIN)
TARGET_SPEEDUP = 1.5
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# diffusers' train_dreambooth_lora_sd3.py default (and our flow trainer's default for SD3)
SD3_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v"]
# Flux rows: the attention projections of the image stream (double and single blocks), passed to our trainer as
# --lora_layers so both trainers put LoRA on the same modules
FLUX_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]
FLUX_WEIGHTING = "none"  # diffusers' train_dreambooth_lora_flux.py default; passed to our trainer too
FLUX_MAX_SEQUENCE_LENGTH = 512  # the Flux script's default T5 length (and our trainer's for Flux)
FLUX_GUIDANCE = 3.5  # the Flux script's default --guidance_scale (and our trainer's)
FAMILIES = ("unet", "flow")
# keyed by a result's "kind" (its family where it has none: the UNet and SD3 rows)
DENOISER = {"unet": "UNet", "flow": "SD3 transformer", "flux": "Flux transformer"}
ENCODERS = {"unet": "VAE + text", "flow": "VAE + CLIP x 2 + T5", "flux": "VAE + CLIP + T5"}
