"""Importer of checkpoints VISSL writes for its torchvision-compatible ResNe(X)t trunk.

The layout, from VISSL's code:

- ``vissl/hooks/log_hooks.py`` (CheckpointHook) saves ``{"phase_idx", "iteration", "loss",
  "iteration_num", "train_phase_idx", "classy_state_dict"}``; ``classy_state_dict`` is the task's
  classy state (``base_model``, ``optimizer``, ``meters``, ``phase_idx``, ...);
- ``vissl/models/base_ssl_model.py`` ``get_classy_state``: ``base_model = {"model": {"trunk": ...,
  "heads": ...}, "meta": {...}}``; ``heads`` is the state_dict of the ``heads`` ModuleList (``0.clf.*``:
  the projection MLP; VISSL's BYOL branch puts the predictor MLP at ``1.*``);
- ``vissl/models/trunks/resnext.py``: a torchvision ``ResNet`` re-assembled into
  ``_feature_blocks = ModuleDict(conv1, bn1, conv1_relu, maxpool, layer1..layer4, avgpool, flatten)``,
  so every trunk key is ``_feature_blocks.`` + torchvision's name (conv1 is torchvision's 7x7 stride-2;
  blocks are torchvision's BasicBlock/Bottleneck). ``extra_scripts/convert_vissl_to_torchvision.py``
  converts by stripping that prefix, as here;
- VISSL's BYOL (the ``BYOLLoss``/``BYOLHook`` branch) keeps the momentum network in the loss:
  the top-level ``loss`` entry holds ``target_network.*``.

Trunks VISSL builds that torchvision has not (RN200, width multipliers) fail the strict check that follows.
"""
from __future__ import annotations

import re

from byol_fast.weights.importers import Converted

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# Every parameter/buffer name of a torchvision ResNet's encoder (no fc).
TORCHVISION_KEY = re.compile(rf"conv1\.weight|bn1\.{_BN}|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.{_BN}"
                             rf"|downsample\.0\.weight|downsample\.1\.{_BN})")
PREFIX = "_feature_blocks."
TRUNK = "classy_state_dict.base_model.model.trunk"
HEADS = "classy_state_dict.base_model.model.heads"
HEAD_REASONS = {"0": "projector", "1": "predictor"}
CLASSY = {"optimizer": "optimizer", "meters": "training state"}


def _model(obj) -> dict | None:
    try:
        model = obj["classy_state_dict"]["base_model"]["model"]
    except (KeyError, TypeError):
        return None
    return model if isinstance(model, dict) else None


def detect(obj: dict) -> bool:
    model = _model(obj)
    if model is None or set(model) != {"trunk", "heads"}:
        return False
    trunk = model["trunk"]
    return (isinstance(trunk, dict) and bool(trunk) and isinstance(model["heads"], dict)
            and all(str(k).startswith(PREFIX) for k in trunk) and f"{PREFIX}conv1.weight" in trunk)


def convert(obj: dict) -> Converted:
    model = _model(obj)
    out, dropped, unmapped = {}, {}, []
    for key, value in model["trunk"].items():
        name = key[len(PREFIX):]
        if TORCHVISION_KEY.fullmatch(name):
            out[name] = value
        else:
            unmapped.append(f"{TRUNK}.{key}")
    for key in model["heads"]:
        dropped[f"{HEADS}.{key}"] = HEAD_REASONS.get(key.split(".", 1)[0], "head")
    for key in obj["classy_state_dict"]:
        if key != "base_model":
            dropped[f"classy_state_dict.{key}"] = CLASSY.get(key, "training state")
    for key in obj["classy_state_dict"]["base_model"]:
        if key != "model":
            dropped[f"classy_state_dict.base_model.{key}"] = "metadata"
    for key, value in obj.items():
        if key == "loss" and isinstance(value, dict) and any(str(k).startswith("target_network.") for k in value):
            for k in value:
                dropped[f"loss.{k}"] = "target network" if str(k).startswith("target_network.") else "loss state"
        elif key != "classy_state_dict":
            dropped[key] = "training state"
    return Converted(out, "vissl", dropped, unmapped)
