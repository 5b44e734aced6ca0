"""LoRA fine-tuning of SD 1.x / 2.x / SDXL UNets; see diffusers_ztsnr.training.unet.

    accelerate launch -q train_scripts/train_lora_unet.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir my_images --prediction_type v_prediction --zero_terminal_snr \
        --snr_gamma 5.0 --max_train_steps 2000 --output_dir my-lora

    accelerate launch -q train_scripts/train_lora_unet.py --config examples/configs/sd15_v_ztsnr.yaml

A bad flag or input is one line on stderr and exit status 2 (`-q` keeps accelerate's traceback from following it).
"""

import sys

from diffusers_ztsnr.training.config import run_script
from diffusers_ztsnr.training.unet import main

if __name__ == "__main__":
    sys.exit(run_script(main))
