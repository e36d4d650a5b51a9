"""Matching a state_dict to a network: which backbone its keys and shapes are, and loading it strictly.

A state_dict whose keys carry a ``module.`` or ``backbone.`` prefix would "load" with
``strict=False`` and leave a random network, so every missing, unexpected or misshapen key is a
CheckpointError that lists them and names the usual cause."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from byol_fast.config import BACKBONES
from byol_fast.errors import CheckpointError
from byol_fast.models.resnet import build_encoder


def nearest_backbone(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Size]]:
    """(name, its encoder's key -> shape) of the backbone (byol_fast.config.BACKBONES) whose keys
    differ least from ``state``'s: the exact one when there is one."""
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


def load_backbone_weights(encoder: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``state`` into ``encoder``, failing loudly on any missing, unexpected or misshapen key."""
    expected, given = set(encoder.state_dict()), set(state)
    if expected != given:
        raise CheckpointError(f"{source}: backbone keys do not match: " + _key_hint(given, expected))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: backbone weights do not fit: {e}") from None
