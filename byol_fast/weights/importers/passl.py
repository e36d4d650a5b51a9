"""Importer of PaddlePaddle/PASSL's BYOL release (``byol_r50_300.pdparams``), without Paddle.

The layout, from PASSL's code at the commit that published the file (b488935, "add byol docs",
August 2021; the same code lives on under ``passl_v110/``):

- ``passl/hooks/checkpoint_hook.py`` writes a checkpoint with a plain ``pickle.dump`` of
  ``{"epoch": int, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
  "lr_sheduer": lr_scheduler.state_dict()}`` (sic; ``"lr_scheduler"`` in later versions), every
  tensor turned into a numpy array; ``tools/extract_weight.py`` reads ``ckpt["state_dict"]``. A
  bare ``model.state_dict()`` written with ``paddle.save`` (the same keys at the top level, plus
  Paddle's ``"StructuredToParameterName@@"`` name table) is read too.
- ``passl/modeling/architectures/BYOL.py`` builds ``towers = LayerList([Sequential(backbone, neck),
  Sequential(backbone, neck)])`` (online, target), ``predictor``, ``classifier`` (a Linear probe on
  the detached features, trained alongside) and ``backbone = towers[0][0]``, an alias that
  Paddle's ``state_dict`` (which does not de-duplicate shared sublayers) writes a second time. So
  the model's keys are ``towers.0.0.*`` (online ResNet), ``towers.0.1.mlp.*`` (online projector,
  ``NonLinearNeckV2``: Linear, BatchNorm1D, ReLU, Linear), ``towers.1.0.*`` / ``towers.1.1.*``
  (target), ``predictor.mlp.*``, ``classifier.weight/bias`` and ``backbone.*`` (= ``towers.0.0.*``);
  the ``L2Head`` holds no tensors.
- ``passl/modeling/backbones/resnet.py``: the backbone is ``paddle.vision.models.ResNet`` (depth 50,
  ``num_classes=0``: no ``fc``; ``with_pool``: parameter-free average pool), whose module names are
  torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``downsample.0``/``downsample.1``) and
  whose tensors have torchvision's shapes (convolutions ``[out, in, kh, kw]``, no conv bias).

The mapping: ``backbone.<module>.<leaf>`` -> ``<module>.<leaf>``, with Paddle's batch-norm
statistics renamed (``_mean`` -> ``running_mean``, ``_variance`` -> ``running_var``) and numpy arrays
turned into torch tensors. Paddle keeps no ``num_batches_tracked``; torchvision's state_dict has one
per batch norm (it only counts training steps, and matters only with ``momentum=None``), so each is
created as a zero int64 scalar. Paddle stores a Linear weight as ``[in, out]``, the transpose of
torch's; the ResNet backbone has no Linear besides ``fc`` (absent here, dropped if present), so no
tensor needs transposing. The input normalisation is ImageNet's mean/std on [0, 1] pixels
(``img_normalize`` in BYOL.py), this package's default.
"""
from __future__ import annotations

import numpy as np
import torch

from byol_fast.errors import CheckpointError
from byol_fast.weights.importers import Converted, check_complete

ONLINE = "backbone."  # PASSL's alias of the online tower's ResNet, what its extract_weight.py takes
TOWER = "towers.0.0."  # the same ResNet under the tower's name
NAME_TABLE = "StructuredToParameterName@@"  # paddle.save's structured-name -> parameter-name table

# Paddle's names of a leaf tensor -> torchvision's.
LEAVES = {"weight": "weight", "bias": "bias", "_mean": "running_mean", "_variance": "running_var"}

# Model keys besides the backbone (first matching prefix), and why they are left out.
PARTS = (
    (TOWER, "duplicate of the online backbone"),
    ("towers.0.1.", "projector"),
    ("towers.1.", "target network"),
    ("predictor.", "predictor"),
    ("classifier.", "classifier"),
    ("head.", "head"),
)
# Top-level entries of a training checkpoint besides the model.
ENTRIES = {"optimizer": "optimizer", "lr_sheduer": "lr scheduler", "lr_scheduler": "lr scheduler",
           "epoch": "training state", NAME_TABLE: "Paddle name table"}


def _array(value) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _model(obj: dict) -> dict:
    """The model's state_dict: under ``state_dict`` in a training checkpoint, else the file itself."""
    inner = obj.get("state_dict")
    return inner if isinstance(inner, dict) else obj


def detect(obj: dict) -> bool:
    """A PASSL BYOL model: online and target towers' ResNets (``towers.0.0.``, ``towers.1.0.``) under
    Paddle's names (batch-norm ``_mean``), either bare or under a checkpoint's ``state_dict``."""
    if not isinstance(obj, dict):
        return False
    model = _model(obj)
    keys = ("towers.0.0.conv1.weight", "towers.0.0.bn1._mean", "towers.1.0.conv1.weight")
    return all(_array(model.get(k)) for k in keys)


def _tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.array(value, copy=True))  # own, writable memory (the unpickled array may not be)


def convert(obj: dict) -> Converted:
    model = _model(obj)
    prefix = ONLINE if any(str(k).startswith(ONLINE) for k in model) else TOWER
    state: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in model.items():
        key = str(key)
        if key.startswith(prefix):
            name = key[len(prefix):]
            module, _, leaf = name.rpartition(".")
            if module == "fc":  # a classifier (num_classes > 0); BYOL's backbone has none
                dropped[key] = "classifier"
            elif leaf in LEAVES and module and _array(value):
                state[f"{module}.{LEAVES[leaf]}"] = _tensor(value)
                if leaf == "_mean":  # Paddle keeps no step counter; torchvision's state_dict has one
                    state[f"{module}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
            else:
                unmapped.append(key)
            continue
        reason = next((why for part, why in PARTS if key.startswith(part)), None)
        if key == NAME_TABLE:
            reason = ENTRIES[NAME_TABLE]
        dropped[key] = reason or "not the backbone"
    if prefix == ONLINE:
        _check_duplicate(model)
    if not unmapped:
        check_complete(state, "passl", lambda name: _paddle_name(prefix, name))
    if model is not obj:
        for entry in obj:
            if entry != "state_dict":
                dropped[str(entry)] = ENTRIES.get(str(entry), "training state")
    return Converted(state=state, layout="passl", dropped=dropped, unmapped=unmapped)


def _paddle_name(prefix: str, name: str) -> str:
    """The file's name of torchvision's ``name`` (the inverse of the mapping)."""
    module, _, leaf = name.rpartition(".")
    if leaf == "num_batches_tracked":
        return "none in Paddle: created"
    paddle_leaf = {v: k for k, v in LEAVES.items()}.get(leaf, leaf)
    return f"{prefix}{module}.{paddle_leaf}"


def _check_duplicate(model: dict) -> None:
    """``towers.0.0.*`` is the same ResNet as ``backbone.*`` in PASSL's BYOL; refuse a file where it is not."""
    for key, value in model.items():
        key = str(key)
        if not key.startswith(TOWER):
            continue
        alias = ONLINE + key[len(TOWER):]
        other = model.get(alias)
        if other is None:
            raise CheckpointError(f"PASSL BYOL file: {alias} is missing (its twin {key} is there; "
                                  "backbone = towers[0][0] in PASSL's BYOL)")
        if tuple(np.shape(other)) != tuple(np.shape(value)) or not np.array_equal(np.asarray(other), np.asarray(value)):
            raise CheckpointError(f"PASSL BYOL file: {key} differs from {alias}, which should be the same "
                                  "online backbone (backbone = towers[0][0])")
