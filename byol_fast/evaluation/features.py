"""Features of a whole loader epoch through an encoder in eval mode: what linear evaluation caches
and the kNN monitor compares."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def loader_features(encoder: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype = torch.float32,
                    out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every (images, labels) batch of one epoch of ``loader`` through ``encoder`` in eval mode.

    images: (B, 3, H, W) normalised; labels: (B,) int64. Returns (features (N, F) ``out_dtype``,
    labels (N,) int64), both on ``device``. The encoder's train/eval mode is restored afterwards
    (the BYOL target tower normally runs in train mode).
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, target in loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                feats.append(encoder(images.to(device, non_blocking=True)).to(out_dtype))
            labels.append(target.to(device, non_blocking=True).long().view(-1))
    finally:
        encoder.train(was_training)
    if not feats:
        return torch.zeros(0, 0, device=device, dtype=out_dtype), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)
