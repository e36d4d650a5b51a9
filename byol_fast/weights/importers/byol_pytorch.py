"""Importer of yaox12/BYOL-PyTorch's released checkpoint (``resnet50_byol_imagenet2012.pth.tar``).

The layout, as that project documents and as the code that loads the file reads it:

- its README ("Model Checkpoints"): the file comes from the project's legacy code base, "which saves
  the ``online_backbone``, ``online_projection``, ``predictor`` and target network modules
  separately", and ``checkpoint['online_backbone']`` holds the backbone "from conv1 to avgpool,
  yielding 318 parameters";
- those 318 entries are the state_dict of a torchvision ResNet-50 without ``fc`` (53 convolutions,
  53 batch norms x 5 entries, ``num_batches_tracked`` included), saved from the network wrapped in
  DistributedDataParallel, so every name carries DDP's ``module.`` prefix: ``module.conv1.weight``,
  ``module.bn1.running_mean``, ``module.layer1.0.downsample.0.weight``, ... That prefix is the
  "slightly different" naming. The project's own ``utils/load_and_convert.py`` sidesteps the names
  (it zips the values, in order, with torchvision's ``nn.Sequential(*children[:-1])`` names), while
  the evaluation code of others loads ``ckpt["online_backbone"]`` into a torchvision ``resnet50``
  (``fc = Identity``) strictly after removing ``module.`` (ssl_eval_protocols,
  ``models/byol.py``), and its ``target_backbone`` the same way (SSL-MedSeg,
  ``models/pretrained_models.py``: top-level key ``target_backbone``, prefix ``module.``);
- the project's networks (``model/basic_modules.py``) are torchvision's own ResNet, so the names
  after the prefix are torchvision's already: the mapping is removing ``module.``.

Everything else in the file is dropped with its reason: ``online_projection`` (projector),
``predictor``, ``target_*`` (target network), and any optimizer or training state.
"""
from __future__ import annotations

import torch

from byol_fast.weights.importers import Converted, check_complete

ONLINE = "online_backbone"
TARGET = "target_backbone"
PREFIX = "module."  # DistributedDataParallel's wrapper name, on every key of the released file
CLASSIFIER = ("fc.weight", "fc.bias")

# Top-level entries besides the backbone, and why they are left out (names from the README and
# the SSL-MedSeg loader; the per-tensor entries are named "<entry>.<key>").
REASONS = {"online_projection": "projector", "predictor": "predictor", "optimizer": "optimizer", "amp": "optimizer"}


def _tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def detect(obj: dict) -> bool:
    """The released file: ``online_backbone`` and ``target_backbone``, each a state_dict of tensors whose
    every key starts with ``module.``, the online one holding ``module.conv1.weight`` and batch-norm
    running statistics under torch's names."""
    if not isinstance(obj, dict):
        return False
    online, target = obj.get(ONLINE), obj.get(TARGET)
    if not (_tensor_dict(online) and _tensor_dict(target)):
        return False
    if not all(isinstance(k, str) and k.startswith(PREFIX) for k in (*online, *target)):
        return False
    return f"{PREFIX}conv1.weight" in online and f"{PREFIX}bn1.running_mean" in online


def _reason(entry: str, value) -> str:
    if entry in REASONS:
        return REASONS[entry]
    if entry.startswith("target_"):
        return "target network"
    return "not the backbone" if _tensor_dict(value) else "training state"


def convert(obj: dict) -> Converted:
    state: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in obj[ONLINE].items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else None
        if name is None:
            unmapped.append(f"{ONLINE}.{key}")
        elif name in CLASSIFIER:
            dropped[f"{ONLINE}.{key}"] = "classifier"
        else:
            state[name] = value  # torchvision's own name once DDP's prefix is gone
    for entry, value in obj.items():
        if entry == ONLINE:
            continue
        reason = _reason(str(entry), value)
        if _tensor_dict(value):  # a module's state_dict: one entry per tensor
            for key in value:
                dropped[f"{entry}.{key}"] = reason
        else:
            dropped[str(entry)] = reason
    if not unmapped:
        check_complete(state, "byol-pytorch", lambda name: f"{ONLINE}.{PREFIX}{name}")
    return Converted(state=state, layout="byol-pytorch", dropped=dropped, unmapped=unmapped)
