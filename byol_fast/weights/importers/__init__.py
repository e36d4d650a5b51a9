"""Importers of the BYOL checkpoints other projects release: each maps its layout onto torchvision's
ResNet names, so that linear evaluation, export, the feature API and predict take such a file as it is.

One module per source project, each with two functions:

- ``detect(obj: dict) -> bool``: whether a loaded file (already read without running code, by
  ``byol_fast.weights.checkpoint.load``) is in this project's layout; exact key structure, not guesses;
- ``convert(obj: dict) -> Converted``: the online backbone under torchvision's names (no ``fc.*``), and
  what was dropped (heads, target network, optimizer state) and why.

:func:`convert` here picks the layout (or takes the one named), runs it, and checks the result
strictly: every tensor the layout calls part of the backbone must be mapped, and the mapped names
must be exactly one backbone's (``byol_fast.weights.backbone_match.infer_backbone`` says which, or
names the missing and left-over keys). Nothing is loaded "successfully" with a random backbone
underneath.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from byol_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from byol_fast.errors import CheckpointError
from byol_fast.weights.backbone_match import infer_backbone, nearest_backbone

# Layout name -> module (byol_fast.weights.importers.<module>). Detection tries them in this order.
LAYOUTS = {
    "mmpretrain": "mmpretrain",
    "solo-learn": "solo_learn",
    "lightly": "lightly",
    "byol-pytorch": "byol_pytorch",
    "lucidrains": "lucidrains",
    "passl": "passl",
    "deepmind": "deepmind",
    "vissl": "vissl",
    "torchvision": "torchvision_resnet",
}
# Layouts that are no project's checkpoint: detect() never names them (byol_fast's readers take a bare
# torchvision state_dict before the importers), convert() falls back to them when nothing else matches.
FALLBACKS = ("torchvision",)


@dataclass
class Converted:
    """A foreign backbone under torchvision's ResNet names.

    state: torchvision key -> tensor (no ``fc.*``); layout: the LAYOUTS name; dropped: source keys
    left out on purpose, each with why (``{"neck.mlp.0.weight": "projector"}``); padding: "torchvision"
    (symmetric, as torchvision pads) or "same" (TensorFlow/Haiku SAME, asymmetric on strided layers);
    mean/std: the input normalisation the source was trained with, on [0, 1] pixels.
    """

    state: dict[str, torch.Tensor]
    layout: str
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)  # backbone keys of the source the layout could not map
    padding: str = "torchvision"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def report(self) -> str:
        why: dict[str, int] = {}
        for reason in self.dropped.values():
            why[reason] = why.get(reason, 0) + 1
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(why.items())) or "nothing"
        return (f"{self.layout}: mapped {len(self.state)} backbone tensors onto torchvision's names "
                f"(padding {self.padding}); dropped {len(self.dropped)}: {parts}")


def check_complete(state: dict, layout: str, source_name) -> None:
    """Refuse a backbone that is not exactly one known encoder's, naming the tensors missing from (and
    left over beyond) the nearest one, both under torchvision's and under the file's names
    (``source_name(torchvision_name)``); ``byol_fast.weights.backbone_match.infer_backbone``, which
    :func:`convert` runs next, names them under torchvision's names only."""
    given = set(state)
    nearest = set(nearest_backbone(state)[1])
    missing, extra = sorted(nearest - given), sorted(given - nearest)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: " + ", ".join(f"{k} ({source_name(k)})" for k in missing[:6]))
        if extra:
            parts.append(f"{len(extra)} left over: " + ", ".join(f"{k} ({source_name(k)})" for k in extra[:6]))
        raise CheckpointError(f"{layout}: the online backbone is no known encoder's; "
                              f"against the nearest, {'; '.join(parts)}")


def top_level_dropped(obj: dict, keep: str, reasons: dict[str, str]) -> dict[str, str]:
    """Every top-level entry of a released file but ``keep``, with its reason ("training state" unless
    ``reasons`` names one)."""
    return {str(k): reasons.get(k, "training state") for k in obj if k != keep}


def _module(layout: str):
    return importlib.import_module(f"{__name__}.{LAYOUTS[layout]}")


def detect(obj) -> str | None:
    """The layout of a loaded file, or None."""
    if not isinstance(obj, dict):
        return None
    for layout in LAYOUTS:
        if layout not in FALLBACKS and _module(layout).detect(obj):
            return layout
    return None


def convert(obj, source: str, layout: str = "auto") -> Converted:
    """The backbone of ``obj`` (loaded from ``source``) in torchvision's names; a CheckpointError naming
    the keys when the layout is unknown, or when anything of the backbone is missing or left over."""
    if layout == "auto":
        layout = detect(obj) or next((f for f in FALLBACKS if _module(f).detect(obj)), None)
        if layout is None:
            keys = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{source}: no known checkpoint layout ({', '.join(LAYOUTS)}); top-level keys: {keys}")
    elif layout not in LAYOUTS:
        raise CheckpointError(f"--format: {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    elif not _module(layout).detect(obj):
        raise CheckpointError(f"{source} is not in the {layout} layout")
    try:
        converted = _module(layout).convert(obj)
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:  # a malformed file of that layout
        raise CheckpointError(f"{source} ({layout}): not a well-formed file of this layout: {type(e).__name__}: {e}") from None
    if converted.unmapped:
        raise CheckpointError(f"{source} ({layout}): {len(converted.unmapped)} backbone tensors have no torchvision "
                              f"name: {', '.join(converted.unmapped[:6])}")
    infer_backbone(converted.state, f"{source} ({layout})")  # exactly one backbone's keys and shapes, or an error
    return converted
