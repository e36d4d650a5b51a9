"""Importer of yaox12/BYOL-PyTorch's released checkpoint (``resnet50_byol_imagenet2012.pth.tar``) and of
the checkpoints its trainer writes.

The released file's layout, as that project documents and as the code that loads the file reads it:

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

The trainer's checkpoint (``trainer/byol_trainer.py`` ``save_checkpoint``, every ``save_epoch``
epochs): ``{"config", "epoch", "steps", "model": model.state_dict(), "optimizer", "amp"}``, where the
model is ``model/byol_model.py``'s ``BYOLModel``: ``online_network`` and ``target_network``
(``model/basic_modules.py`` ``EncoderwithProjection``: ``encoder = Sequential(*resnet.children()[:-1])``,
so ``encoder.0`` conv1, ``encoder.1`` bn1, ``encoder.4``-``7`` layer1-4, and the projector MLP under
the project's own spelling ``projetion``: ``l1``, ``bn1``, ``l2``) and ``predictor`` (``predictor.l1``, ...).
The trainer wraps the model in apex's DistributedDataParallel when ``distributed`` (its config's
default), which keeps it as ``module``: every key then starts with ``module.``
(``module.online_network.encoder.0.weight``). Run on one process, the keys have no prefix; both are read.
"""
from __future__ import annotations

import torch

from byol_fast.weights.importers import Converted, check_complete
from byol_fast.weights.importers.lightly import backbone_under, sequential_name

ONLINE = "online_backbone"
TARGET = "target_backbone"
PREFIX = "module."  # DistributedDataParallel's wrapper name, on every key of the released file
CLASSIFIER = ("fc.weight", "fc.bias")

# Top-level entries besides the backbone, and why they are left out (names from the README and
# the SSL-MedSeg loader; the per-tensor entries are named "<entry>.<key>").
REASONS = {"online_projection": "projector", "predictor": "predictor", "optimizer": "optimizer", "amp": "optimizer"}


# The trainer's checkpoint: its model's parts, and why each but the online encoder is dropped.
TRAINER_MODEL = "model"
TRAINER_PARTS = {"online_network", "target_network", "predictor"}
TRAINER_TOP_LEVEL = {"config": "config", "epoch": "training state", "steps": "training state",
                     "optimizer": "optimizer", "amp": "optimizer"}


def _tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _trainer_prefix(obj) -> str | None:
    """The prefix of the trainer checkpoint's model keys ("module." or ""), or None when ``obj`` is no
    such checkpoint: ``model`` a state_dict whose keys, after one shared prefix, are exactly the
    BYOLModel's three parts, its online encoder a Sequential of torchvision's children."""
    model = obj.get(TRAINER_MODEL) if isinstance(obj, dict) else None
    if not _tensor_dict(model) or not all(isinstance(k, str) for k in model):
        return None
    prefix = PREFIX if all(k.startswith(PREFIX) for k in model) else ""
    parts = {k[len(prefix):].split(".", 1)[0] for k in model}
    if parts == TRAINER_PARTS and f"{prefix}online_network.encoder.0.weight" in model:
        return prefix
    return None


def detect(obj: dict) -> bool:
    """The released file: ``online_backbone`` and ``target_backbone``, each a state_dict of tensors whose
    every key starts with ``module.``, the online one holding ``module.conv1.weight`` and batch-norm
    running statistics under torch's names; or the trainer's checkpoint (:func:`_trainer_prefix`)."""
    if not isinstance(obj, dict):
        return False
    if _trainer_prefix(obj) is not None:
        return True
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


def _convert_trainer(obj: dict, prefix: str) -> Converted:
    model = obj[TRAINER_MODEL]
    online = f"{prefix}online_network.encoder."
    state, unmapped = backbone_under(model, online)
    unmapped = [f"{TRAINER_MODEL}.{k}" for k in unmapped]
    dropped = {str(k): TRAINER_TOP_LEVEL.get(k, "training state") for k in obj if k != TRAINER_MODEL}
    for key in model:
        if key.startswith(online):
            continue
        part = key[len(prefix):].split(".", 1)[0]
        dropped[f"{TRAINER_MODEL}.{key}"] = ("target network" if part == "target_network" else
                                             "predictor" if part == "predictor" else "projector")
    if not unmapped:
        check_complete(state, "byol-pytorch", lambda name: f"{TRAINER_MODEL}.{online}{sequential_name(name)}")
    return Converted(state=state, layout="byol-pytorch", dropped=dropped, unmapped=unmapped)


def convert(obj: dict) -> Converted:
    prefix = _trainer_prefix(obj)
    if prefix is not None:
        return _convert_trainer(obj, prefix)
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
