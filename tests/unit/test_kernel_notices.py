"""The training scripts drop only the import-time notices about optional compiled kernels they never use."""

import logging

import pytest

import diffusers_ztsnr.training  # noqa: F401  (installs the filter)
from diffusers_ztsnr.training.log_filters import install_optional_kernel_filter


@pytest.mark.parametrize("name,message,args,kept", [
    ("torchao", "Failed to load /x/_C_mxfp8.so: Could not load this library", None, False),
    ("torchao", "Skipping import of cpp extensions due to incompatible torch version", None, False),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects. This may", None,
     False),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported", ("<enum 'KernelPreference'>",),
     False),
    ("torchao", "quantize_ got an unsupported layer", None, True),
    ("torch.utils._pytree", "%s is not a registered type", ("Foo",), True),
    ("diffusers.pipelines.pipeline_utils", "Failed to load the scheduler", None, True),
])
def test_only_the_listed_notices_are_dropped(name, message, args, kept):
    install_optional_kernel_filter()  # idempotent
    logger = logging.getLogger(name)
    assert logger.filter(logger.makeRecord(name, logging.WARNING, __file__, 1, message, args, None)) is kept
    assert sum(type(f).__name__ == "_DropPrefixes" for f in logger.filters) <= 1
