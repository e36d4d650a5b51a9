"""The encoder in any file byol_fast reads: its weights (:func:`read_encoder_weights`), the frozen
network (:func:`build_frozen_encoder`, :func:`load_encoder`) and the feature API
(:func:`load_feature_extractor`, a ``byol_fast.models.feature_extractor.FeatureExtractor``).

The files understood (``byol_fast.weights.checkpoint.kind_of`` tells our two checkpoint kinds
apart by their tag; a state_dict is recognised by its tensors, tagged by our export or not):

- a pretraining checkpoint (``runs/x/last.pt``): the ``online`` encoder, the network the paper
  evaluates (``which="target"`` takes the EMA target's instead);
- a linear-evaluation checkpoint (``runs/x/linear/last.pt``): the frozen encoder it was trained on;
- an exported encoder (``python -m byol_fast.export``, ``.pt`` or ``.safetensors``): a plain
  torchvision ResNet state_dict; and any untagged torchvision ResNet state_dict (its ``fc.*``
  classifier is ignored);
- a checkpoint another project released, in a layout ``byol_fast.weights.importers`` knows.

Loading is strict (docs/reference.md section 3; byol_fast.weights.backbone_match): a state_dict
whose keys carry a ``module.`` or ``backbone.`` prefix would "load" with ``strict=False`` and leave
a random network, so any missing or unexpected backbone key is an error that lists them.

Example::

    from byol_fast.weights.encoder_file import load_feature_extractor
    model = load_feature_extractor("runs/demo/last.pt")     # eval mode, no gradients
    images = torch.rand(8, 3, 64, 64)                         # RGB in [0, 1] (or uint8 0..255)
    feats = model(images)                                     # (8, 512) for ResNet-18, 2048 for ResNet-50
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from byol_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from byol_fast.errors import CheckpointError
from byol_fast.models.feature_extractor import FeatureExtractor, freeze
from byol_fast.models.resnet import build_encoder
from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights import importers
from byol_fast.weights.backbone_match import infer_backbone, load_backbone_weights
from byol_fast.weights.checkpoint_schema import check, require, state_dict

CLASSIFIER_KEYS = ("fc.weight", "fc.bias")  # torchvision's classifier: not part of the encoder


@dataclass
class EncoderWeights:
    """An encoder's weights as read from a file, before building the network.

    state: torchvision key layout, no ``fc.*``; backbone: e.g. ``"resnet50"``; mean/std: the input
    normalisation it was trained with.
    """

    state: dict[str, torch.Tensor]
    backbone: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    padding: str = "torchvision"  # "same": converted from TensorFlow/Haiku (byol_fast.models.resnet.build_encoder)


# ---------------------------------------------------------------------------- reading files


def read_encoder_weights(path: str | Path, which: str = "online", backbone: str | None = None) -> EncoderWeights:
    """Read the encoder held by any of our files (see the module docstring); no network is built.

    ``which`` picks the tower of a pretraining checkpoint ("online" or "target"); ``backbone``
    overrides the name the file implies (it must still match the weights).
    """
    return encoder_weights(ckpt.load(path), path, which, backbone)


def encoder_weights(obj: dict, path: str | Path, which: str = "online", backbone: str | None = None) -> EncoderWeights:
    """The encoder in ``obj``, a file already read by byol_fast.weights.checkpoint.load from ``path``."""
    if which not in ("online", "target"):
        raise ValueError(f"which: expected 'online' or 'target', got {which!r}")
    kind = ckpt.kind_of(obj)
    if kind == ckpt.PRETRAIN:
        require(obj, path, (which, "config.model.backbone"), "pretraining checkpoint")
        prefix = "encoder."
        state = {k[len(prefix):]: v for k, v in obj[which].items() if k.startswith(prefix)}
        cfg = obj["config"]
        data = cfg.get("data", {})
        weights = EncoderWeights(state, cfg["model"]["backbone"], tuple(data.get("mean", IMAGENET_MEAN)),
                                 tuple(data.get("std", IMAGENET_STD)))
    elif kind == ckpt.LINEAR:
        weights = EncoderWeights(obj["encoder"], obj["backbone"], tuple(obj["mean"]), tuple(obj["std"]),
                                 obj.get("padding", "torchvision"))
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()) and not importers.detect(obj):
        check({"state_dict": obj}, path, {"state_dict": state_dict})  # names as keys, before any is read
        state = {k: v for k, v in obj.items() if k not in CLASSIFIER_KEYS}  # a bare state_dict (ours: tagged)
        tag = ckpt.encoder_tag(obj)
        weights = EncoderWeights(state, backbone or infer_backbone(state, path), tuple(tag.get("mean", IMAGENET_MEAN)),
                                 tuple(tag.get("std", IMAGENET_STD)), tag.get("padding", "torchvision"))
    elif importers.detect(obj):  # a checkpoint another project released
        converted = importers.convert(obj, path)
        weights = EncoderWeights(converted.state, infer_backbone(converted.state, path), converted.mean,
                                 converted.std, converted.padding)
    else:
        raise CheckpointError(f"{path}: not a byol_fast checkpoint, a ResNet state_dict or a known release "
                              f"({', '.join(importers.LAYOUTS)}); top-level keys: {', '.join(sorted(map(str, obj))[:8])}")
    if backbone:
        weights.backbone = backbone
    return weights


# ---------------------------------------------------------------------------- building networks


def build_frozen_encoder(weights: EncoderWeights, source: str | Path) -> tuple[nn.Module, int]:
    """(encoder, width) built from ``weights``: ``fc = Identity``, eval mode, no gradients."""
    encoder, width = build_encoder(weights.backbone, weights.padding)
    load_backbone_weights(encoder, weights.state, source)
    return freeze(encoder), width


def load_encoder(path: str | Path, which: str = "online", backbone: str | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, int]:
    """(encoder, feature width): the backbone (a torchvision ResNet, or the demo's tiny_resnet) with
    ``fc = Identity``, in eval mode, frozen.

    The encoder maps ImageNet-normalised images (N, 3, H, W) to pooled features (N, width).
    """
    encoder, width = build_frozen_encoder(read_encoder_weights(path, which, backbone), path)
    return encoder.to(device), width


def load_feature_extractor(path: str | Path, which: str = "online", backbone: str | None = None,
                           device: str | torch.device = "cpu") -> FeatureExtractor:
    """A :class:`FeatureExtractor` for the encoder in ``path`` (any of our files), with the
    normalisation it was trained with."""
    weights = read_encoder_weights(path, which, backbone)
    encoder, width = build_frozen_encoder(weights, path)
    return FeatureExtractor(encoder, width, weights.mean, weights.std).to(device)
