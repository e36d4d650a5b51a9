"""Top-k accuracy of classifier scores, counted on the device (the caller sums over ranks)."""
from __future__ import annotations

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of rows whose label is among the ``k`` highest scores, for each k: (len(ks),) float.

    scores: (N, C) logits or votes; labels: (N,) int64. k larger than C counts every row. Ties are
    broken by torch.topk. Stays on the device (no host sync).
    """
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top == labels.view(-1, 1)
    return torch.stack([hit[:, :min(k, kmax)].any(dim=1).sum().float() for k in ks])
