"""diffusers-ztsnr: zero-terminal-SNR sampling, parameterization conversion and LoRA fine-tuning for diffusers.

Scheduler classes are exported at the top level so that a pipeline saved with one of them
(``model_index.json`` names the library ``diffusers_ztsnr``) loads back with ``from_pretrained``.
"""

# diffusers' pipeline loader looks the loading base classes up on the library module named in
# model_index.json, so SchedulerMixin must be an attribute of this package.
from diffusers import SchedulerMixin  # noqa: F401

from .parameterization import PARAMETERIZATIONS, SingularParameterizationError, convert, from_x0_eps, to_x0_eps
from .schedule import VPSchedule, flow_mu, rescale_zero_terminal_snr
from .schedulers import (
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
    ZTSNRUniPCMultistepScheduler,
)

__version__ = "0.1.0"

# model_index.json records a non-diffusers class as (cls.__module__, name): make that the public
# package, not our internal module layout, so saved pipelines survive refactors and load back.
for _cls in (
    ZTSNRDDIMScheduler,
    ZTSNRDPMSolverMultistepScheduler,
    ZTSNREulerAncestralScheduler,
    ZTSNREulerScheduler,
    ZTSNRFlowMatchScheduler,
    ZTSNRUniPCMultistepScheduler,
):
    _cls.__module__ = __name__
del _cls

__all__ = [
    "PARAMETERIZATIONS",
    "SingularParameterizationError",
    "VPSchedule",
    "ZTSNRDDIMScheduler",
    "ZTSNRDPMSolverMultistepScheduler",
    "ZTSNREulerAncestralScheduler",
    "ZTSNREulerScheduler",
    "ZTSNRFlowMatchScheduler",
    "ZTSNRUniPCMultistepScheduler",
    "convert",
    "flow_mu",
    "from_x0_eps",
    "rescale_zero_terminal_snr",
    "to_x0_eps",
]
