"""LoRA fine-tuning of flow transformers (SD3 / SD3.5, FLUX.1, Kontext, Chroma, Qwen-Image, Z-Image, FLUX.2 Klein)
with flow matching; see diffusers_ztsnr.training.flow.

    accelerate launch -q train_scripts/train_lora_flow.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \
        --train_data_dir my_images --weighting_scheme logit_normal --cache_latents --center_crop \
        --resolution 512 --max_train_steps 2000 --mixed_precision bf16 --output_dir my-flow-lora

    accelerate launch -q train_scripts/train_lora_flow.py --config examples/configs/flux_dev.yaml

A bad flag or input is one line on stderr and exit status 2 (`-q` keeps accelerate's traceback from following it).
"""

import sys

from diffusers_ztsnr.training.config import run_script
from diffusers_ztsnr.training.flow import main

if __name__ == "__main__":
    sys.exit(run_script(main))
