"""Importer of mmpretrain's and mmselfsup's BYOL checkpoints (e.g. ``byol_resnet50_16xb256-coslr-200e_in1k``).

The layout, from the projects' code:

- the file is an mmengine/mmcv runner checkpoint: ``{"meta": ..., "state_dict": ...}``, plus
  ``optimizer``, ``message_hub`` and ``param_schedulers`` unless it went through
  ``tools/model_converters/publish_model.py`` (which pops them);
- mmpretrain ``models/selfsup/byol.py`` (and mmselfsup 1.x ``models/algorithms/byol.py``, the same
  code): ``backbone`` (the online ResNet), ``neck`` (NonLinearNeck: the projector), ``head``
  (LatentPredictHead, its ``predictor``: the predictor) and ``target_net = CosineEMA(Sequential(backbone,
  neck))``, an mmengine ``BaseAveragedModel`` whose state is ``module.0.*`` (momentum ResNet),
  ``module.1.*`` (momentum neck) and the ``steps`` buffer. The data preprocessor's mean/std buffers
  are not persistent, so the state_dict holds exactly the prefixes ``backbone``, ``neck``, ``head``,
  ``target_net``;
- mmselfsup 0.x ``models/algorithms/byol.py``: ``online_net = Sequential(backbone, neck)``,
  ``target_net = Sequential(backbone, neck)`` and the aliases ``backbone = online_net[0]``,
  ``neck = online_net[1]``, so the state_dict holds the online tensors twice (``online_net.0.*`` and
  ``backbone.*``) next to ``target_net.{0,1}.*`` and ``head.*``.

mmpretrain's ``models/backbones/resnet.py`` with the defaults BYOL uses (``deep_stem=False``,
``avg_down=False``, style "pytorch": stride on the 3x3 conv, as torchvision) names its parameters as
torchvision does: ``conv1``, ``bn1`` (``build_norm_layer`` abbreviates BN and SyncBN to "bn"),
``layer1..4``, blocks ``conv1..3``/``bn1..3``, ``downsample.0`` (conv) / ``downsample.1`` (norm), and has
no ``fc``. So ``backbone.X`` maps to ``X``. A deep stem (``stem.*``, ResNetV1c/V1d) or an average-pool
shortcut (``downsample.1`` conv, ``downsample.2`` norm) has no torchvision name: reported as unmapped.
"""
from __future__ import annotations

import re

from byol_fast.weights.importers import Converted, top_level_dropped

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# Every parameter/buffer name of a torchvision ResNet's encoder (no fc).
TORCHVISION_KEY = re.compile(rf"conv1\.weight|bn1\.{_BN}|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.{_BN}"
                             rf"|downsample\.0\.weight|downsample\.1\.{_BN})")

PARTS_1X = {"backbone", "neck", "head", "target_net"}  # mmpretrain, mmselfsup 1.x
PARTS_0X = {"online_net", "backbone", "neck", "head", "target_net"}  # mmselfsup 0.x
# Runner entries next to state_dict, and why they are left out.
TOP_LEVEL = {"meta": "metadata", "optimizer": "optimizer", "message_hub": "training state",
             "param_schedulers": "scheduler", "ema_state_dict": "EMA copy"}  # (mmengine's EMAHook adds the last)


def _parts(state: dict) -> set[str]:
    return {str(k).split(".", 1)[0] for k in state}


def detect(obj: dict) -> bool:
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        return False
    parts = _parts(state)
    if parts == PARTS_1X:
        return any(str(k).startswith("target_net.module.0.") for k in state)
    if parts == PARTS_0X:
        return any(str(k).startswith("target_net.0.") for k in state) and any(
            str(k).startswith("online_net.0.") for k in state)
    return False


def convert(obj: dict) -> Converted:
    state: dict = obj["state_dict"]
    out, dropped, unmapped = {}, top_level_dropped(obj, "state_dict", TOP_LEVEL), []
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part == "backbone":
            if TORCHVISION_KEY.fullmatch(rest):
                out[rest] = value
            else:
                unmapped.append(key)
        elif part == "neck":
            dropped[key] = "projector"
        elif part == "head":
            dropped[key] = "predictor"
        elif part == "target_net":
            dropped[key] = "target network"
        elif part == "online_net":  # mmselfsup 0.x: the same modules as backbone/neck
            dropped[key] = "duplicate of backbone" if rest.startswith("0.") else "projector"
    return Converted(out, "mmpretrain", dropped, unmapped)
