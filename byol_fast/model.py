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
from .pixpro import PixelProjector, PixelPropagation, correspondence, pixpro_loss

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
        return _same_padded_encoder(name)
    if name == TINY:
        net = TinyResNet()
        return net, net.width
    net = getattr(torchvision.models, name)(weights=None)
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


# ---------------------------------------------------------------------------- TensorFlow/Haiku SAME padding
#
# Weights trained in TensorFlow or JAX/Haiku (DeepMind's BYOL release) come from convolutions and a
# max pool padded "SAME": the output has ceil(n / stride) positions and the total padding
# max((ceil(n / s) - 1) * s + k - n, 0) is split with the smaller half *before* (top/left). torchvision
# pads symmetrically (k // 2 each side), which agrees with SAME for stride-1 layers with odd kernels
# (and for 1x1 stride-2 projections) but moves the sampling grid of the strided 3x3 and 7x7 layers by
# a pixel on even sizes (0 before, 1 after for a 3x3 stride-2 conv or max pool on 56; 2 and 3 for the
# 7x7 stride-2 stem on 224, where torchvision pads 3 and 3).
# The weights load either way and the network still "works", about 4.5 points of ImageNet top-1 lower
# (70% vs 74.6% for DeepMind's ResNet-50, deepmind-research issue 84). The modules below pad the
# SAME way, computed from each input's size at run time, so any input size is right.


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's SAME along one axis of ``size`` positions."""
    extent = (kernel - 1) * dilation + 1
    out = (size + stride - 1) // stride  # ceil(size / stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _same_pad(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
              value: float) -> torch.Tensor:
    """``x`` (N, C, H, W) padded the SAME way for a window of ``kernel``, ``stride`` and ``dilation``."""
    top, bottom = _same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = _same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    return nn.functional.pad(x, [left, right, top, bottom], value=value)


class SameConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state_dict names) that pads its input as TensorFlow's
    SAME: zeros, the smaller half before, from the input's size at run time (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(_same_pad(x, self.kernel_size, self.stride, self.dilation, 0.0),
                                  self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME"


class SameMaxPool2d(nn.MaxPool2d):
    """An ``nn.MaxPool2d`` that pads as TensorFlow's SAME (as Haiku's ``max_pool(padding="SAME")``):
    the smaller half before, with -inf, so that the padding never wins the max."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _same_pad(x, self.kernel_size, self.stride, self.dilation, float("-inf"))
        return nn.functional.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, padding=SAME"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _agrees_with_same(conv: nn.Conv2d) -> bool:
    """Whether torchvision's symmetric padding of ``conv`` is already SAME: stride 1, and an odd window
    padded by half of it on each side (every stride-1 convolution of a ResNet)."""
    return all(s == 1 and ((k - 1) * d) % 2 == 0 and p == (k - 1) * d // 2
               for k, s, d, p in zip(conv.kernel_size, conv.stride, conv.dilation, _pair(conv.padding)))


def _same_conv(conv: nn.Conv2d) -> SameConv2d:
    """A SameConv2d of ``conv``'s configuration, holding ``conv``'s own parameters (built on the meta
    device, so nothing is allocated or initialised twice)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"SAME padding: padding_mode {conv.padding_mode!r} has no TensorFlow counterpart")
    same = SameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                      conv.groups, bias=conv.bias is not None, device="meta")
    same.weight = conv.weight
    if conv.bias is not None:
        same.bias = conv.bias
    return same


def _same_pool(pool: nn.MaxPool2d) -> SameMaxPool2d:
    if pool.ceil_mode or pool.return_indices:
        raise ValueError("SAME padding: a max pool with ceil_mode or return_indices has no TensorFlow counterpart")
    return SameMaxPool2d(_pair(pool.kernel_size), _pair(pool.stride), 0, _pair(pool.dilation))


def _same_padded_encoder(name: str) -> tuple[nn.Module, int]:
    """``build_encoder(name)``'s torchvision ResNet with every strided convolution (stem, 3x3 of each
    first block, 1x1 shortcut projections) and the stem's max pool padding as TensorFlow's SAME; the
    stride-1 convolutions are left as they are (torchvision's padding is SAME there). Module names,
    parameters and so state_dict keys are unchanged."""
    if name == TINY:
        raise ValueError("padding 'same': tiny_resnet (the CPU demo's backbone) has no TensorFlow/Haiku counterpart")
    net, width = build_encoder(name)
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and not _agrees_with_same(child):
                setattr(parent, child_name, _same_conv(child))
            elif type(child) is nn.MaxPool2d:
                setattr(parent, child_name, _same_pool(child))
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


def feature_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ResNet's last feature map (N, width, H/32, W/32) before pooling (7x7 at 224 px; H/8 for the
    demo's tiny_resnet): torchvision's forward without the pool and the classifier."""
    x = encoder.relu(encoder.bn1(encoder.conv1(x)))
    x = getattr(encoder, "maxpool", nn.Identity())(x)
    return encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))


class Tower(nn.Module):
    """Encoder followed by projector: what both the online and the target network are made of; with
    PixPro (``pixels``) also a pixel projector on the encoder's last feature map."""

    def __init__(self, cfg: ModelConfig, pixels: bool = False):
        super().__init__()
        self.encoder, self.width = build_encoder(cfg.backbone)
        self.projector = MLP(self.width, cfg.projector_hidden, cfg.projector_out)
        if pixels:
            self.pixel_projector = PixelProjector(self.width, cfg.pixel_hidden, cfg.pixel_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features (N, width), the feature map (N, width, h, w)) from one pass."""
        fmap = feature_map(self.encoder, x)
        return torch.flatten(self.encoder.avgpool(fmap), 1), fmap


class BYOL(nn.Module):
    """Online tower + predictor trained by gradient; target tower updated by EMA only.

    ``forward(view1, view2)`` runs each view through its own forward pass (batch-norm
    statistics per view, never a concatenation that would mix them) and returns the summed
    symmetric loss, so that one DDP-wrapped call covers the whole step.
    The target runs in training mode (batch statistics) without gradients. Its parameters,
    batch-norm gamma and beta included, follow the online ones by EMA (:meth:`update_target`);
    its running statistics are its own, updated by its own forward passes, and unused for
    training (evaluation uses the online encoder).

    ``cfg.loss`` picks the loss: ``instance`` (BYOL's), ``pixpro`` (PixPro's on pixels:
    byol_fast/pixpro.py; the towers gain a pixel projector, the online side a pixel propagation
    module, and ``forward`` takes each view's crop window and flip, (N, 5), to pair pixels by) or
    ``instance+pixpro`` (``instance_weight`` x one + ``pixpro_weight`` x the other).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.instance, self.pixels = cfg.loss in ("instance", "instance+pixpro"), "pixpro" in cfg.loss
        self.online = Tower(cfg, self.pixels)
        self.predictor = MLP(cfg.projector_out, cfg.predictor_hidden, cfg.projector_out)
        if self.pixels:
            self.propagation = PixelPropagation(cfg.pixel_out, cfg.pixpro_gamma)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, windows1: torch.Tensor | None = None,
                windows2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.pixels and (windows1 is None or windows2 is None):
            raise ValueError("model.loss with pixpro needs each view's crop window (the loader's windows=True)")
        # Each view through each tower once: pooled features, and with PixPro the feature map too.
        (h1, m1), (h2, m2) = self._encode(self.online, view1), self._encode(self.online, view2)
        z_online1, z_online2 = self.online.projector(h1), self.online.projector(h2)
        q1, q2 = self.predictor(z_online1), self.predictor(z_online2)
        with torch.no_grad():
            (g1, t_m1), (g2, t_m2) = self._encode(self.target, view1), self._encode(self.target, view2)
            z_target1, z_target2 = self.target.projector(g1), self.target.projector(g2)
        out = {"projection": z_online1.detach(), "representation": h1.detach(), "prediction": q1.detach(),
               "target_projection": z_target2}
        if not self.pixels:
            return {"loss": byol_loss(q1, q2, z_target1, z_target2), **out}
        y1 = self.propagation(self.online.pixel_projector(m1))
        y2 = self.propagation(self.online.pixel_projector(m2))
        with torch.no_grad():
            t1, t2 = self.target.pixel_projector(t_m1), self.target.pixel_projector(t_m2)
            positive = correspondence(windows1[:, :4], windows1[:, 4] > 0.5, windows2[:, :4], windows2[:, 4] > 0.5,
                                      m1.shape[2], m1.shape[3], self.cfg.pixpro_threshold)
        pixel = pixpro_loss(y1, y2, t1, t2, positive)
        if self.instance:
            loss = self.cfg.pixpro_weight * pixel + self.cfg.instance_weight * byol_loss(q1, q2, z_target1, z_target2)
        else:  # the predictor stays in the graph, with no effect (DDP wants every parameter used)
            loss = self.cfg.pixpro_weight * pixel + 0.0 * (q1.sum() + q2.sum())
        return {"loss": loss, **out, "pixpro_loss": pixel.detach(), "pixel_projection": t1,
                "positive_pairs": positive.float().sum(dim=(1, 2)).mean()}

    def _encode(self, tower: Tower, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled features, the last feature map when PixPro needs it, else None)."""
        return tower.maps(x) if self.pixels else (tower.encoder(x), None)

    @torch.no_grad()
    def update_target(self, tau: float | torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """target <- tau * target + (1 - tau) * online, over parameters only, in a few fused kernels.

        ``tau`` may be a 0-dim device tensor (a compiled step reads it as an input, never as a
        constant); with ``ok`` (0-dim bool) a step that was not applied leaves the target exactly as
        it was (weight 0: ``t + 0 * (o - t)``), decided on the device.
        """
        weight = 1.0 - tau
        if ok is not None:
            weight = torch.where(ok, weight, 0.0)
        torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), weight)
