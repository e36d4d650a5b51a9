"""Load a pretrained encoder from any byol_fast file and turn images into features.

Three kinds of file are understood (``byol_fast.checkpoint.kind_of`` tells our two checkpoint kinds
apart by their tag; a state_dict is recognised by its tensors, tagged by our export or not):

- a pretraining checkpoint (``runs/x/last.pt``): the ``online`` encoder, the network the paper
  evaluates (``which="target"`` takes the EMA target's instead);
- a linear-evaluation checkpoint (``runs/x/linear/last.pt``): the frozen encoder it was trained on;
- an exported encoder (``python -m byol_fast.export``): a plain torchvision ResNet state_dict; and any
  untagged torchvision ResNet state_dict (its ``fc.*`` classifier is ignored).

Loading is strict (byol_fast/REFERENCE.md section 3): a state_dict whose keys carry a ``module.`` or
``backbone.`` prefix would "load" with ``strict=False`` and leave a random network, so any missing
or unexpected backbone key is an error that lists them.

Example::

    from byol_fast.features import load_feature_extractor
    model = load_feature_extractor("runs/demo/last.pt")     # eval mode, no gradients
    images = torch.rand(8, 3, 64, 64)                         # RGB in [0, 1] (or uint8 0..255)
    feats = model(images)                                     # (8, 512) for ResNet-18, 2048 for ResNet-50
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import layouts
from .checkpoint import CheckpointError
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .model import BACKBONES, build_encoder

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
    padding: str = "torchvision"  # "same": converted from TensorFlow/Haiku (byol_fast.model.build_encoder)


# ---------------------------------------------------------------------------- reading files


def read_encoder_weights(path: str | Path, which: str = "online", backbone: str | None = None) -> EncoderWeights:
    """Read the encoder held by any of our files (see the module docstring); no network is built.

    ``which`` picks the tower of a pretraining checkpoint ("online" or "target"); ``backbone``
    overrides the name the file implies (it must still match the weights).
    """
    return encoder_weights(ckpt.load(path), path, which, backbone)


def encoder_weights(obj: dict, path: str | Path, which: str = "online", backbone: str | None = None) -> EncoderWeights:
    """The encoder in ``obj``, a file already read by byol_fast.checkpoint.load from ``path``."""
    if which not in ("online", "target"):
        raise ValueError(f"which: expected 'online' or 'target', got {which!r}")
    kind = ckpt.kind_of(obj)
    if kind == ckpt.PRETRAIN:
        prefix = "encoder."
        state = {k[len(prefix):]: v for k, v in obj[which].items() if k.startswith(prefix)}
        cfg = obj["config"]
        data = cfg.get("data", {})
        weights = EncoderWeights(state, cfg["model"]["backbone"], tuple(data.get("mean", IMAGENET_MEAN)),
                                 tuple(data.get("std", IMAGENET_STD)))
    elif kind == ckpt.LINEAR:
        weights = EncoderWeights(obj["encoder"], obj["backbone"], tuple(obj["mean"]), tuple(obj["std"]),
                                 obj.get("padding", "torchvision"))
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()) and not layouts.detect(obj):
        state = {k: v for k, v in obj.items() if k not in CLASSIFIER_KEYS}  # a bare state_dict (ours: tagged)
        tag = ckpt.encoder_tag(obj)
        weights = EncoderWeights(state, backbone or infer_backbone(state, path), tuple(tag.get("mean", IMAGENET_MEAN)),
                                 tuple(tag.get("std", IMAGENET_STD)), tag.get("padding", "torchvision"))
    elif layouts.detect(obj):  # a checkpoint another project released
        converted = layouts.convert(obj, path)
        weights = EncoderWeights(converted.state, infer_backbone(converted.state, path), converted.mean,
                                 converted.std, converted.padding)
    else:
        raise CheckpointError(f"{path}: not a byol_fast checkpoint, a ResNet state_dict or a known release "
                              f"({', '.join(layouts.LAYOUTS)}); top-level keys: {', '.join(sorted(map(str, obj))[:8])}")
    if backbone:
        weights.backbone = backbone
    return weights


def nearest_backbone(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Size]]:
    """(name, its encoder's key -> shape) of the backbone (byol_fast.model.BACKBONES) whose keys differ
    least from ``state``'s: the exact one when there is one."""
    best = None
    for name in BACKBONES:
        with torch.device("meta"):  # no memory, no initialisation cost
            shapes = {k: v.shape for k, v in build_encoder(name)[0].state_dict().items()}
        if shapes.keys() == state.keys() and all(shapes[k] == state[k].shape for k in state):
            return name, shapes
        if best is None or len(set(shapes) ^ set(state)) < len(set(best[1]) ^ set(state)):
            best = (name, shapes)
    return best


def infer_backbone(state: dict[str, torch.Tensor], source: str | Path = "state_dict") -> str:
    """The backbone whose encoder keys and shapes are exactly those of ``state``; otherwise a
    CheckpointError naming what differs from the nearest one."""
    nearest, shapes = nearest_backbone(state)
    misshapen = sorted(k for k in set(shapes) & set(state) if shapes[k] != state[k].shape)
    if shapes.keys() == state.keys() and not misshapen:
        return nearest
    hint = _key_hint(set(state), set(shapes))
    if misshapen:
        hint += f"; {len(misshapen)} of another shape (e.g. {misshapen[0]}: {tuple(state[misshapen[0]].shape)})"
    raise CheckpointError(f"{source}: its keys match no known encoder ({', '.join(BACKBONES)}); "
                          f"nearest {nearest}: {hint}")


def _key_hint(given: set[str], expected: set[str]) -> str:
    """A message naming missing/unexpected keys and a common prefix, the usual cause."""
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    msg = f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
    firsts = {k.split(".", 1)[0] for k in given}
    if len(firsts) == 1 and not firsts & {k.split(".", 1)[0] for k in expected}:
        msg += f"; every key starts with '{firsts.pop()}.': strip that prefix (a DDP or wrapper name) and save again"
    return msg


# ---------------------------------------------------------------------------- building networks


def load_backbone_weights(encoder: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``state`` into ``encoder``, failing loudly on any missing, unexpected or misshapen key."""
    expected, given = set(encoder.state_dict()), set(state)
    if expected != given:
        raise CheckpointError(f"{source}: backbone keys do not match: " + _key_hint(given, expected))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: backbone weights do not fit: {e}") from None


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


def freeze(encoder: nn.Module) -> nn.Module:
    """Eval mode (batch norm uses its running statistics) and no gradients: the linear-eval protocol."""
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


class FeatureExtractor(nn.Module):
    """Input normalisation + frozen encoder: images (N, 3, H, W) -> features (N, F) float32.

    Images are RGB, either float in [0, 1] or uint8 in [0, 255]; any size the ResNet takes
    (the paper evaluates 224 x 224 center crops). Scriptable (``byol_fast.export --torchscript``).
    """

    def __init__(self, encoder: nn.Module, width: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.encoder = freeze(encoder)
        self.width = width
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # always frozen: batch norm must keep its running statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # a context, not the decorator: TorchScript compiles this form
            x = images.to(self.mean.device)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            return self.encoder((x - self.mean) / self.std).float()

    @torch.jit.ignore
    def extract(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Features of many images, ``batch_size`` at a time; returned on the images' device."""
        return torch.cat([self(chunk).to(images.device) for chunk in images.split(batch_size)])


@torch.no_grad()
def loader_features(encoder: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype = torch.float32,
                    out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every (images, labels) batch of one epoch of ``loader`` through ``encoder`` in eval mode.

    images: (B, 3, H, W) normalised; labels: (B,) int64. Returns (features (N, F) ``out_dtype``,
    labels (N,) int64), both on ``device``. The encoder's train/eval mode is restored afterwards
    (the BYOL target tower normally runs in train mode).
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, target in loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                feats.append(encoder(images.to(device, non_blocking=True)).to(out_dtype))
            labels.append(target.to(device, non_blocking=True).long().view(-1))
    finally:
        encoder.train(was_training)
    if not feats:
        return torch.zeros(0, 0, device=device, dtype=out_dtype), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


def load_feature_extractor(path: str | Path, which: str = "online", backbone: str | None = None,
                           device: str | torch.device = "cpu") -> FeatureExtractor:
    """A :class:`FeatureExtractor` for the encoder in ``path`` (any of our files), with the
    normalisation it was trained with."""
    weights = read_encoder_weights(path, which, backbone)
    encoder, width = build_frozen_encoder(weights, path)
    return FeatureExtractor(encoder, width, weights.mean, weights.std).to(device)
