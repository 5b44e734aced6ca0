"""Two gloo processes end a DDP run through :func:`run_keeping_process_group` many times in a row without hanging.

Each round does what the training loop's last moments do (a DDP backward, a gather of a fresh tensor, a barrier,
accelerate's ``destroy_process_group``) and then frees the DDP wrapper. Without the keeper the wrapper's C++ Reducer
drops the group's last reference with the GIL held, and gloo's destructor waits for a worker thread that needs the
GIL: measured on a 2-CPU machine, each of three runs of such rounds hung within its first 7 rounds; with the keeper,
200 rounds finished. The hang is a race, so a regression is caught with high probability, not certainty (less on a
machine with many idle cores); a pass never depends on timing."""

import faulthandler
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusers_ztsnr.training.distributed import ProcessGroupKeeper, run_keeping_process_group

ROUNDS = 30
TIMEOUT_S = 120  # 30 rounds take about 7 s


def last_moments_of_a_run(keeper: ProcessGroupKeeper) -> None:
    """The end of a training run on one rank, through the keeper."""
    keeper.keep()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
    model(torch.ones(8, 64)).sum().backward()
    gathered = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(gathered, torch.ones(1))
    del gathered  # the gather's tensors now belong to gloo's work objects alone
    dist.barrier()
    dist.destroy_process_group()


def rounds(rank: int, folder: str) -> None:
    """One spawned process: ``ROUNDS`` process groups, each ended as a run ends; its stacks on stderr if it hangs."""
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(TIMEOUT_S - 10)
    for i in range(ROUNDS):
        dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store-{i}", 2), rank=rank, world_size=2)
        run_keeping_process_group(last_moments_of_a_run)


def test_two_processes_end_thirty_ddp_runs_without_hanging(tmp_path):
    context = mp.start_processes(rounds, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"two processes still running {ROUNDS} teardowns after {TIMEOUT_S} s: a hang")
    assert [p.exitcode for p in context.processes] == [0, 0]
