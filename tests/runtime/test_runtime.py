"""What the entry points share (byol_fast/runtime/process.py): when to save and stop, agreed by every rank,
and the settings derived from a config."""
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import ddp_env

from byol_fast.errors import ConfigError
from byol_fast.config import ReaderConfig
from byol_fast.runtime.process import NEVER, SaveSchedule
from byol_fast.runtime.device import decode_device, per_process_batch, resolve_precision


def test_a_stop_signal_stops_at_the_next_step_whatever_the_logging():
    schedule = SaveSchedule(NEVER, log=lambda msg: None)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        schedule.on_signals("stopping")
        assert schedule.poll() == (False, False)
        assert schedule.poll(epoch_end=True) == (True, False)  # epoch ends save
        assert schedule.poll(last=True) == (True, False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert schedule.poll() == (True, True)  # the very next poll: save, then stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_saves_fall_due_on_time():
    schedule = SaveSchedule(minutes=1e-9, log=print)
    assert schedule.poll() == (True, False)
    schedule = SaveSchedule(minutes=60, log=print)
    assert schedule.poll() == (False, False)
    schedule.last_save -= 3601
    assert schedule.poll() == (True, False)
    schedule.saved()
    assert schedule.poll() == (False, False)


def test_every_rank_stops_and_saves_at_the_same_steps():
    """Two gloo processes. Only rank 1 is signalled, at step 6: both stop at step 7. Only rank 0's
    clock says a save is due, at step 2: both save at step 3, once (not again at step 4)."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_agreeing_rank, args=(results, 29600 + os.getpid() % 300), nprocs=2)
    assert dict(results) == {0: ([3, 7], 7), 1: ([3, 7], 7)}


def _agreeing_rank(rank, results, port):
    import torch.distributed as tdist

    ddp_env(rank, 2, port)
    tdist.init_process_group("gloo")
    try:
        schedule = SaveSchedule(60, log=lambda msg: None)
        saves = []
        for step in range(1, 12):
            if rank == 0 and step == 2:
                schedule.last_save -= 3601  # an hour since the last save, on this rank's clock only
            if rank == 1 and step == 6:
                schedule.stop_requested = True
            save, stop = schedule.poll()
            if save:
                saves.append(step)
                schedule.saved()
            if stop:
                break
        results[rank] = (saves, step)
        schedule.close()
    finally:
        tdist.destroy_process_group()


def test_derived_settings():
    assert per_process_batch(4096, 8, 2) == 256
    with pytest.raises(ConfigError, match="optim.batch_size: 100 does not divide into 3 processes"):
        per_process_batch(100, 3, key="optim.batch_size")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("bf16", cpu)
    assert decode_device(ReaderConfig(), cpu) == "cpu"
    with pytest.raises(ConfigError, match="reader.decode"):
        decode_device(ReaderConfig(decode="gpu"), cpu)
    assert math.isinf(NEVER)


def test_teardown_ends_the_process_group_threads():
    """After an optimizer step (whose first call imports torch._dynamo) and teardown, no gloo thread
    is left: a process group that outlives teardown has its worker threads free tensors while the
    interpreter shuts down, which aborts the process at exit."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_stepping_rank, args=(results, 29300 + os.getpid() % 300), nprocs=2)
    assert dict(results) == {0: [], 1: []}


def _stepping_rank(rank, results, port):
    import torch.distributed as tdist
    from torch import nn

    from byol_fast.runtime import dist

    ddp_env(rank, 2, port)
    dist.setup(torch.device("cpu"))
    head = nn.Linear(4, 2)
    head(torch.randn(3, 4)).sum().backward()
    for p in head.parameters():
        tdist.all_reduce(p.grad)
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    dist.teardown()
    names = [(Path("/proc/self/task") / t / "comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    results[rank] = [n for n in names if "gloo" in n]
