"""diffusers-protocol schedulers over this package's schedule, spacing, conversion and solver maths."""

from .base import ZTSNRSchedulerBase, ZTSNRSchedulerOutput
from .ddim import ZTSNRDDIMScheduler
from .euler import ZTSNREulerAncestralScheduler, ZTSNREulerScheduler
from .flow import ZTSNRFlowMatchScheduler
from .multistep import ZTSNRDPMSolverMultistepScheduler
from .unipc import ZTSNRUniPCMultistepScheduler

__all__ = [
    "ZTSNRSchedulerBase",
    "ZTSNRSchedulerOutput",
    "ZTSNRDDIMScheduler",
    "ZTSNREulerScheduler",
    "ZTSNREulerAncestralScheduler",
    "ZTSNRDPMSolverMultistepScheduler",
    "ZTSNRFlowMatchScheduler",
    "ZTSNRUniPCMultistepScheduler",
]
