"""diffusers-ztsnr: zero-terminal-SNR sampling, parameterization conversion and LoRA fine-tuning for diffusers.

Scheduler classes are exported at the top level so that a pipeline saved with one of them
(``model_index.json`` names the library ``diffusers_ztsnr``) loads back with ``from_pretrained``.
"""

from .parameterization import PARAMETERIZATIONS, SingularParameterizationError, convert, from_x0_eps, to_x0_eps
from .schedule import VPSchedule, flow_mu, rescale_zero_terminal_snr
from .schedulers import (
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
)

__version__ = "0.1.0"

__all__ = [
    "PARAMETERIZATIONS",
    "SingularParameterizationError",
    "VPSchedule",
    "ZTSNRDDIMScheduler",
    "ZTSNRDPMSolverMultistepScheduler",
    "ZTSNREulerAncestralScheduler",
    "ZTSNREulerScheduler",
    "ZTSNRFlowMatchScheduler",
    "convert",
    "flow_mu",
    "from_x0_eps",
    "rescale_zero_terminal_snr",
    "to_x0_eps",
]
