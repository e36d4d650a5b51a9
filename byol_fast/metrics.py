"""Throughput, collapse statistics and the TensorBoard writer (main process only)."""
from __future__ import annotations

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
