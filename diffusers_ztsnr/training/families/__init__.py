"""Model families the training scripts train: one module each, a :class:`~diffusers_ztsnr.training.task.ModelTask`
subclass that loads, encodes and calls its denoiser.

* :mod:`.sd`: SD 1.x / 2.x / SDXL UNets (``train_lora_unet.py``);
* :mod:`.flow_transformers`: SD3 and Flux transformers (``train_lora_flow.py``);
* :mod:`.registry`: which task trains a base model, from its pipeline class.
"""
