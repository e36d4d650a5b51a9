"""PixPro's pixel-level pieces (Xie et al. 2021, "Propagate Yourself", arXiv 2011.10043, Section 3).

BYOL's pixel-level sibling: the same online/target pair and EMA, with a loss on the feature map's
pixels instead of the pooled vector.

- :class:`PixelProjector`: the backbone's last feature map (7x7 at 224 px) through 1x1 convolutions
  (conv -> BN -> ReLU -> conv, the projector MLP applied at every pixel); online and target each
  have one, the target's following by EMA.
- :class:`PixelPropagation` (online branch only): ``y_i = sum_j s(x_i, x_j) g(x_j)`` over the pixels j
  of the same view, ``s = max(cos(x_i, x_j), 0) ** gamma`` (gamma 2), ``g`` one transform layer (a 1x1
  convolution) whose output is unit-normalised per pixel, as the authors' released code does (the
  paper's equation leaves the norm out).
- :func:`correspondence`: the positive pairs. Each feature-map bin stands for the centre of its
  cell of the view; a view is a crop window of the original image, possibly mirrored; bins of the two
  views are positive when their centres, mapped back into the original image, lie closer than
  ``threshold`` (0.7) times a bin's diagonal. The two views' bins differ in size: the larger diagonal
  of the two is used (a bin of the smaller crop is not held to a tighter distance than the bin it is
  matched to), per image.
- :func:`pixpro_loss`: the negative cosine between the online branch's propagated pixels and the
  target's projected pixels over the positive pairs, both directions (view 1 -> view 2 and back),
  averaged over the pairs of each image, then over the batch; an image whose views share no pair
  adds zero. (The authors' code multiplies it by 2, as BYOL's 2 - 2 cos does: ``model.pixpro_weight=2``
  is that scale.)

Crop windows are ``(x0, y0, x1, y1)`` in the original image's pixels (any common unit works); a
flip is a horizontal mirror of the crop after it was taken.

Training uses them through ``model.loss`` (``pixpro`` or ``instance+pixpro``; recipes
``config/pixpro_*.yaml``): :class:`byol_fast.models.byol.BYOL` adds the pixel heads and the loss, and
the two-view loaders report each view's window and flip (``windows=True``:
``pipelines.pretrain.window_of``, ``pipelines.reference.WindowedView``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

THRESHOLD = 0.7  # of a bin's diagonal (the paper's T)
GAMMA = 2.0  # the sharpness of the propagation's similarity


def bin_centres(boxes: torch.Tensor, flips: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, h * w, 2) positions (x, y) in the original image of the centres of an (h, w) feature map's
    bins, row-major, for crop windows ``boxes`` (N, 4) and horizontal ``flips`` (N,) bool."""
    boxes = boxes.float()
    u = (torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5) / w  # fraction across the view
    v = (torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5) / h
    u = torch.where(flips.view(-1, 1).bool(), 1.0 - u, u)  # (N, w): a mirrored view reads the crop from the right
    x = boxes[:, 0:1] + u * (boxes[:, 2:3] - boxes[:, 0:1])  # (N, w)
    y = boxes[:, 1:2] + v * (boxes[:, 3:4] - boxes[:, 1:2])  # (N, h)
    return torch.stack([x[:, None, :].expand(-1, h, -1), y[:, :, None].expand(-1, -1, w)], dim=-1).reshape(-1, h * w, 2)


def bin_diagonal(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N,) diagonal of one bin of an (h, w) feature map over each crop window."""
    boxes = boxes.float()
    return torch.hypot((boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h)


def correspondence(boxes1: torch.Tensor, flips1: torch.Tensor, boxes2: torch.Tensor, flips2: torch.Tensor,
                   h: int, w: int, threshold: float = THRESHOLD) -> torch.Tensor:
    """(N, h*w, h*w) bool: ``[n, i, j]`` when bin i of view 1 and bin j of view 2 of image n are a
    positive pair (see the module docstring)."""
    c1, c2 = bin_centres(boxes1, flips1, h, w), bin_centres(boxes2, flips2, h, w)
    limit = threshold * torch.maximum(bin_diagonal(boxes1, h, w), bin_diagonal(boxes2, h, w))
    return torch.cdist(c1, c2) < limit.view(-1, 1, 1)


class PixelProjector(nn.Sequential):
    """Per-pixel projector: 1x1 conv -> BatchNorm2d -> ReLU -> 1x1 conv, (N, C, H, W) -> (N, out, H, W)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(
            nn.Conv2d(in_dim, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, 1),
        )


class PixelPropagation(nn.Module):
    """The pixel propagation module: ``y_i = sum_j max(cos(x_i, x_j), 0) ** gamma * g(x_j) / |g(x_j)|``
    within each view, ``g`` one 1x1 convolution; (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, dim: int, gamma: float = GAMMA):
        super().__init__()
        self.gamma = gamma
        self.transform = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = F.normalize(x.float().flatten(2), dim=1)  # (N, C, HW), fp32 (normalising fp16 overflows)
        sim = torch.bmm(flat.transpose(1, 2), flat).clamp(min=0).pow(self.gamma)  # (N, HW_i, HW_j)
        g = F.normalize(self.transform(x).flatten(2).float(), dim=1)  # (N, C, HW_j), unit per pixel
        return torch.bmm(g, sim.transpose(1, 2)).view(n, c, h, w)  # y[:, :, i] = sum_j sim[i, j] g[:, :, j]


def pixpro_loss(y1: torch.Tensor, y2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
                positive: torch.Tensor) -> torch.Tensor:
    """PixPro's consistency loss, batch mean (see the module docstring).

    y1, y2: the online branch's propagated pixels of view 1 and 2; t1, t2: the target's projected
    pixels (no gradient), each (N, C, H, W); positive: (N, HW, HW) from :func:`correspondence`
    (view 1's bins along dim 1).
    """
    def cosines(a, b):  # (N, HW_a, HW_b), in fp32
        return torch.bmm(F.normalize(a.float().flatten(2), dim=1).transpose(1, 2),
                         F.normalize(b.detach().float().flatten(2), dim=1))

    mask = positive.float()
    pairs = mask.sum(dim=(1, 2)).clamp(min=1.0)
    forward = (cosines(y1, t2) * mask).sum(dim=(1, 2)) / pairs
    backward = (cosines(y2, t1) * mask.transpose(1, 2)).sum(dim=(1, 2)) / pairs
    return -(forward + backward).mean()
