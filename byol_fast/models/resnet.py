"""The encoders: torchvision's ResNets without their classifier, the CPU demo's tiny ResNet, and the
last feature map before pooling. Images (N, 3, H, W) float -> features (N, F), F the backbone's width
(2048 for ResNet-50)."""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from byol_fast.config import BACKBONES
from byol_fast.models.same_padding import same_padded

# Not a torchvision model: the CPU demo's backbone (config/demo.yaml), see TinyResNet.
TINY = "tiny_resnet"


class TinyResNet(nn.Module):
    """A ResNet small enough to pretrain with BYOL on two CPU cores in minutes (the demo).

    torchvision's BasicBlock, one block per stage, widths 16-32-64-128 (0.3 M parameters), and a
    3x3 stride-1 stem without max-pool, as used for 32 px images: torchvision's 7x7 stride-2
    stem and max-pool shrink a 32 px image to 8x8 before the first block. Module names follow
    torchvision's ResNet (conv1, bn1, layer1..layer4, fc), so its state_dict reads like one;
    torchvision has no constructor for it, so it loads through byol_fast.weights.encoder_file only.
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
    if padding == "same" and name == TINY:
        raise ValueError("padding 'same': tiny_resnet (the CPU demo's backbone) has no TensorFlow/Haiku counterpart")
    if name == TINY:
        net = TinyResNet()
        return net, net.width
    net = getattr(torchvision.models, name)(weights=None)
    width = net.fc.in_features
    net.fc = nn.Identity()
    return (same_padded(net) if padding == "same" else net), width


def feature_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ResNet's last feature map (N, width, H/32, W/32) before pooling (7x7 at 224 px; H/8 for the
    demo's tiny_resnet): torchvision's forward without the pool and the classifier."""
    x = encoder.relu(encoder.bn1(encoder.conv1(x)))
    x = getattr(encoder, "maxpool", nn.Identity())(x)
    return encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))


