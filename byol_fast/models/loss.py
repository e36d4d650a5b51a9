"""The BYOL regression loss."""
import torch
import torch.nn.functional as F


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(q, z) = ||q/|q| - z/|z|||^2`` for (N, D) inputs, in fp32.

    Normalising fp16 projections overflows (docs/reference.md section 3), so both inputs are cast
    to fp32 first. The target carries no gradient.
    """
    q = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target.detach().float(), dim=-1)
    return 2.0 - 2.0 * (q * z).sum(dim=-1)


def byol_loss(q1: torch.Tensor, q2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetrised loss, batch mean: view 1's prediction against view 2's target plus the swap.

    The two terms are summed, not averaged, as in the paper (averaging cost a peer 7 points).
    """
    return (regression_loss(q1, z2) + regression_loss(q2, z1)).mean()
