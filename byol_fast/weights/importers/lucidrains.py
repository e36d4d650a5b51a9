"""Importer of the learner of lucidrains' ``byol-pytorch`` package (``from byol_pytorch import BYOL``),
its whole state_dict saved (``torch.save(learner.state_dict(), path)``).

The layout, from the package's ``byol_pytorch/byol_pytorch.py``:

- ``BYOL(net, image_size, hidden_layer=-2, ...)`` keeps the network it is given as ``net`` and again
  inside ``online_encoder = NetWrapper(net, ...)`` (``online_encoder.net``, the same tensors); the
  wrapper reads the representation from a forward hook on ``hidden_layer`` (-2: a torchvision ResNet's
  ``avgpool``), so the network's own ``fc`` is in the state but never used;
- ``online_encoder.projector``: built on the first forward (the constructor runs one on a random
  batch), a Linear/BatchNorm1d/ReLU/Linear ``Sequential`` (``0``, ``1``, ``3``), or nested under
  ``0`` (Linear, BatchNorm1d) and ``2`` (that MLP) with simplicial embeddings (the default since 0.9);
- ``online_predictor``: the same MLP (``0``, ``1``, ``3``);
- ``target_encoder``: ``None`` until the first forward with ``use_momentum`` (then a deep copy of
  ``online_encoder``: ``target_encoder.net.*``, ``target_encoder.projector.*``); never made without
  momentum (the SimSiam variant), so absent from that state;
- the augmentations hold no parameters or buffers.

The package's own ``BYOLTrainer`` saves ``net.state_dict()`` alone: a plain torchvision state_dict,
which ``convert`` reads as such (layout "torchvision").

The online backbone is ``online_encoder.net.*`` under torchvision's names; ``net.*`` must hold the
same tensors (it is the same module) and is dropped as a duplicate, ``fc`` as the unused classifier.
"""
from __future__ import annotations

import torch

from byol_fast.errors import CheckpointError
from byol_fast.weights.importers import Converted, check_complete
from byol_fast.weights.importers.mmpretrain import TORCHVISION_KEY

ONLINE = "online_encoder.net."
PARTS = {"net": "duplicate of online_encoder.net", "online_encoder": "projector",
         "online_predictor": "predictor", "target_encoder": "target network"}
REQUIRED = {"net", "online_encoder", "online_predictor"}
CLASSIFIER = ("fc.weight", "fc.bias")


def detect(obj: dict) -> bool:
    """A state_dict of tensors whose parts are the learner's (``target_encoder`` optional) and whose
    ``online_encoder.net`` holds a ResNet stem (``conv1.weight``)."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return False
    if not all(isinstance(k, str) for k in obj):
        return False
    parts = {k.split(".", 1)[0] for k in obj}
    return REQUIRED <= parts <= set(PARTS) and f"{ONLINE}conv1.weight" in obj


def convert(obj: dict) -> Converted:
    state: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in obj.items():
        if key.startswith(ONLINE):
            name = key[len(ONLINE):]
            if name in CLASSIFIER:
                dropped[key] = "classifier (unused: the learner hooks the layer before it)"
            elif TORCHVISION_KEY.fullmatch(name):
                state[name] = value
            else:
                unmapped.append(key)
        else:
            part = key.split(".", 1)[0]
            dropped[key] = PARTS[part]
            if part == "net":  # the module the online encoder wraps: the same tensors, or not this layout
                twin = obj.get(ONLINE + key[len("net."):])
                if twin is None or twin.shape != value.shape or not torch.equal(twin, value):
                    raise CheckpointError(f"byol-pytorch learner: {key} differs from {ONLINE}{key[4:]}, which "
                                          "BYOL keeps as the same module; which one is the encoder is unknown")
    if not unmapped:
        check_complete(state, "lucidrains", lambda name: ONLINE + name)
    return Converted(state=state, layout="lucidrains", dropped=dropped, unmapped=unmapped)
