"""The saved index file of byol_fast.datasets.index: where it lives, its JSON format, and its report.

An index is saved inside the dataset folder (``.byol_index.json``) when that is writable, else in
``~/.cache/byol_fast/`` under a hash of the folder's path; a human-readable report of the skipped
files sits next to it. Writes are atomic (temporary file, then rename), so another rank reading
the index never sees half a file. Paths in the file are relative to the dataset root; each entry
keeps the file's (size, mtime_ns), the key under which a later scan reuses its verdict. A flat
folder labelled by a label file (byol_fast.datasets.label_files) records which file in
``labels_from``, and a later scan reads it again.

An index file is read bounded (byol_fast.datasets.untrusted: at most 256 MB, JSON nested at most 32
deep) and its structure checked by type before anything uses it (:func:`load_index_json`): each
required key there and of its type, the columns of one length, every label one of the classes (or
-1 without classes), every path relative and inside the root. A mistake is one line naming the file
and the key; a cached index with one is ignored and the folder scanned again.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from byol_fast.datasets.samples import Index
from byol_fast.datasets.untrusted import read_json, utf8
from byol_fast.errors import DatasetError

INDEX_NAME = ".byol_index.json"
INDEX_FORMAT = "byol_fast.index"
# Bump when check_image's verdicts change, so older caches are not trusted.
INDEX_VERSION = 2
# The columns of the kept files, with the type of their entries.
_COLUMNS = {"path": str, "label": int, "kind": str, "size": int, "mtime_ns": int}


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root``, for paths built by joining onto root (os.path.relpath is
    a hundred times slower, which shows on a million files)."""
    return path[len(os.path.join(root, "")):]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "byol_fast"


def _home_index_path(root: str) -> Path:
    """Index location for a read-only dataset: keyed by a hash of the absolute root."""
    return _cache_dir() / f"index-{hashlib.sha256(root.encode()).hexdigest()[:16]}.json"


def _writable(folder: str) -> bool:
    return os.access(folder, os.W_OK)


def index_locations(root: str | os.PathLike) -> list[Path]:
    """Where the cached index of ``root`` may live: inside it first, then ~/.cache/byol_fast/."""
    root = os.path.abspath(root)
    return [Path(root) / INDEX_NAME, _home_index_path(root)]


def report_path_for(index_path: str | os.PathLike) -> Path:
    """The human-readable report sits next to its index: ``x.json`` -> ``x.report.txt``."""
    p = Path(index_path)
    return p.with_name(p.name.removesuffix(".json") + ".report.txt")


def read_index_json(path: Path) -> dict | None:
    """A saved index as a dict, or None when absent, unreadable, not ours or not well formed."""
    try:
        return load_index_json(path)
    except DatasetError:
        return None


def load_index_json(path: str | os.PathLike) -> dict:
    """A saved index as a dict, read bounded and its structure checked (see the module docstring); a
    DatasetError of one line naming the file and the key when it is not a well-formed index."""
    where = os.fspath(path)
    data = read_json(where)
    if not isinstance(data, dict) or (data.get("format"), data.get("version")) != (INDEX_FORMAT, INDEX_VERSION):
        raise DatasetError(f"not a byol_fast index file (or another version): {where}")
    root = _typed(data, "root", str, where)
    if not os.path.isabs(root) or "\0" in root or not utf8(root):
        raise DatasetError(f"{where}: root: {root[:200]!r} is not the absolute path of a folder")
    classes = _typed(data, "classes", list, where)
    _entries(classes, str, where, "classes")
    if _typed(data, "max_pixels", int, where) <= 0:
        raise DatasetError(f"{where}: max_pixels: expected a whole number > 0")
    files = _typed(data, "files", dict, where)
    for key, kind in _COLUMNS.items():
        _entries(_typed(files, key, list, where, "files."), kind, where, f"files.{key}")
    if len({len(files[k]) for k in _COLUMNS}) != 1:
        raise DatasetError(f"{where}: files: its columns ({', '.join(_COLUMNS)}) differ in length")
    bad = next((i for i, y in enumerate(files["label"]) if not (0 <= y < len(classes) if classes else y == -1)), None)
    if bad is not None:
        allowed = f"one of the {len(classes)} classes (0..{len(classes) - 1})" if classes else "-1 (no classes)"
        raise DatasetError(f"{where}: files.label[{bad}] = {files['label'][bad]}, expected {allowed}")
    for i, entry in enumerate(_typed(data, "skipped", list, where)):
        key = f"skipped[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("reason"), str) \
                or any(type(entry.get(k)) not in (int, type(None)) for k in ("size", "mtime_ns")):
            raise DatasetError(f"{where}: {key}: expected {{path: str, reason: str, size: int or null, "
                               "mtime_ns: int or null}")
    if data.get("labels_from") is not None and not isinstance(data["labels_from"], dict):
        raise DatasetError(f"{where}: labels_from: expected an object")
    return data


def _typed(data: dict, key: str, kind: type, where: str, prefix: str = ""):
    """``data[key]``, or a DatasetError naming the file and the key when it is missing or not a ``kind``."""
    if key not in data:
        raise DatasetError(f"{where}: {prefix}{key}: missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetError(f"{where}: {prefix}{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _entries(values: list, kind: type, where: str, key: str) -> None:
    """A DatasetError naming the first entry of ``values`` that is not a ``kind`` (a bool is no int)."""
    bad = next((i for i, v in enumerate(values) if type(v) is not kind), None)
    if bad is not None:
        raise DatasetError(f"{where}: {key}[{bad}]: expected {kind.__name__}, got {type(values[bad]).__name__}")


@dataclass
class Saved:
    """A previous scan's index file: where it is, its content, and its verdicts by relative path."""

    path: Path | None = None
    content: dict | None = None
    verdicts: dict[str, tuple[int, int, bool, str]] = field(default_factory=dict)  # size, mtime, ok, what


def load_saved(root: str, max_pixels: int) -> Saved:
    """The first saved index of ``root`` made with the same max_pixels, or an empty Saved."""
    for path in index_locations(root):
        data = read_index_json(path)
        if data is None or data.get("root") != root or data.get("max_pixels") != max_pixels:
            continue
        try:
            return Saved(path, data, _saved_verdicts(data))
        except (KeyError, TypeError, ValueError):  # hand-edited or damaged: scan afresh
            continue
    return Saved()


def recorded_labels(root: str) -> dict | None:
    """The label source (``labels_from``) a saved index of ``root`` recorded, whatever its
    max_pixels, so that a later scan labels the folder from the same files; None when none did."""
    for path in index_locations(root):
        data = read_index_json(path)
        if data is not None and data.get("root") == root and data.get("labels_from"):
            return data["labels_from"]
    return None


def _saved_verdicts(data: dict) -> dict[str, tuple[int, int, bool, str]]:
    """relpath -> (size, mtime_ns, ok, kind or reason) for every cacheable entry of a saved index."""
    f = data["files"]
    verdicts = {p: (s, m, True, k) for p, s, m, k in zip(f["path"], f["size"], f["mtime_ns"], f["kind"])}
    for s in data["skipped"]:
        if s["size"] is not None:
            verdicts[s["path"]] = (s["size"], s["mtime_ns"], False, s["reason"])
    return verdicts


def to_json(index: Index) -> dict:
    """The index file's content; paths relative to root, kept files as parallel columns."""
    rel = functools.partial(relative, root=index.root)
    skipped = []
    for path, reason in index.skipped:
        size, mtime = index.stamps.get(path, (None, None))
        skipped.append({"path": rel(path), "reason": reason, "size": size, "mtime_ns": mtime})
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "root": index.root,
        "classes": index.classes,
        "max_pixels": index.max_pixels,
        "num_files": len(index.files),
        "num_skipped": len(index.skipped),
        "files": {
            "path": [rel(p) for p in index.files],
            "label": index.labels,
            "kind": index.kinds,
            "size": [index.stamps[p][0] for p in index.files],
            "mtime_ns": [index.stamps[p][1] for p in index.files],
        },
        "skipped": skipped,
        # Only for a flat folder labelled by a label file: a folder index keeps the format it had.
        **({"labels_from": index.labels_from} if index.labels_from else {}),
    }


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers (other ranks) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _report_text(index: Index) -> str:
    """The skipped-files report: counts by reason, then one line per file, then renamed formats."""
    lines = [f"byol_fast index report for {index.root}",
             f"kept {len(index.files)} images, skipped {len(index.skipped)}", ""]
    lines += [f"  {n:8d}  {cat}" for cat, n in sorted(index.skip_counts().items())]
    lines += ["", "Skipped (reason <TAB> path):"] + [f"{r}\t{p}" for p, r in index.skipped]
    mismatched = [(p, k) for p, k in zip(index.files, index.kinds) if not _name_matches(p, k)]
    if mismatched:
        lines += ["", "Kept, but the content is not what the name says (DALI reads the content):"]
        lines += [f"{k}\t{p}" for p, k in mismatched]
    return "\n".join(lines) + "\n"


def _name_matches(path: str, kind: str) -> bool:
    """Does a file's extension name the format its content has? (.JPEG holding a PNG: no.)"""
    ext = os.path.splitext(path)[1].lower()
    expected = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".ppm": "PPM",
                ".pgm": "PPM", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
    fmt = kind.split(":", 1)[0]
    return expected.get(ext) == ("JPEG" if fmt == "MPO" else fmt)


def save_index(index: Index) -> None:
    """Write the index and its report: inside root if writable, else in ~/.cache/byol_fast/.

    Sets ``index.index_path`` and ``index.report_path``; warns (does not fail) if neither
    place can be written, since the index in memory is still good.
    """
    text = json.dumps(to_json(index), separators=(",", ":"))
    report = _report_text(index)
    inside, home = index_locations(index.root)
    for path in ([inside] if _writable(index.root) else []) + [home]:
        try:
            _atomic_write(path, text)
            _atomic_write(report_path_for(path), report)
        except OSError:
            continue
        index.index_path, index.report_path = str(path), str(report_path_for(path))
        return
    warnings.warn(f"could not write the index of {index.root} (tried {inside} and {home})", stacklevel=2)


def save_if_changed(index: Index, saved: Saved) -> None:
    """Write index and report unless the saved ones already say exactly this (a second scan)."""
    report = report_path_for(saved.path) if saved.path else None
    if saved.content == to_json(index) and report.exists():
        index.index_path, index.report_path = str(saved.path), str(report)
    else:
        save_index(index)
