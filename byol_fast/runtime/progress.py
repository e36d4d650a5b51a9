"""Progress of long work: images per second, the training loop's window between log points, a
throttled progress line with an ETA (index checks, shard packing), and durations at a glance."""
from __future__ import annotations

import contextlib
import sys
import time

import torch


class Throughput:
    """Images per second over the window since the last :meth:`read`."""

    def __init__(self):
        self.images = 0
        self.start = time.perf_counter()

    def add(self, n: int) -> None:
        self.images += n

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.start, 1e-9)
        self.images, self.start = 0, now
        return rate


class Window:
    """What happened between two log points of the training loop, kept without a host sync.

    The loop wraps each fetch of a batch in :meth:`waiting` (host seconds blocked on the loader) and
    calls :meth:`add` after each step with its device loss and finite flag; at a log point
    :meth:`loss` gives the mean loss of the applied steps as a device tensor, and, once the caller
    has synced on it, :meth:`read` gives images/s, the fraction of the window spent waiting for
    data and the seconds per step (for the ETA), and starts the next window.

    The wait is measured on the host. The CPU runs ahead of the GPU between log points, so a short
    wait can hide behind queued GPU work; a wait that shows here is one the GPU felt too, because the
    window ends after the sync on its last step.
    """

    def __init__(self, device: torch.device):
        self._loss_sum = torch.zeros((), device=device)
        self._applied = torch.zeros((), device=device)
        self._start = time.perf_counter()
        self.steps, self._images, self._waited = 0, 0, 0.0

    @contextlib.contextmanager
    def waiting(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._waited += time.perf_counter() - start

    def add(self, loss: torch.Tensor, ok: torch.Tensor, images: int) -> None:
        self._loss_sum += torch.where(ok, loss, 0.0)  # a skipped step's loss may be NaN
        self._applied += ok
        self.steps += 1
        self._images += images

    def loss(self) -> torch.Tensor:
        """Mean loss over the window's applied steps (0 if none), on the device."""
        return self._loss_sum / self._applied.clamp(min=1)

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self._start, 1e-9)
        out = {"images_per_s": self._images / seconds, "data_wait": min(self._waited / seconds, 1.0),
               "seconds_per_step": seconds / max(self.steps, 1)}
        self._loss_sum.zero_()
        self._applied.zero_()
        self._start, self.steps, self._images, self._waited = now, 0, 0, 0.0
        return out


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 185 -> '3m05s', 9.4 -> '9s': an ETA at a glance."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Throttled progress line on stderr: done/total, rate, ETA; counted in files, or in ``unit`` of
    ``scale`` (e.g. MB of 1e6 bytes)."""

    def __init__(self, total: int, label: str, enabled: bool, unit: str = "files", scale: float = 1.0):
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.unit, self.scale = unit, scale
        self.tty = sys.stderr.isatty()
        # Overwrite one line on a terminal; in a log file, a line every 15 s is plenty.
        self.interval = 0.5 if self.tty else 15.0
        self.start = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.interval):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        eta = max(eta, 0.0)  # a total estimated beforehand may be passed
        if self.scale == 1.0:
            counts = f"{done}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s"
        else:
            k = self.scale
            counts = f"{done / k:.1f}/{self.total / k:.1f} {self.unit}, {rate / k:.1f} {self.unit}/s"
        line = f"{self.label}: {counts}, ETA {format_duration(eta)}"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
