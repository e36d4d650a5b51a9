"""TensorFlow/Haiku SAME padding for torchvision's ResNets.

Weights trained in TensorFlow or JAX/Haiku (DeepMind's BYOL release) come from convolutions and a
max pool padded "SAME": the output has ceil(n / stride) positions and the total padding
max((ceil(n / s) - 1) * s + k - n, 0) is split with the smaller half *before* (top/left). torchvision
pads symmetrically (k // 2 each side), which agrees with SAME for stride-1 layers with odd kernels
(and for 1x1 stride-2 projections) but moves the sampling grid of the strided 3x3 and 7x7 layers by
a pixel on even sizes (0 before, 1 after for a 3x3 stride-2 conv or max pool on 56; 2 and 3 for the
7x7 stride-2 stem on 224, where torchvision pads 3 and 3).
The weights load either way and the network still "works", about 4.5 points of ImageNet top-1 lower
(70% vs 74.6% for DeepMind's ResNet-50, deepmind-research issue 84). The modules below pad the
SAME way, computed from each input's size at run time, so any input size is right.
"""
from __future__ import annotations

import torch
from torch import nn


def same_padded(net: nn.Module) -> nn.Module:
    """``net`` (a torchvision ResNet) with every strided convolution (stem, 3x3 of each first block,
    1x1 shortcut projections) and the stem's max pool padding as TensorFlow's SAME; the stride-1
    convolutions are left as they are (torchvision's padding is SAME there). Module names, parameters
    and so state_dict keys are unchanged."""
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and not _agrees_with_same(child):
                setattr(parent, child_name, _same_conv(child))
            elif type(child) is nn.MaxPool2d:
                setattr(parent, child_name, _same_pool(child))
    return net


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's SAME along one axis of ``size`` positions."""
    extent = (kernel - 1) * dilation + 1
    out = (size + stride - 1) // stride  # ceil(size / stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _same_pad(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
              value: float) -> torch.Tensor:
    """``x`` (N, C, H, W) padded the SAME way for a window of ``kernel``, ``stride`` and ``dilation``.

    A ResNet's strided windows (stride 2, an odd extent 2p + 1) have a SAME padding that depends on
    the size n only through its parity: p before and after on an odd size, p - 1 before and p after
    on an even one. Both are the n + 2p rows, from index (n + 1) % 2 on, of the input padded by p
    before and p + 1 after (on an even size the last of them is never read by the window). Taking
    them with ``index_select`` keeps every shape free of the parity, so a program exported with
    dynamic height and width (torch.export, ONNX) carries no guard on the size it was traced at and
    its shape arithmetic stays as simple as zero padding's. Other windows take amounts computed from
    the size.
    """
    if stride[0] == 2 and stride[1] == 2 and (kernel[0] - 1) * dilation[0] % 2 == 0 \
            and (kernel[1] - 1) * dilation[1] % 2 == 0:
        ph, pw = (kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2
        # an axis the window spans one position of (a 1x1 projection) is padded at neither parity
        y = nn.functional.pad(x, [pw, pw + 1 if pw else 0, ph, ph + 1 if ph else 0], value=value)
        if ph:
            y = y.index_select(-2, torch.arange(x.shape[-2] + 2 * ph, device=x.device) + (x.shape[-2] + 1) % 2)
        if pw:
            y = y.index_select(-1, torch.arange(x.shape[-1] + 2 * pw, device=x.device) + (x.shape[-1] + 1) % 2)
        return y
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
