"""The checkpoint formats, written and read here, and how they reach the disk.

Three kinds of file, each tagged with its kind when written and told apart by it when read:

- :data:`PRETRAIN` (``runs/x/last.pt``): online and target networks, predictor, optimizer, step,
  RNG and loader states, the config; a top-level ``"kind"`` entry;
- :data:`LINEAR` (``runs/x/linear/last.pt``): the frozen encoder, the classifier, its optimizer,
  the epoch and the results so far; a top-level ``"kind"`` entry;
- :data:`ENCODER` (``python -m byol_fast.export``): a plain torchvision state_dict. Its tag (and the
  input normalisation) sits in the state_dict's own ``_metadata`` (where PyTorch keeps per-module
  versions), so ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` still sees
  nothing but tensors and reports only ``fc.*`` missing; as ``.safetensors``, in its string metadata.

Pretraining files written before the tags existed are recognised by their keys.

Every file is written to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash (even kill -9) mid-write leaves the previous file intact.
"""
from __future__ import annotations

import collections
import json
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from . import safe_load

LAST = "last.pt"
PRETRAIN = "byol_fast.pretrain"
LINEAR = "byol_fast.linear_eval"
ENCODER = "byol_fast.encoder"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run; the message names the file."""


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save(state: dict, path: str | Path, kind: str) -> None:
    """Write a pretraining or linear-evaluation checkpoint, tagged with its ``kind``."""
    atomic_save({"kind": kind, **state}, path)


def save_encoder(state_dict: dict, path: str | Path, mean, std, padding: str = "torchvision") -> None:
    """Write an exported encoder: a torchvision state_dict whose ``_metadata`` carries the tag, the
    input normalisation (``mean``/``std`` on [0, 1] pixels) it was trained with and its padding
    ("same" for an encoder converted from TensorFlow/Haiku, see byol_fast.model)."""
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        meta[""] = {**meta.get("", {}), **_encoder_tag(mean, std, padding)}
    atomic_save(state_dict, path)


def save_encoder_safetensors(state_dict: dict, path: str | Path, mean, std, padding: str = "torchvision") -> None:
    """The same encoder as a safetensors file (tensors and a string map, never code), tagged alike."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in _encoder_tag(mean, std, padding).items()})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any file this process writes (safetensors makes it private)
    os.replace(tmp, path)


def _encoder_tag(mean, std, padding: str) -> dict:
    return {"kind": ENCODER, "mean": [float(m) for m in mean], "std": [float(s) for s in std], "padding": padding}


def encoder_tag(obj: dict) -> dict:
    """What an exported encoder was tagged with (kind, mean, std, padding), or {} for a foreign state_dict."""
    tag = (getattr(obj, "_metadata", None) or {}).get("", {})
    return tag if tag.get("kind") == ENCODER else {}


def _read_safetensors(path: Path) -> dict:
    """A safetensors file as a state_dict, its tag (if ours) put where save_encoder puts it."""
    from safetensors import safe_open

    state = collections.OrderedDict()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
        meta = f.metadata() or {}
    if meta.get("kind") == json.dumps(ENCODER):
        state._metadata = {"": {k: json.loads(v) for k, v in meta.items() if k in ("kind", "mean", "std", "padding")}}
    return state


def kind_of(obj: dict) -> str | None:
    """The kind of a loaded file: PRETRAIN, LINEAR, ENCODER, or None (e.g. a foreign state_dict)."""
    if obj.get("kind") in (PRETRAIN, LINEAR):
        return obj["kind"]
    if "online" in obj and "config" in obj:  # a pretraining checkpoint from before the tags
        return PRETRAIN
    meta = getattr(obj, "_metadata", None) or {}
    return ENCODER if meta.get("", {}).get("kind") == ENCODER else None


def load(path: str | Path, kind: str | None = None, map_location="cpu") -> dict:
    """The dict in ``path``; with ``kind``, a CheckpointError unless the file is of that kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:  # neither reader runs code from the file
        state = _read_safetensors(path) if path.suffix == ".safetensors" else safe_load.read(path, map_location)
    except safe_load.UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a byol_fast checkpoint (found {type(state).__name__})")
    if kind is not None and kind_of(state) != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (it is {kind_of(state) or 'of no byol_fast kind'})")
    return state


def rng_state() -> dict:
    """Every generator's state as numbers, strings and tensors, so that the file loads with
    ``torch.load(weights_only=True)`` alone (numpy's key array becomes an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def git_revision() -> str:
    """The code's git revision (with '-dirty' for uncommitted changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
