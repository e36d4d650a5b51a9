"""Throughput, the training window, collapse statistics and the TensorBoard writer (main process only)."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F


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


def collapse_stats(projection: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-dimension std of L2-normalised projections (N, D), as device tensors (no sync).

    Healthy representations give a mean std near 1/sqrt(D); a collapsed one gives 0.
    'dead_fraction' counts dimensions whose std is under a tenth of 1/sqrt(D).
    """
    z = F.normalize(projection.float(), dim=1)
    std = z.std(dim=0)
    healthy = z.shape[1] ** -0.5
    return {"collapse/std": std.mean(), "collapse/std_x_sqrt_d": std.mean() / healthy,
            "collapse/dead_fraction": (std < 0.1 * healthy).float().mean()}


def pair_retrieval(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of a batch whose prediction (view 1) is closer in cosine to its own image's target
    projection (view 2) than to any other image's: 1/N at chance.

    The BYOL loss can fall a long way while this stays at chance: early in training the predictor
    learns the direction all target projections share, which raises every cosine without telling
    images apart. This is the signal that instance features are being learned.
    """
    q = F.normalize(prediction.float(), dim=1)
    z = F.normalize(target.float(), dim=1)
    own = torch.arange(len(q), device=q.device)
    return ((q @ z.T).argmax(dim=1) == own).float().mean()


class Writer:
    """tensorboardX event files in the run folder; a no-op on ranks other than 0."""

    def __init__(self, log_dir: str, enabled: bool):
        self._w = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._w = SummaryWriter(log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._w is not None:
            for k, v in values.items():
                self._w.add_scalar(k, v, step)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
