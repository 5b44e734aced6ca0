"""Training library: objectives, data, LoRA and the training loop."""
