"""A plain torchvision ResNet state_dict (``torch.save(torchvision.models.resnet50().state_dict(), path)``),
as ``python -m byol_fast.convert`` is given one: the encoder under its own names, ``fc`` dropped.

No other project's layout: :func:`byol_fast.weights.importers.detect` never names it (byol_fast's
readers take such a file as a bare state_dict before the importers), and ``convert`` tries it only
when no project's layout matches, or when named (``--format torchvision``).
"""
from __future__ import annotations

import torch

from byol_fast.weights.importers import Converted
from byol_fast.weights.importers.mmpretrain import TORCHVISION_KEY

CLASSIFIER = ("fc.weight", "fc.bias")


def detect(obj: dict) -> bool:
    """Every entry a tensor under a torchvision ResNet's name (``fc`` included), ``conv1.weight`` among them."""
    if not isinstance(obj, dict) or "conv1.weight" not in obj:
        return False
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) and (k in CLASSIFIER or TORCHVISION_KEY.fullmatch(k))
               for k, v in obj.items())


def convert(obj: dict) -> Converted:
    state = {k: v for k, v in obj.items() if k not in CLASSIFIER}
    return Converted(state=state, layout="torchvision", dropped={k: "classifier" for k in obj if k in CLASSIFIER})
