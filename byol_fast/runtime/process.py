"""The process a training command runs as: its rank, world and device, and when it saves and stops.

Pretraining (``byol_fast.train``), linear evaluation and fine-tuning (``byol_fast.evaluation.run``)
and the benchmark use it:

- :class:`Process`: this process's rank, world and device, and logging from rank 0 only;
- :class:`SaveSchedule`: when a run saves (every N minutes, at epoch ends, at the last step, on
  SIGTERM/SIGUSR1), agreed by all ranks at the same step; a stopped run exits with
  :data:`PREEMPTED_EXIT` so a scheduler requeues it;
- :func:`git_revision`: the code's revision, recorded in the banner, checkpoints and results.

The settings derived from a config and the machine (device, precision, per-process batch) are in
``byol_fast.runtime.device``; how a command turns a user mistake into one line is in
``byol_fast.runtime.cli``.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist

from byol_fast.runtime import dist
from byol_fast.runtime.device import resolve_device

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on a signal after saving; run the same command again


# ---------------------------------------------------------------------------- the process


class Process:
    """This process of a (possibly one-process) run: rank, world, device; logs from rank 0."""

    def __init__(self, device: str):
        kind = resolve_device(device)
        self.info = dist.setup(kind)
        self.device = dist.local_device(kind, self.info)

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def log(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)

    def banner(self, what: str) -> str:
        return (f"byol_fast {git_revision()} | {what} | {self.info.world_size} process(es) on {self.device} "
                f"| rank 0 pid {os.getpid()}")


# ---------------------------------------------------------------------------- stopping and saving


class SaveSchedule:
    """When to save and when to stop, the same answer on every rank at the same step.

    Call :meth:`poll` once per step on every rank. It says save at an epoch end, at the last step,
    once ``minutes`` have passed since the last save (``math.inf``: never on time), and when
    SIGTERM or SIGUSR1 arrived (preemption: then also stop). With several processes the time and
    signal flags are combined by an all-reduce on a CPU (gloo) group, started at one poll and read at
    the next: it never waits on the GPU, and every rank acts on the same flags one step later.
    """

    def __init__(self, minutes: float, log: Callable[[str], None]):
        self.interval = 60.0 * minutes
        self.log = log
        self.stop_requested = False
        self.last_save = time.monotonic()
        self._group = None
        self._pending = None  # (work, flags, poll number) of the all-reduce started by a poll
        self._polls = 0
        self._saved_at = -1  # poll number of the last save
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            self._group = tdist.new_group(backend="gloo")

    def on_signals(self, then: str) -> None:
        """SIGTERM and SIGUSR1 set the stop flag and log ``received signal N: <then>``."""

        def handler(signum, frame) -> None:
            self.log(f"received signal {signum}: {then}")
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def poll(self, epoch_end: bool = False, last: bool = False) -> tuple[bool, bool]:
        """(save now, stop after saving) for the step just taken."""
        due = time.monotonic() - self.last_save > self.interval
        stop, due = self._agree(self.stop_requested, due)
        return stop or due or epoch_end or last, stop

    def saved(self) -> None:
        self.last_save = time.monotonic()
        self._saved_at = self._polls

    def close(self) -> None:
        """Finish the all-reduce in flight (every rank started it, so it completes)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def _agree(self, stop: bool, due: bool) -> tuple[bool, bool]:
        self._polls += 1
        if self._group is None:
            return stop, due
        agreed = (False, False)
        if self._pending is not None:
            work, flags, started = self._pending
            work.wait()  # started a step ago on CPU threads: finished, or nearly
            # A save since that poll (every rank made it, at the same step) answers its "due".
            agreed = (bool(flags[0]), bool(flags[1]) and started > self._saved_at)
        flags = torch.tensor([float(stop), float(due)])
        work = tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flags, self._polls)
        return agreed


NEVER = math.inf  # SaveSchedule minutes for a run that saves only at epoch ends and on stop


def git_revision() -> str:
    """The code's git revision (with '-dirty' for uncommitted changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
