"""The dense probe: what an encoder's last feature map knows pixel by pixel.

A per-pixel linear classifier (a 1x1 convolution) on the frozen encoder's last feature map
(byol_fast.models.resnet.feature_map), its logits upsampled (bilinear) to the mask's resolution,
trained with cross entropy on the training split and scored on the validation masks by mean IoU:
the IoU of each class, ``TP / (TP + FP + FN)`` over all validation pixels, averaged over the classes
that occur in the masks or the predictions. Features are computed once (the encoder is frozen).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from byol_fast.models.resnet import feature_map


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    idx = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """IoU of each class from a confusion matrix; NaN for a class in neither masks nor predictions."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(conf: torch.Tensor) -> float:
    """Mean IoU in percent over the classes that occur (see the module docstring)."""
    iou = iou_per_class(conf)
    return float(100.0 * iou[~iou.isnan()].mean())


@torch.no_grad()
def encode(encoder: nn.Module, images: np.ndarray, size: int, mean, std, batch: int = 32) -> torch.Tensor:
    """uint8 (N, H, W, 3) images resized to ``size`` and normalised -> feature maps (N, C, h, w)."""
    encoder.eval()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    maps = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        maps.append(feature_map(encoder, (x - m) / s))
    return torch.cat(maps)


def train_probe(train_maps: torch.Tensor, train_masks: torch.Tensor, num_classes: int, epochs: int = 30,
                lr: float = 0.1, batch: int = 16, seed: int = 0, log=None) -> nn.Conv2d:
    """The per-pixel linear classifier, SGD (momentum 0.9) with a cosine schedule, on fixed features."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = nn.Conv2d(train_maps.shape[1], num_classes, 1)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    steps = epochs * -(-len(train_maps) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    size = train_masks.shape[-2:]
    for epoch in range(epochs):
        order = torch.randperm(len(train_maps), generator=g)
        total = torch.zeros(())
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            logits = F.interpolate(probe(train_maps[idx]), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, train_masks[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
        if log and (epoch + 1) % max(1, epochs // 5) == 0:  # read only when printed
            log(f"probe epoch {epoch + 1}/{epochs} loss {total.item() / len(order):.4f}")
    return probe


@torch.no_grad()
def evaluate(probe: nn.Conv2d, maps: torch.Tensor, masks: torch.Tensor, num_classes: int, batch: int = 16) -> dict:
    """{'miou': %, 'pixel_acc': %, 'iou': per-class % (None where a class does not occur)}."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(0, len(maps), batch):
        logits = F.interpolate(probe(maps[i:i + batch]), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        conf += confusion(logits.argmax(1), masks[i:i + batch], num_classes)
    iou = iou_per_class(conf)
    return {"miou": mean_iou(conf), "pixel_acc": float(100.0 * conf.diag().sum() / conf.sum()),
            "iou": [None if v != v else round(100.0 * float(v), 2) for v in iou]}
