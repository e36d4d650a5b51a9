"""Reading what a dataset's own files say, with bounded cost: JSON capped in size and nesting, paths
confined to the dataset root, file names shown safely.

A dataset folder, its saved index (``.byol_index.json``), a shard set's manifest and its index
files may come from anyone. Everything read from them goes through here, and anything outside these
bounds is a :class:`~byol_fast.errors.DatasetError` of one line naming the file and the key:

- JSON: at most :data:`MAX_JSON_BYTES` (an index of several million files fits) and nested at most
  :data:`MAX_JSON_DEPTH` deep, checked before parsing (the parser recurses once per level);
- a path read from a file: relative, no ``..`` component, no NUL, UTF-8 (:func:`join_inside`); a
  path found on disk through a link: resolving inside one of the dataset's folders (:func:`leads_out`);
- a file name that is not UTF-8 (DALI and the JSON files take UTF-8 only) is shown by its bytes,
  escaped (:func:`shown`).
"""
from __future__ import annotations

import json
import os
import re
import stat

from byol_fast.errors import DatasetError

MAX_JSON_BYTES = 256 * 2**20  # an index of ImageNet's 1.28 million files takes about 80 MB
MAX_JSON_DEPTH = 32  # an index or a manifest nests 4 deep
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of JSON text nest, strings left out (a bracket in a file name
    does not count); computed on the brackets alone, without building anything."""
    import numpy as np

    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets, np.uint8)
    opens = (steps == ord("[")) | (steps == ord("{"))
    return int(np.cumsum(np.where(opens, 1, -1), dtype=np.int64).max())


def parse_json(raw: bytes, where: str, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The value of JSON bytes read from ``where``; a DatasetError naming it when they are over
    ``max_bytes``, nested deeper than :data:`MAX_JSON_DEPTH`, or not UTF-8 JSON."""
    if len(raw) > max_bytes:
        raise DatasetError(f"{where}: larger than {max_bytes // 2**20} MB, too large for this kind of file")
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise DatasetError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels; not a file byol_fast wrote")
    try:
        return json.loads(raw)
    except RecursionError:  # unreachable after the depth check; kept so no parser path escapes
        raise DatasetError(f"{where}: JSON nested too deep") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise DatasetError(f"{where}: not valid JSON ({str(e)[:200]})") from None


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> object:
    """:func:`parse_json` of a local file, read only when it is a regular file within the cap."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise DatasetError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror})") from None
    return parse_json(raw, path, max_bytes)


def escapes(rel: str) -> str | None:
    """Why a relative path read from a file does not stay inside the folder it is relative to, or None
    when it does. Backslashes count as separators in ``..`` too, so that no spelling of it gets through
(a leading backslash is part of a name here: the path stays inside the folder)."""
    if not rel:
        return "an empty path"
    if "\0" in rel:
        return "a path with a NUL character"
    if os.path.isabs(rel):
        return "an absolute path"
    if ".." in rel.replace("\\", "/").split("/"):
        return "a path climbing out with '..'"
    if not rel.isascii() and not utf8(rel):
        return "a path that is not UTF-8 text"
    return None


def join_inside(root: str, rels: list, where: str, key: str) -> list[str]:
    """``root/rel`` for each of ``rels`` (the paths of ``key`` in the file ``where``); a DatasetError
    naming the file, the key and the entry for one that is not a string or does not stay inside
    ``root`` (:func:`escapes`). Lexical: links inside the root were judged when it was scanned."""
    out = []
    for i, rel in enumerate(rels):
        why = "not a string" if not isinstance(rel, str) else escapes(rel)
        if why is not None:
            raise DatasetError(f"{where}: {key}[{i}] = {_quote(rel)} is {why}; every path in it must stay "
                               f"inside {root}")
        out.append(root.rstrip("/") + "/" + rel if "://" in root else os.path.join(root, rel))
    return out


def leads_out(path: str, roots: tuple[str, ...]) -> str | None:
    """Where ``path`` really is when that is outside every one of ``roots`` (real paths, resolved
    already), else None: a link may lead anywhere inside the dataset, and nowhere else."""
    real = os.path.realpath(path)
    if any(real == r or real.startswith(os.path.join(r, "")) for r in roots):
        return None
    return real


def utf8(name: str) -> bool:
    """Whether a name from the filesystem is UTF-8 text (Python keeps other bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """A file name as a printable string: its bytes, with those that are not UTF-8 as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _quote(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}..."
