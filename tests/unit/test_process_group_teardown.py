"""The training loop's process group is let go last, from Python: when the keeper drops it, the DDP wrapper (whose
C++ Reducer would otherwise free the group with the GIL held, and can hang in gloo's destructor) is gone, after a
clean end and after an error alike."""

import weakref

import pytest
import torch
import torch.distributed as dist

from diffusers_ztsnr.training.distributed import ProcessGroupKeeper, run_keeping_process_group


@pytest.fixture
def one_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def seen_at_release(monkeypatch):
    """What the keeper sees as it lets go: whether it still holds the group, and the run's wrapper (a weak
    reference: ``None`` once freed)."""
    seen = {}
    release = ProcessGroupKeeper.release

    def checked_release(keeper):
        seen["held"] = keeper.holds_group
        seen["wrapper alive"] = seen["wrapper"]() is not None
        release(keeper)

    monkeypatch.setattr(ProcessGroupKeeper, "release", checked_release)
    return seen


def train_like_the_loop(keeper: ProcessGroupKeeper, seen: dict, fail: bool = False) -> float:
    """What the loop does with the group: keep it, train a DDP wrapper (in a reference cycle, as the accelerator
    holds it) with a gather at the end, destroy the group (accelerate's ``end_training``) while the wrapper is still
    referenced here; with ``fail``, raise instead of returning."""
    keeper.keep()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    model.cycle = [model]  # freed only by the garbage collector
    seen["wrapper"] = weakref.ref(model)
    model(torch.ones(3, 4)).sum().backward()
    gathered = [torch.zeros(1)]
    dist.all_gather(gathered, torch.ones(1))
    dist.barrier()
    dist.destroy_process_group()
    if fail:
        raise OSError("no space left on device")
    return float(gathered[0])


def test_after_a_clean_end_the_wrapper_is_freed_before_the_keeper_lets_go(one_process_group, seen_at_release):
    assert run_keeping_process_group(lambda keeper: train_like_the_loop(keeper, seen_at_release)) == 1.0
    assert (seen_at_release["held"], seen_at_release["wrapper alive"]) == (True, False)


def test_after_an_error_the_wrapper_is_freed_before_the_keeper_lets_go(one_process_group, seen_at_release):
    with pytest.raises(OSError, match="no space left"):
        run_keeping_process_group(lambda keeper: train_like_the_loop(keeper, seen_at_release, fail=True))
    assert (seen_at_release["held"], seen_at_release["wrapper alive"]) == (True, False)


def test_without_an_initialized_group_the_keeper_holds_nothing_and_an_error_keeps_its_locals():
    keeper = ProcessGroupKeeper()
    keeper.keep()
    assert not keeper.holds_group
    assert run_keeping_process_group(lambda k: 7) == 7

    def failing(keeper):
        keeper.keep()
        local_for_a_debugger = 42  # noqa: F841
        raise ValueError("bad input")

    with pytest.raises(ValueError) as caught:
        run_keeping_process_group(failing)
    assert caught.traceback[-1].frame.f_locals["local_for_a_debugger"] == 42
