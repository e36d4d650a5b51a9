"""The structure of byol_fast's own checkpoints, checked by type and shape when a file is read.

A file is data from wherever it came: a ``last.pt`` planted in a run's folder or edited by hand can
hold a ``step`` that is text, a ``config`` that is a list, a ``mean`` of five values or a state_dict
with integer keys. Read as they are, such fields fail deep inside training or evaluation, in a
traceback that names neither the file nor the field. So
:func:`byol_fast.weights.checkpoint.load`, the one place every command reads our files through
(resume, ``--checkpoint``, ``--model.init``, ``predict``, the feature API), checks each field its kind
holds against a small schema (:data:`PRETRAIN`, :data:`LINEAR`, :data:`ENCODER_TAG`) and raises
one CheckpointError naming the file and the field::

    runs/x/last.pt: step: expected a non-negative int, got 'abc'

Fields are checked where present: files of older versions, and the small files of the tests, lack
some. What a consumer needs it asks for with :func:`require`. Fields consumed deeper (the RNG states,
the loaders' DALI checkpoints) are checked as far as their type and shape go: their content is the
business of the code that takes them.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from byol_fast.config import BACKBONES
from byol_fast.errors import CheckpointError
from byol_fast.models.resnet import PADDINGS
from byol_fast.weights.safe_arrays import brief


class Bad(Exception):
    """A field of the wrong type or shape: where in the file (``loader[0].step``) and what is wrong."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}" if where else what)


Check = Callable[[object, str], None]  # (value, where) -> None, or raises Bad


def _expected(where: str, what: str, value, shown: str | None = None) -> Bad:
    """Bad: ``what`` was expected; ``value`` is shown short (brief), or as ``shown`` says."""
    return Bad(where, f"expected {what}, got {brief(value) if shown is None else shown}")


# ---------------------------------------------------------------------------- values


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    """A finite number (a bool is not one, nor an int too large for a float)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def non_negative_int(value, where: str) -> None:
    if not _is_int(value) or value < 0:
        raise _expected(where, "a non-negative int", value)


def positive_int(value, where: str) -> None:
    if not _is_int(value) or value < 1:
        raise _expected(where, "a positive int", value)


def text(value, where: str) -> None:
    if not isinstance(value, str):
        raise _expected(where, "a string", value)


def optional_text(value, where: str) -> None:
    if value is not None:
        text(value, where)


def mapping(value, where: str) -> None:
    if not isinstance(value, Mapping):
        raise _expected(where, "a mapping", value)


def backbone(value, where: str) -> None:
    if not isinstance(value, str) or value not in BACKBONES:
        raise Bad(where, f"{brief(value)} is no backbone byol_fast knows ({', '.join(BACKBONES)})")


def padding(value, where: str) -> None:
    if not isinstance(value, str) or value not in PADDINGS:
        raise Bad(where, f"{brief(value)} is no padding byol_fast knows ({', '.join(PADDINGS)})")


def mean(value, where: str) -> None:
    """Per-channel input means: three finite numbers (RGB, on [0, 1] pixels)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(map(_is_real, value)):
        raise _expected(where, "three numbers (one per RGB channel)", value, _shown(value))


def std(value, where: str) -> None:
    """Per-channel input deviations: three finite positive numbers."""
    mean(value, where)
    if not all(v > 0 for v in value):
        raise _expected(where, "three positive numbers (one per RGB channel)", value, _shown(value))


def _shown(value) -> str:
    """A short list as its values (a list of five numbers says more than "a list"), else as brief does."""
    if isinstance(value, (list, tuple)) and len(value) <= 8 and all(type(v) in (int, float, str, bool) for v in value):
        return f"[{', '.join(brief(v) for v in value)}]"
    return brief(value)


def state_dict(value, where: str) -> None:
    """A module's state_dict: parameter names (strings) to tensors."""
    mapping(value, where)
    for key, tensor in value.items():
        if not isinstance(key, str):
            raise Bad(where, f"expected a state_dict (names to tensors), got the key {brief(key)}")
        if not isinstance(tensor, torch.Tensor):
            raise Bad(f"{where}[{key[:80]!r}]", f"expected a tensor, got {brief(tensor)}")


def string_list(value, where: str) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _expected(where, "a non-empty list of strings", value)


def list_of_mappings(value, where: str) -> None:
    if not isinstance(value, list):
        raise _expected(where, "a list", value)
    for i, item in enumerate(value):
        mapping(item, f"{where}[{i}]")


def fields(schema: dict[str, Check], closed: bool = False) -> Check:
    """A mapping whose entries, where present, pass ``schema``'s checks (others are let through,
    unless ``closed``)."""
    def check(value, where: str) -> None:
        mapping(value, where)
        for key, item in value.items():
            if key in schema:
                schema[key](item, f"{where}.{key}" if where else key)
            elif closed:
                raise Bad(where, f"unexpected entry {brief(key)}")
    return check


def sequence(*checks: Check, name: str) -> Check:
    """A tuple (or list) of exactly ``len(checks)`` items, the i-th passing ``checks[i]``."""
    def check(value, where: str) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != len(checks):
            raise _expected(where, f"{name} ({len(checks)} items)", value)
        for i, (item, item_check) in enumerate(zip(value, checks)):
            item_check(item, f"{where}[{i}]")
    return check


def _real(value, where: str) -> None:
    if not _is_real(value):
        raise _expected(where, "a number", value)


# ---------------------------------------------------------------------------- optimizer states


_GROUP_NUMBERS = ("lr", "initial_lr", "momentum", "weight_decay", "dampening", "eps")


def optimizer(value, where: str) -> None:
    """A torch optimizer's state_dict: ``state`` (parameter index -> its tensors and numbers) and
    ``param_groups`` (each with its ``params`` indices and its hyper-parameters)."""
    mapping(value, where)
    for key in ("state", "param_groups"):
        if key not in value:
            raise Bad(where, f"no {key!r} entry (an optimizer's state holds one)")
    mapping(value["state"], f"{where}.state")
    for index, per_param in value["state"].items():
        if not _is_int(index):
            raise Bad(f"{where}.state", f"expected parameter indices as keys, got {brief(index)}")
        mapping(per_param, f"{where}.state[{index}]")
        for key, item in per_param.items():  # momentum buffers, moments, step counts
            if not (item is None or isinstance(item, torch.Tensor) or _is_real(item)):
                raise _expected(f"{where}.state[{index}].{brief(key)}", "a tensor, a number or None", item)
    list_of_mappings(value["param_groups"], f"{where}.param_groups")
    for i, group in enumerate(value["param_groups"]):
        params = group.get("params")
        if not isinstance(params, list) or not all(map(_is_int, params)):
            raise _expected(f"{where}.param_groups[{i}].params", "a list of parameter indices", params)
        for key in _GROUP_NUMBERS:
            if key in group:
                _real(group[key], f"{where}.param_groups[{i}].{key}")


def scaler(value, where: str) -> None:
    """torch.amp.GradScaler's state_dict: names to numbers (empty when the scaler is off)."""
    mapping(value, where)
    for key, number in value.items():
        if not isinstance(key, str):
            raise Bad(where, f"expected names as keys, got {brief(key)}")
        _real(number, f"{where}.{key}")


# ---------------------------------------------------------------------------- RNG and loader states


_MT_WORDS = 624  # the Mersenne Twister's state (Python's random, numpy's legacy RandomState)


def _words(value, where: str, count: int) -> None:
    """``count`` integers in [0, 2**32): a tuple of ints, a tensor or an array of an integer dtype."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        integral = (not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool) \
            if isinstance(value, torch.Tensor) else value.dtype.kind in "iu"
        if value.ndim != 1 or value.shape[0] != count or not integral:
            raise _expected(where, f"{count} integers", value, f"a {type(value).__name__} of shape {tuple(value.shape)}")
        if count and (int(value.min()) < 0 or int(value.max()) >= 1 << 32):
            raise Bad(where, "integers outside [0, 2**32)")
        return
    if not isinstance(value, (tuple, list)) or len(value) != count or not all(map(_is_int, value)):
        raise _expected(where, f"{count} integers", value)
    if not all(0 <= v < 1 << 32 for v in value):
        raise Bad(where, "integers outside [0, 2**32)")


def python_rng(value, where: str) -> None:
    """``random.getstate()``: (version 3, 624 state words and the position, the cached gauss or None)."""
    if not isinstance(value, tuple) or len(value) != 3 or not _is_int(value[0]) or value[0] != random.Random.VERSION:
        raise _expected(where, f"random.getstate()'s (version {random.Random.VERSION}, state, gauss)", value)
    state = value[1]
    if not isinstance(state, tuple) or len(state) != _MT_WORDS + 1:  # random.setstate takes a tuple only
        raise _expected(f"{where}[1]", f"a tuple of {_MT_WORDS + 1} integers", state)
    _words(state[:-1], f"{where}[1]", _MT_WORDS)
    if not _is_int(state[-1]) or not 0 <= state[-1] <= _MT_WORDS:
        raise _expected(f"{where}[1][{_MT_WORDS}]", f"a position in [0, {_MT_WORDS}]", state[-1])
    if value[2] is not None and not _is_real(value[2]):
        raise _expected(f"{where}[2]", "a number or None", value[2])


def numpy_rng(value, where: str) -> None:
    """numpy's legacy ``get_state()``: ("MT19937", 624 words, position, has_gauss, gauss)."""
    if not isinstance(value, (tuple, list)) or len(value) != 5 or not isinstance(value[0], str) \
            or value[0] != "MT19937":
        raise _expected(where, "numpy's ('MT19937', keys, pos, has_gauss, gauss)", value)
    _words(value[1], f"{where}[1]", _MT_WORDS)
    if not _is_int(value[2]) or not 0 <= value[2] <= _MT_WORDS:
        raise _expected(f"{where}[2]", f"a position in [0, {_MT_WORDS}]", value[2])
    if not _is_int(value[3]) or value[3] not in (0, 1):
        raise _expected(f"{where}[3]", "0 or 1", value[3])
    _real(value[4], f"{where}[4]")


def generator_state(value, where: str) -> None:
    """A torch generator's state: a 1-D uint8 tensor (the CPU's of the size torch's own has)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.ndim != 1:
        raise _expected(where, "a 1-D uint8 tensor (a torch generator's state)", value)


def cpu_generator_state(value, where: str) -> None:
    generator_state(value, where)
    size = torch.get_rng_state().numel()
    if value.numel() != size:
        raise Bad(where, f"expected a torch generator's state of {size} bytes, got {value.numel()}")


def rng(value, where: str) -> None:
    """byol_fast.weights.checkpoint.rng_state(): each generator's state."""
    mapping(value, where)
    for key in ("python", "numpy", "torch"):
        if key not in value:
            raise Bad(where, f"no {key!r} entry (the RNG state holds one per generator)")
    fields({"python": python_rng, "numpy": numpy_rng, "torch": cpu_generator_state, "cuda": generator_state})(
        value, where)


def _dali_checkpoint(value, where: str) -> None:
    if value is not None and not isinstance(value, bytes):
        raise _expected(where, "DALI's checkpoint (bytes) or None", value)


_LOADER_POSITION = fields({"epoch": non_negative_int, "step": non_negative_int, "offset": non_negative_int,
                           "pipeline": _dali_checkpoint})


def loader(value, where: str) -> None:
    """Each rank's loader position (pipelines.contract): {epoch, step, offset, pipeline}; an entry
    that is no mapping holds no position (a resumed run then computes it from the step)."""
    if not isinstance(value, list):
        raise _expected(where, "a list (one loader position per process)", value)
    for i, position in enumerate(value):
        if isinstance(position, Mapping):
            _LOADER_POSITION(position, f"{where}[{i}]")


# ---------------------------------------------------------------------------- the kinds


def config(value, where: str) -> None:
    """The run's config as saved (byol_fast.config.to_dict): its model's backbone and its data's
    normalisation are what readers of the file take from it."""
    fields({"model": fields({"backbone": backbone}),
            "data": fields({"mean": mean, "std": std})})(value, where)


# A pretraining checkpoint (runs/x/last.pt).
PRETRAIN: dict[str, Check] = {
    "kind": text, "step": non_negative_int, "online": state_dict, "target": state_dict, "predictor": state_dict,
    "propagation": state_dict, "optimizer": optimizer, "scaler": scaler, "rng": rng, "loader": loader,
    "config": config, "git": optional_text, "world_size": positive_int,
    "probe": fields({"head": state_dict, "optimizer": optimizer}),
}

# A linear-evaluation or fine-tuning checkpoint (runs/x/linear/last.pt).
LINEAR: dict[str, Check] = {
    "kind": text, "encoder": state_dict, "backbone": backbone, "padding": padding, "mean": mean, "std": std,
    "classes": string_list, "head": state_dict, "optimizer": optimizer, "scaler": scaler,
    "epoch": non_negative_int, "results": list_of_mappings, "source": mapping, "config": mapping, "rng": rng,
    "git": optional_text,
}
# What every linear checkpoint byol_fast writes holds (the classifier's readers take each of them).
LINEAR_REQUIRED = ("encoder", "backbone", "mean", "std", "classes", "head", "config")

# The tag of an exported encoder (in its state_dict's _metadata, or a safetensors file's metadata).
ENCODER_TAG: dict[str, Check] = {"kind": text, "mean": mean, "std": std, "padding": padding}


def check(state: Mapping, path: str | Path, schema: dict[str, Check], required: tuple[str, ...] = (),
          what: str = "checkpoint", where: str = "") -> None:
    """CheckpointError naming ``path`` and the field unless every entry of ``state`` that ``schema``
    names passes its check and every one of ``required`` is there (``where``: how the message calls
    ``state`` itself, when it is part of the file)."""
    require(state, path, required, what)
    try:
        fields(schema)(state, where)
    except Bad as e:
        raise CheckpointError(f"{path}: {e}") from None


def require(state: Mapping, path: str | Path, names, what: str = "checkpoint") -> None:
    """CheckpointError naming ``path`` unless ``state`` holds each of ``names``; a dotted name
    (``config.model.backbone``) is looked up through the mappings on its way."""
    for name in names:
        value = state
        for i, part in enumerate(name.split(".")):
            if not isinstance(value, Mapping) or part not in value:
                where = ".".join(name.split(".")[:i + 1])
                raise CheckpointError(f"{path}: no {where} entry (a byol_fast {what} holds one)")
            value = value[part]
