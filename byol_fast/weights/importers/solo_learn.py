"""Importer of solo-learn's BYOL checkpoints (the Lightning ``.ckpt`` files of its model zoo).

The layout, from solo-learn's code:

- a PyTorch Lightning checkpoint: ``state_dict`` next to Lightning's own entries (``epoch``,
  ``global_step``, ``pytorch-lightning_version``, ``optimizer_states``, ``lr_schedulers``, ``loops``,
  ``callbacks``, ``hyper_parameters``, ...);
- ``solo/methods/base.py`` (BaseMethod, BaseMomentumMethod): ``backbone`` is torchvision's
  ``resnet18``/``resnet50`` (``solo/backbones/resnet/resnet.py`` re-exports them) with
  ``fc = nn.Identity()``, so ``backbone.X`` is torchvision's ``X``; ``classifier`` (its online linear
  probe), ``momentum_backbone`` (the same network, EMA) and optionally ``momentum_classifier``;
  on CIFAR-10/100 ``conv1`` becomes ``Conv2d(3, 64, kernel_size=3, stride=1, padding=2)`` and
  ``maxpool`` ``nn.Identity()``;
- ``solo/methods/byol.py``: ``projector``, ``momentum_projector``, ``predictor`` (each a Sequential of
  Linear, BatchNorm1d, ReLU, Linear);
- before December 2021 (commit 0ac7b8f) the backbones were called ``encoder`` and
  ``momentum_encoder``; ``main_linear.py`` still renames them, and so does this importer.

A CIFAR-stem checkpoint is refused (CheckpointError): no torchvision ResNet has that stem.
"""
from __future__ import annotations

import re

from byol_fast.errors import CheckpointError
from byol_fast.weights.importers import Converted, top_level_dropped

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# Every parameter/buffer name of a torchvision ResNet's encoder (no fc).
TORCHVISION_KEY = re.compile(rf"conv1\.weight|bn1\.{_BN}|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.{_BN}"
                             rf"|downsample\.0\.weight|downsample\.1\.{_BN})")

# state_dict prefix -> why it is dropped (None: the online backbone), for both namings.
PARTS = {
    "backbone": None, "momentum_backbone": "target network", "projector": "projector",
    "momentum_projector": "target network", "predictor": "predictor", "classifier": "classifier head",
    "momentum_classifier": "classifier head",
}
LEGACY = {"encoder": "backbone", "momentum_encoder": "momentum_backbone"}  # before Dec 2021
REQUIRED = {"backbone", "momentum_backbone", "projector", "momentum_projector", "predictor", "classifier"}
TOP_LEVEL = {"optimizer_states": "optimizer", "lr_schedulers": "scheduler", "hyper_parameters": "config"}


def _part(key: str) -> str:
    part = key.split(".", 1)[0]
    return LEGACY.get(part, part)


def detect(obj: dict) -> bool:
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        return False
    parts = [str(k).split(".", 1)[0] for k in state]
    if set(parts) & set(LEGACY) and set(parts) & {"backbone", "momentum_backbone"}:
        return False  # one naming or the other, never both
    parts = {LEGACY.get(p, p) for p in parts}
    return REQUIRED <= parts <= set(PARTS)


def convert(obj: dict) -> Converted:
    state: dict = obj["state_dict"]
    out, dropped, unmapped = {}, top_level_dropped(obj, "state_dict", TOP_LEVEL), []
    for key, value in state.items():
        reason = PARTS[_part(key)]
        if reason is not None:
            dropped[key] = reason
            continue
        name = key.split(".", 1)[1]
        if TORCHVISION_KEY.fullmatch(name):
            out[name] = value
        else:
            unmapped.append(key)
    conv1 = out.get("conv1.weight")
    if conv1 is not None and conv1.dim() == 4 and tuple(conv1.shape[-2:]) == (3, 3):
        raise CheckpointError(
            f"solo-learn: the backbone has solo-learn's CIFAR stem (conv1.weight of shape {tuple(conv1.shape)}: "
            "a 3x3 stride-1 conv1 and no max-pool), which no torchvision ResNet has; byol_fast has no "
            "CIFAR-stem backbone")
    return Converted(out, "solo-learn", dropped, unmapped)
