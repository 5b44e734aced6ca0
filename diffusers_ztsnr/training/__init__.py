"""Training library: objectives, data, LoRA and the training loop."""

from .log_filters import install_optional_kernel_filter

install_optional_kernel_filter()  # before diffusers / peft import torchao: see log_filters.OPTIONAL_KERNEL_NOTICES
