"""The training loss by noise level: per-sample losses averaged per tenth of the objective's time range."""

import pytest
import torch

from diffusers_ztsnr.schedule import VPSchedule
from diffusers_ztsnr.training.loss_bins import LossByNoise, noise_fraction
from diffusers_ztsnr.training.objectives import DiffusionObjective, FlowMatchingObjective


def test_losses_are_averaged_per_tenth_and_flush_empties():
    bins = LossByNoise()
    bins.add(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0.05, 0.07, 0.95]))
    bins.add(torch.tensor([5.0]), torch.tensor([1.0]))  # pure noise falls in the last tenth
    assert bins.flush() == {"loss_by_noise/0.0-0.1": 2.0, "loss_by_noise/0.9-1.0": 7.5}
    assert bins.flush() == {}


def test_noise_fraction_is_the_objectives_time_over_its_range():
    schedule = VPSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    vp = DiffusionObjective(schedule, "epsilon")
    assert noise_fraction(vp, torch.tensor([0, 500, 999])).tolist() == pytest.approx([0.0, 0.5, 0.999])
    flow = FlowMatchingObjective()
    assert noise_fraction(flow, torch.tensor([0.25, 1.0])).tolist() == [0.25, 1.0]
