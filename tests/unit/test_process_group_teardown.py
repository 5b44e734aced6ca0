"""The training loop's process group is freed last, from Python: by the time the keeper drops it, no DDP wrapper
(whose C++ Reducer would otherwise free the group with the GIL held, and can hang in gloo's destructor) is alive,
and the keeper's is the group's only Python reference."""

import gc
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

from diffusers_ztsnr.training.distributed import ProcessGroupKeeper, run_keeping_process_group


def live_ddp_wrappers() -> int:
    with warnings.catch_warnings():  # isinstance on every live object touches deprecated module attributes
        warnings.simplefilter("ignore")
        return sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())


@pytest.fixture
def one_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def train_like_the_loop(keeper: ProcessGroupKeeper) -> float:
    """What the loop does with the group: keep it, train a DDP wrapper with a gather at the end, then destroy the
    group (accelerate's ``end_training``) while the wrapper is still referenced here, in a reference cycle too."""
    keeper.keep()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    model.cycle = [model]  # freed only by the garbage collector
    model(torch.ones(3, 4)).sum().backward()
    gathered = [torch.zeros(1)]
    dist.all_gather(gathered, torch.ones(1))
    dist.barrier()
    dist.destroy_process_group()
    return float(gathered[0])


def test_the_keeper_holds_the_groups_last_reference_once_no_ddp_wrapper_is_alive(one_process_group, monkeypatch):
    seen = {}
    release = ProcessGroupKeeper.release

    def checked_release(keeper):
        seen["ddp"], seen["refs"] = live_ddp_wrappers(), sys.getrefcount(keeper._group)
        release(keeper)

    monkeypatch.setattr(ProcessGroupKeeper, "release", checked_release)
    assert run_keeping_process_group(train_like_the_loop) == 1.0
    assert seen == {"ddp": 0, "refs": 2}  # getrefcount counts its own argument


def test_without_an_initialized_group_the_keeper_holds_nothing():
    keeper = ProcessGroupKeeper()
    keeper.keep()
    assert keeper._group is None
    assert run_keeping_process_group(lambda k: 7) == 7


def test_an_error_in_the_run_propagates(one_process_group):
    def failing(keeper):
        keeper.keep()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run_keeping_process_group(failing)
