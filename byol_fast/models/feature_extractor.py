"""A frozen encoder as a feature API: input normalisation + encoder, images in, features out."""
from __future__ import annotations

import torch
from torch import nn

from byol_fast.constants import IMAGENET_MEAN, IMAGENET_STD


def freeze(encoder: nn.Module) -> nn.Module:
    """Eval mode (batch norm uses its running statistics) and no gradients: the linear-eval protocol."""
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


class FeatureExtractor(nn.Module):
    """Input normalisation + frozen encoder: images (N, 3, H, W) -> features (N, F) float32.

    Images are RGB, either float in [0, 1] or uint8 in [0, 255]; any size the ResNet takes
    (the paper evaluates 224 x 224 center crops). Scriptable (``byol_fast.export --torchscript``).
    """

    def __init__(self, encoder: nn.Module, width: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.encoder = freeze(encoder)
        self.width = width
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # always frozen: batch norm must keep its running statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # a context, not the decorator: TorchScript compiles this form
            x = images.to(self.mean.device)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            return self.encoder((x - self.mean) / self.std).float()

    @torch.jit.ignore
    def extract(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Features of many images, ``batch_size`` at a time; returned on the images' device."""
        return torch.cat([self(chunk).to(images.device) for chunk in images.split(batch_size)])
