"""Signs of a healthy run, computed on the device without a host sync: whether the projections are
collapsing to a point, and whether predictions find their own image's target within a batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
