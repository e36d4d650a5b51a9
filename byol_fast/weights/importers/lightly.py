"""Importer of lightly's BYOL files.

The layouts, from lightly's code:

- ``examples/pytorch/byol.py`` and ``examples/pytorch_lightning/byol.py`` build the backbone as
  ``nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])``: children 0 conv1, 1 bn1,
  2 relu, 3 maxpool, 4..7 layer1..layer4, 8 avgpool (fc cut off). A saved backbone state_dict has the
  keys ``0.weight``, ``1.*``, ``4.0.conv1.weight``, ..., ``7.*``; the whole BYOL module has
  ``backbone.*`` (online), ``projection_head.*``, ``prediction_head.*``, ``backbone_momentum.*``,
  ``projection_head_momentum.*`` (the Lightning example's ``.ckpt`` holds the same under ``state_dict``);
- the tutorials (``docs/source/tutorials_source/platform/tutorial_*.py``: SimCLR, MoCo, SimSiam, ...)
  end by saving that Sequential backbone alone under one name:
  ``torch.save({"resnet18_parameters": backbone.state_dict()}, "model.pth")`` (``resnet50_parameters``
  for a ResNet-50);
- the deprecated ``lightly/models/byol.py`` BYOL class: ``backbone``, ``projection_head``,
  ``prediction_head``, ``momentum_backbone``, ``momentum_projection_head``;
- ``benchmarks/imagenet/resnet50/byol.py`` (the released ImageNet checkpoint,
  ``imagenet_resnet50_byol_2024-02-14.../epoch=99-step=500400.ckpt``, a Lightning ``.ckpt``): the
  backbone is torchvision's ``resnet50()`` with ``fc = Identity()`` (torchvision's names), next to
  ``projection_head``, ``prediction_head``, ``teacher_backbone``, ``teacher_projection_head`` and
  ``online_classifier.classification_head``; before commit 4dede59 (2024-02-22) the online network was
  ``student_backbone`` / ``student_projection_head`` / ``student_prediction_head`` and ``backbone`` /
  ``projection_head`` were the momentum (teacher) copies, which this importer follows by the keys.

A backbone under either naming (Sequential indices or torchvision's) is mapped onto torchvision's.
"""
from __future__ import annotations

import re

import torch

from byol_fast.weights.importers import Converted

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# Every parameter/buffer name of a torchvision ResNet's encoder (no fc).
TORCHVISION_KEY = re.compile(rf"conv1\.weight|bn1\.{_BN}|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.{_BN}"
                             rf"|downsample\.0\.weight|downsample\.1\.{_BN})")

# Index in Sequential(*resnet.children()[:-1]) -> torchvision child; 2 relu, 3 maxpool, 8 avgpool hold nothing.
CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}

# Each model's state_dict prefixes: the online backbone's (first) and why the others are dropped.
MODELS = [
    ("backbone", {"projection_head": "projector", "prediction_head": "predictor",  # examples/
                  "backbone_momentum": "target network", "projection_head_momentum": "target network"}),
    ("backbone", {"projection_head": "projector", "prediction_head": "predictor",  # lightly.models.BYOL
                  "momentum_backbone": "target network", "momentum_projection_head": "target network"}),
    ("backbone", {"projection_head": "projector", "prediction_head": "predictor",  # benchmarks/, since 2024-02-22
                  "teacher_backbone": "target network", "teacher_projection_head": "target network",
                  "online_classifier": "classifier head"}),
    ("student_backbone", {"student_projection_head": "projector", "student_prediction_head": "predictor",
                          "backbone": "target network", "projection_head": "target network",  # benchmarks/, before
                          "online_classifier": "classifier head"}),
]
TOP_LEVEL = {"optimizer_states": "optimizer", "lr_schedulers": "scheduler", "hyper_parameters": "config"}
TUTORIAL = re.compile(r"resnet\d+_parameters")  # the one top-level name of a tutorial's saved backbone


def _tensors(state) -> bool:
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _tutorial(obj: dict) -> str | None:
    """The top-level name of a tutorial's save (``{"resnet18_parameters": Sequential backbone}``), or None."""
    if len(obj) == 1:
        (name, state), = obj.items()
        if isinstance(name, str) and TUTORIAL.fullmatch(name) and _tensors(state) and _is_sequential_backbone(state):
            return name
    return None


def _state(obj: dict) -> dict | None:
    """The module state: the file itself, a Lightning checkpoint's ``state_dict``, or a tutorial's
    saved backbone."""
    name = _tutorial(obj)
    state = obj[name] if name else obj.get("state_dict") if "state_dict" in obj else obj
    return state if _tensors(state) else None


def _is_sequential_backbone(state: dict) -> bool:
    return (all(str(k).split(".", 1)[0].isdigit() for k in state)
            and {"0.weight", "1.weight", "4.0.conv1.weight"} <= set(state))


def _model(state: dict):
    parts = {str(k).split(".", 1)[0] for k in state}
    for online, others in MODELS:
        if parts == {online, *others}:
            return online, others
    return None


def backbone_under(state: dict, prefix: str) -> tuple[dict, list[str]]:
    """(torchvision name -> tensor, unmapped source keys) of the keys under ``prefix``: a
    ``Sequential(*resnet.children()[:-1])`` (``0.weight``, ``4.0.conv1.weight``) or torchvision's names."""
    keys = [k for k in state if k.startswith(prefix)]
    sequential = f"{prefix}0.weight" in state
    out, unmapped = {}, []
    for key in keys:
        name = key[len(prefix):]
        if sequential:
            index, _, rest = name.partition(".")
            name = f"{CHILDREN[index]}.{rest}" if index in CHILDREN else ""
        if TORCHVISION_KEY.fullmatch(name):
            out[name] = state[key]
        else:
            unmapped.append(key)
    return out, unmapped


def sequential_name(name: str) -> str:
    """A torchvision name as ``Sequential(*resnet.children()[:-1])`` holds it (``layer3.1.conv1.weight``
    -> ``6.1.conv1.weight``), for messages naming a tensor of such a file."""
    child, _, rest = name.partition(".")
    index = next((i for i, c in CHILDREN.items() if c == child), None)
    return f"{index}.{rest}" if index is not None else name


def detect(obj: dict) -> bool:
    state = _state(obj) if isinstance(obj, dict) else None
    if state is None:
        return False
    if (state is obj or _tutorial(obj)) and _is_sequential_backbone(state):
        return True
    model = _model(state)
    return model is not None and any(f"{model[0]}.{k}" in state for k in ("0.weight", "conv1.weight"))


def convert(obj: dict) -> Converted:
    state = _state(obj)
    if (state is obj or _tutorial(obj)) and _is_sequential_backbone(state):
        out, unmapped = backbone_under(state, "")
        return Converted(out, "lightly", {}, unmapped)
    dropped = {key: TOP_LEVEL.get(key, "training state") for key in obj if state is not obj and key != "state_dict"}
    online, others = _model(state)
    out, unmapped = backbone_under(state, online + ".")
    for key in state:
        part = key.split(".", 1)[0]
        if part != online:
            dropped[key] = others[part]
    return Converted(out, "lightly", dropped, unmapped)
