"""What every entry point shares: device and precision, the process, errors, stop signals, saving.

The drivers (``byol_fast.train``, ``byol_fast.linear_eval``, ``byol_fast.export``) and the benchmark
sit on this module and never import each other:

- :func:`resolve_device`, :func:`resolve_precision`, :func:`decode_device`, :func:`per_process_batch`:
  settings derived from a config and the machine, never written back into the config;
- :class:`Process`: this process's rank, world and device, and logging from rank 0 only;
- :func:`run_cli`: a user mistake (bad key, missing data, unreadable checkpoint) becomes one line
  ``error: ...`` on stderr and exit status 2, never a traceback;
- :class:`SaveSchedule`: when a run saves (every N minutes, at epoch ends, at the last step, on
  SIGTERM/SIGUSR1), agreed by all ranks at the same step; a stopped run exits with
  :data:`PREEMPTED_EXIT` so a scheduler requeues it.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Callable

import torch
import torch.distributed as tdist

from pipelines.contract import ReadError

from . import dist
from .checkpoint import CheckpointError
from .config import ConfigError, ReaderConfig
from .index import DatasetError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on a signal after saving; run the same command again


class DivergedError(RuntimeError):
    """Too many non-finite steps in a row."""


# What a user can cause and fix: reported in one line, exit status 2.
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, DivergedError, FileNotFoundError, ReadError)


def run_cli(body: Callable[[], int]) -> int:
    """``body()``'s exit status; a user error prints ``error: <message>`` and gives 2. The process
    group is torn down either way."""
    try:
        return body()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.teardown()


# ---------------------------------------------------------------------------- derived settings


def resolve_device(name: str) -> torch.device:
    """``device`` of a config (auto | cuda | cpu) -> the device type this run uses."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA GPU is visible (use --device=cpu or auto)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``precision`` of a config -> the autocast dtype: bf16 where the GPU supports it, else fp16
    (with a GradScaler); fp32 on the CPU."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    if precision in ("bf16", "fp16") and device.type == "cpu":
        raise ConfigError(f"precision: {precision!r} mixed precision needs a CUDA GPU (use fp32 or auto on the CPU)")
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def decode_device(reader: ReaderConfig, device: torch.device) -> str:
    """Where DALI decodes and augments: ``reader.decode``, with auto = gpu on a CUDA device, else cpu."""
    where = ("gpu" if device.type == "cuda" else "cpu") if reader.decode == "auto" else reader.decode
    if where == "gpu" and device.type != "cuda":
        raise ConfigError("reader.decode: 'gpu' needs a run on a CUDA GPU")
    return where


def per_process_batch(batch_size: int, world_size: int, accumulate: int = 1, key: str = "batch_size") -> int:
    """Images of one forward pass in one process: batch / (world size x accumulation steps)."""
    parts = world_size * accumulate
    if accumulate < 1 or batch_size % parts:
        raise ConfigError(f"{key}: {batch_size} does not divide into {world_size} processes "
                          f"x {accumulate} accumulation steps")
    return batch_size // parts


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of images (N, 3, H, W) on the training device in its memory format (a no-op for
    DALI's GPU output, which is already there and channels_last)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


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
        from .checkpoint import git_revision

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
