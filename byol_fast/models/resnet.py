"""The encoders: torchvision's ResNets without their classifier, the BYOL paper's wider and deeper
ResNets, the CPU demo's tiny ResNet, and the last feature map before pooling. Images (N, 3, H, W)
float -> features (N, F), F the backbone's width (2048 for ResNet-50, 4096 for ResNet-50 (2x))."""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from byol_fast.config import BACKBONES, SCALED_BACKBONES
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


# Bottleneck blocks per stage of each depth (He et al. 2016, Table 1; ResNet-200: He et al. 2016b).
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def depth_and_width(name: str) -> tuple[int, int]:
    """``"resnet200x2"`` -> (200, 2); ``"resnet200"`` -> (200, 1)."""
    depth, _, width = name.removeprefix("resnet").partition("x")
    return int(depth), int(width or 1)


class ScaledResNet(ResNet):
    """torchvision's ResNet (v1.5: the stride on each bottleneck's 3x3) with every channel count
    multiplied by ``width``: the stem's 64, each stage's bottleneck width (64, 128, 256, 512) and so
    its output (four times that). This is what the BYOL paper's "ResNet-50 (2x)" and DeepMind's
    ``networks.py`` width multiplier mean, as in SimCLR; torchvision's ``wide_resnet50_2`` widens only
    the 3x3 convolutions, another network. Module names are torchvision's, so the state_dict of a
    width-1 ResNet-50 is torchvision's ``resnet50``'s. The classifier is ``nn.Identity``.

    Built with torchvision's own ``Bottleneck`` and ``_make_layer`` and initialised as torchvision
    initialises its ResNets (He-normal convolutions, batch norms at weight 1 and bias 0).
    """

    def __init__(self, layers: tuple[int, ...], width: int):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = 64 * width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(Bottleneck, 64 * width, layers[0])
        self.layer2 = self._make_layer(Bottleneck, 128 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(Bottleneck, 256 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(Bottleneck, 512 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.width = 512 * width * Bottleneck.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


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
    if name in SCALED_BACKBONES:
        net = ScaledResNet(DEPTHS[depth_and_width(name)[0]], depth_and_width(name)[1])
        width = net.width
    else:
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


