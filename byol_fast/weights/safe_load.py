"""Reading a file a user points at without ever running code from it.

A pickle names the Python callables that rebuild its objects, and an unpickler calls them: a file
saved with ``torch.save({"state_dict": Evil()})``, where ``Evil.__reduce__`` returns
``(os.system, ("...",))``, runs that command on ``torch.load(..., weights_only=False)``
(docs/reference.md section 3). So every file a user hands byol_fast (``--checkpoint``,
``load_feature_extractor``, resume, ``convert``) goes through :func:`read`, which picks the reader
by the file's kind and keeps each read within its budgets:

- plain pickles of numpy arrays (Paddle's ``.pdparams``, a JAX/Haiku ``.pkl``): :func:`read_pickle`,
  with :class:`byol_fast.weights.unpickler.ArrayUnpickler`, which admits numpy arrays, scalars and
  dtypes (numpy's names stand for the checked builders of :mod:`byol_fast.weights.safe_arrays`:
  numpy never sees the file's array or dtype state), also as ``dill`` writes them,
  ``collections.OrderedDict``, inert stand-ins of DeepMind's data classes and the plain-data classes
  of ``unpickler.DATA_CLASSES`` as inert ``Unread`` stand-ins, nothing else; it sets state (pickle's
  BUILD) only on the builders and stand-ins, never on a class or function the allow-list holds, adds
  items to lists and dicts only, hashes only scalar keys, and keeps each file within budgets
  (namedtuple classes in the unpickler, array bytes in :func:`safe_arrays.reading`);
- torch files, zip or legacy format: :mod:`byol_fast.weights.safe_torch`, the same unpickler with what
  torch's own weights-only reader admits (tensors, storages, dtypes, devices, sizes), checked.

Anything else is refused with a :class:`UnsafeFileError` naming the callable the file asked for, or
what it tried. tests/weights/test_safe_load.py keeps one crafted file of each kind of attack these
readers refuse.
"""
from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import torch

from byol_fast.weights import (
    safe_arrays,
    safe_torch,  # torch files: ours on top of torch's archive reading
)
from byol_fast.weights.unpickler import BUDGET, ArrayUnpickler, UnsafeFileError


def _refusal(path: Path, why: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: refused: {why}; byol_fast reads only tensors, "
                           "arrays, numbers, strings and containers from a file, never code")


# What the readers raise on a file that is neither a torch file nor a pickle (text, a .npy, a torn
# or empty file, a damaged zip): the pickle machine's own errors on bytes that are no pickle
# (an opcode's operand missing or of another type, a memo index never stored), torch's archive reader
# (RuntimeError), zipfile's, a decode of bytes that are no text, and what a budget or depth limit of
# Python raises. byol_fast.weights.checkpoint.load turns each into one line naming the file.
READ_ERRORS = (pickle.UnpicklingError, EOFError, LookupError, ValueError, TypeError, AttributeError,
               ArithmeticError, RuntimeError, zipfile.BadZipFile, zipfile.LargeZipFile, struct.error,
               MemoryError, RecursionError)


def read(path: str | Path, map_location="cpu"):
    """The object in ``path`` (a torch file or a plain pickle of arrays), read without running code.

    Raises UnsafeFileError for a file that names any other callable or that a reader refuses, and
    lets the readers' own errors (:data:`READ_ERRORS`) through for a file that is neither (the
    caller words them)."""
    path = Path(path)
    if zipfile.is_zipfile(path) or _starts_like_legacy_torch(path):
        return _guarded(path, lambda: safe_torch.read(path, map_location))
    return read_pickle(path)


# How torch.save's legacy (non-zip) format begins: its pickled magic number, at any protocol.
_LEGACY_STARTS = tuple(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p) for p in range(2, 6))


def _starts_like_legacy_torch(path: Path) -> bool:
    """Whether ``path`` begins as torch.save's legacy format does (a plain pickle begins with its payload)."""
    with open(path, "rb") as f:
        head = f.read(max(map(len, _LEGACY_STARTS)))
    return any(head.startswith(start) for start in _LEGACY_STARTS)


def read_pickle(path: str | Path):
    """A plain pickle of numpy arrays in dicts, lists and tuples, read with :class:`ArrayUnpickler`."""
    path = Path(path)

    def load():
        with open(path, "rb") as f:
            return ArrayUnpickler(f).load()
    return _guarded(path, load)


def _guarded(path: Path, load):
    """``load()`` as one read of ``path``: within its budgets (namedtuple classes here, array bytes
    and walks in :func:`safe_arrays.reading`), its array specs resolved, a refusal naming the file."""
    outer, BUDGET.classes = BUDGET.classes, 0
    try:
        with safe_arrays.reading(path.stat().st_size):
            return safe_arrays.resolve(load())
    except (UnsafeFileError, safe_arrays.UnsafeArrayError) as e:
        raise _refusal(path, str(e)) from None
    finally:
        BUDGET.classes = outer
