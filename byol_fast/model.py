"""BYOL networks (byol_fast/REFERENCE.md section 1): encoder, projector, predictor, online and target.

Shapes: images (N, 3, H, W) float -> encoder (N, F) with F the backbone width (2048 for
ResNet-50) -> projector (N, 256) -> predictor (N, 256).
"""
from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from .config import BACKBONES, ModelConfig
from .loss import byol_loss

# Not a torchvision model: the CPU demo's backbone (config/demo.yaml), see TinyResNet.
TINY = "tiny_resnet"


class TinyResNet(nn.Module):
    """A ResNet small enough to pretrain with BYOL on two CPU cores in minutes (the demo).

    torchvision's BasicBlock, one block per stage, widths 16-32-64-128 (0.3 M parameters), and a
    3x3 stride-1 stem without max-pool, as used for 32 px images: torchvision's 7x7 stride-2
    stem and max-pool shrink a 32 px image to 8x8 before the first block. Module names follow
    torchvision's ResNet (conv1, bn1, layer1..layer4, fc), so its state_dict reads like one;
    torchvision has no constructor for it, so it loads through byol_fast.features only.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, cin = [], widths[0]
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != c:
                down = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))
            blocks.append(nn.Sequential(BasicBlock(cin, c, stride, down)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.width = cin
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


PADDINGS = ("torchvision", "same")


def build_encoder(name: str, padding: str = "torchvision") -> tuple[nn.Module, int]:
    """A randomly initialised ResNet without its classifier, and its feature width.

    The classifier becomes ``nn.Identity`` (so ``fc`` holds no parameters) and the module keeps
    torchvision's parameter names, which makes the exported state_dict of a torchvision backbone
    load into ``torchvision.models.<name>()`` with only ``fc.*`` missing. ``padding="same"`` pads
    strided layers as TensorFlow/Haiku's SAME does (for weights converted from there); the
    parameter names are the same.
    """
    if name not in BACKBONES:
        raise ValueError(f"model.backbone: unknown backbone {name!r} (choose one of {', '.join(BACKBONES)})")
    if padding not in PADDINGS:
        raise ValueError(f"padding: {padding!r} is not one of {', '.join(PADDINGS)}")
    if padding == "same":
        raise NotImplementedError("SAME padding: not built yet")
    if name == TINY:
        net = TinyResNet()
        return net, net.width
    net = getattr(torchvision.models, name)(weights=None)
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class MLP(nn.Sequential):
    """Linear -> BatchNorm1d -> ReLU -> Linear (no bias on the last layer, as in DeepMind's code)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim, bias=False),
        )


class Tower(nn.Module):
    """Encoder followed by projector: what both the online and the target network are made of."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder, self.width = build_encoder(cfg.backbone)
        self.projector = MLP(self.width, cfg.projector_hidden, cfg.projector_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class BYOL(nn.Module):
    """Online tower + predictor trained by gradient; target tower updated by EMA only.

    ``forward(view1, view2)`` runs each view through its own forward pass (batch-norm
    statistics per view, never a concatenation that would mix them) and returns the summed
    symmetric loss, so that one DDP-wrapped call covers the whole step.
    The target runs in training mode (batch statistics) without gradients. Its parameters,
    batch-norm gamma and beta included, follow the online ones by EMA (:meth:`update_target`);
    its running statistics are its own, updated by its own forward passes, and unused for
    training (evaluation uses the online encoder).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.online = Tower(cfg)
        self.predictor = MLP(cfg.projector_out, cfg.predictor_hidden, cfg.projector_out)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        h1 = self.online.encoder(view1)
        z_online1, z_online2 = self.online.projector(h1), self.online(view2)
        q1, q2 = self.predictor(z_online1), self.predictor(z_online2)
        with torch.no_grad():
            z_target1, z_target2 = self.target(view1), self.target(view2)
        loss = byol_loss(q1, q2, z_target1, z_target2)
        return {"loss": loss, "projection": z_online1.detach(), "representation": h1.detach(),
                "prediction": q1.detach(), "target_projection": z_target2}

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, over parameters only, in a few fused kernels."""
        online = list(self.online.parameters())
        target = list(self.target.parameters())
        torch._foreach_lerp_(target, online, 1.0 - tau)
