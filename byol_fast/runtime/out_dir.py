"""The folder a run writes into, checked before the work starts.

A run that cannot save loses everything it computed, so what can be known up front is checked
there, on the main process, each as one line naming ``out_dir``: that the folder can be made (no
regular file on its path, permission), that a file can be written in it, and, once the model is
built, that the disk has room for a checkpoint beside the previous one (a save writes a new file and
then replaces the old, so both exist for a moment).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from byol_fast.errors import ConfigError

GB = 1024 ** 3


def prepare(path: str | os.PathLike, key: str = "out_dir") -> Path:
    """``path`` made (with its parents) and shown writable; a ConfigError naming ``key`` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{key}: {path} exists and is not a folder") from None
    except NotADirectoryError:
        raise ConfigError(f"{key}: {path}: part of the path is a file, not a folder") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot make {path}: {e.strerror or e}") from None
    probe = path / f".write-test.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in {path}: {e.strerror or e}") from None
    finally:
        probe.unlink(missing_ok=True)
    return path


def state_bytes(*objects) -> int:
    """Bytes of the tensors in nested dicts, lists and tuples of state (what a checkpoint holds)."""
    total, stack = 0, list(objects)
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


def check_room(path: str | os.PathLike, checkpoint_bytes: int, key: str = "out_dir") -> None:
    """A ConfigError naming ``key`` when ``path``'s disk cannot hold a checkpoint of about
    ``checkpoint_bytes`` beside the one it replaces."""
    path = Path(path)
    free = shutil.disk_usage(path).free  # the previous checkpoint, if any, already takes its own space
    if free < checkpoint_bytes:
        raise ConfigError(f"{key}: {path} has {free / GB:.2f} GB free; a checkpoint of this run takes about "
                          f"{checkpoint_bytes / GB:.2f} GB and is written beside the previous one: free space "
                          f"or choose another out_dir")
