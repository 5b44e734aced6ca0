"""Offline fixtures for tests, examples, benchmarks and the demo; nothing here downloads anything.

- :mod:`~diffusers_ztsnr.testing.tiny`: tiny random-weight SD 1.5, SDXL, SD3 and Flux pipelines
  (``make_tiny_pipeline``, ``save_tiny_pipeline``, ``load_tiny_pipeline``).
- :mod:`~diffusers_ztsnr.testing.tiny_flux2_builders`: a tiny FLUX.2 dev (``build_flux2``) on a tiny Mistral 3.
- :mod:`~diffusers_ztsnr.testing.tokenizers`: the tiny CLIP and T5 tokenizers those pipelines use.
- :mod:`~diffusers_ztsnr.testing.released_schedulers`: released checkpoints' scheduler configs (package data).
- :mod:`~diffusers_ztsnr.testing.demo_data`: a generated image + caption set (``make_demo_dataset``).

The submodules import diffusers and transformers, so this package imports none of them itself.
"""
