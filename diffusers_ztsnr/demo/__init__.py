"""The offline demo (``diffusers-ztsnr demo``): an epsilon model on SD's schedule, its conversion to v-prediction
+ zero terminal SNR with this package's training library, and the before/after figure."""

from .run import DemoResult, DemoSettings, run_demo

__all__ = ["DemoResult", "DemoSettings", "run_demo"]
