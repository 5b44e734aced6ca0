"""LoRA fine-tuning of SD 1.x / 2.x / SDXL UNets; see diffusers_ztsnr.training.unet.

    accelerate launch train_scripts/train_lora_unet.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir my_images --prediction_type v_prediction --zero_terminal_snr \
        --snr_gamma 5.0 --max_train_steps 2000 --output_dir my-lora
"""

import sys

from diffusers_ztsnr.training.unet import main

if __name__ == "__main__":
    main(sys.argv[1:])
