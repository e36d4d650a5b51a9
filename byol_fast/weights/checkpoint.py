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
old one, so a crash (even kill -9) mid-write leaves the previous file intact. ``checkpoint_writer.BackgroundWriter``
does the same off the training loop's critical path: it pauses the caller only to copy the state
into host memory it owns, and writes that copy in a thread.
"""
from __future__ import annotations

import collections
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from byol_fast.errors import CheckpointError
from byol_fast.weights import checkpoint_schema, isolated_read, safe_load

LAST = "last.pt"
PRETRAIN = "byol_fast.pretrain"
LINEAR = "byol_fast.linear_eval"
ENCODER = "byol_fast.encoder"


def _write_file(obj, f) -> None:
    """The bytes of a checkpoint into the open file ``f``: the one place they are produced (a test
    replaces it to cut a write short and kill the process mid-file)."""
    torch.save(obj, f)


def _failed_write(e: BaseException) -> bool:
    """Whether ``e`` is the disk refusing a write (full, read-only, gone) rather than a bug: an OSError,
    or torch's archive writer reporting a short write as a RuntimeError without the errno."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("PytorchStreamWriter failed", "unexpected pos", "file write failed")))


def _first_line(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write_file(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, an unpicklable entry: give the space back, keep the old file
        tmp.unlink(missing_ok=True)
        if _failed_write(e):
            free = shutil.disk_usage(path.parent).free / 1024 ** 3
            raise CheckpointError(f"{path}: could not be written ({_first_line(e)}; {free:.2f} GB free on its "
                                  f"disk); the previous checkpoint there is kept") from None
        raise
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
    ("same" for an encoder converted from TensorFlow/Haiku, see byol_fast.models.resnet)."""
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
    meta = getattr(obj, "_metadata", None)
    tag = meta.get("") if isinstance(meta, dict) else None
    return tag if isinstance(tag, dict) and type(tag.get("kind")) is str and tag["kind"] == ENCODER else {}


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
    kind = obj.get("kind")
    if type(kind) is str and kind in (PRETRAIN, LINEAR):  # a file's "kind" may be anything: an array too
        return kind
    if "online" in obj and "config" in obj:  # a pretraining checkpoint from before the tags
        return PRETRAIN
    return ENCODER if encoder_tag(obj) else None


def load(path: str | Path, kind: str | None = None, map_location="cpu") -> dict:
    """The dict in ``path``; with ``kind``, a CheckpointError unless the file is of that kind.

    Every way a file can fail to be one is a CheckpointError naming the file, in one line: missing,
    unreadable, refused by the readers (it would run code or blow up in memory), not a file these
    readers understand (text, a .npy, a torn or empty file), not a dict, not of ``kind``, or one of
    our kinds with a field of the wrong type or shape (:mod:`byol_fast.weights.checkpoint_schema`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:  # neither reader runs code from the file
        state = _read_safetensors(path) if path.suffix == ".safetensors" else isolated_read.read(path, map_location)
    except safe_load.UnsafeFileError as e:  # (a ValueError: caught before the readers' own errors)
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from None
    except (*safe_load.READ_ERRORS, _safetensors_error()) as e:
        raise CheckpointError(f"{path}: not a checkpoint byol_fast can read (a torch file, a pickle of arrays "
                              f"or a safetensors file): {_what_went_wrong(path, e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a byol_fast checkpoint (found {type(state).__name__})")
    if kind is not None and kind_of(state) != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (it is {kind_of(state) or 'of no byol_fast kind'})")
    check_fields(state, path)
    return state


def check_fields(state: dict, path: str | Path) -> None:
    """CheckpointError naming ``path`` and the field unless ``state``, if of one of our kinds, holds
    each field in the type and shape its kind's schema (byol_fast.weights.checkpoint_schema) says."""
    kind, tag = kind_of(state), state.get("kind")
    if type(tag) is str and tag.startswith("byol_fast.") and tag not in (PRETRAIN, LINEAR):
        raise CheckpointError(f"{path}: kind: {tag[:60]!r} is no kind of file this version of byol_fast reads "
                              f"({PRETRAIN}, {LINEAR})")
    if kind == PRETRAIN:
        checkpoint_schema.check(state, path, checkpoint_schema.PRETRAIN, what="pretraining checkpoint")
    elif kind == LINEAR:
        checkpoint_schema.check(state, path, checkpoint_schema.LINEAR, checkpoint_schema.LINEAR_REQUIRED,
                                what="linear-evaluation checkpoint")
    elif kind == ENCODER:
        checkpoint_schema.check({"state_dict": state}, path, {"state_dict": checkpoint_schema.state_dict})
        checkpoint_schema.check(encoder_tag(state), path, checkpoint_schema.ENCODER_TAG, where="tag")


def _safetensors_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def _what_went_wrong(path: Path, error: BaseException) -> str:
    """A reader's error in a few words: what a user can act on, never a traceback or a page of text."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive cut short or damaged (its directory cannot be read)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array (byol_fast reads arrays pickled in a dict, e.g. by torch.save)"
    if head.isascii() and all(c >= 32 or c in b"\t\n\r" for c in head):
        return "it looks like text"
    if isinstance(error, EOFError):
        return "it ends before its data does (a file cut short?)"
    if isinstance(error, (MemoryError, RecursionError)):
        return f"reading it ran out of {'memory' if isinstance(error, MemoryError) else 'stack'}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:120]}{'...' if len(text) > 120 else ''}" if text else type(error).__name__


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


