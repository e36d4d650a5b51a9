"""Dataset index, file validation and the demo dataset.

DALI cannot skip a sample: one corrupt or truncated file stops a pipeline with a critical error
(REFERENCE.md section 3). So the data path never hands DALI a file it has not seen decode. An image
folder is scanned once into an :class:`Index` of (path, label); every file is decoded on the CPU;
files that fail are left out and listed, with the reason, in a report next to the index. The index
is cached and a later scan decodes only files whose size or modification time changed.

Layouts (the same rules as ``torchvision.datasets.ImageFolder``, so labels agree with it):

- ImageFolder tree ``root/<class>/**/<image>``: classes are the sorted names of all sub-folders of
  ``root`` (empty ones included, so a class keeps its label when one split lacks it); files sorted
  as ImageFolder sorts them. Image files directly under ``root`` are not in a class and are listed
  as skipped.
- Flat folder of images (no sub-folders): ``classes`` is empty and every label is ``-1``
  (unlabelled). Pretraining ignores labels; linear evaluation needs a class tree.

Candidate files are those with torchvision's image extensions (case-insensitive); other files are
ignored silently, as ImageFolder ignores them. What a file *is* comes from its content, not its
name: ImageNet holds a PNG named ``.JPEG``, CMYK and grayscale JPEGs (REFERENCE.md section 3), all
of which DALI decodes, so they are kept and their kind recorded (``"PNG:RGB"``, ``"JPEG:CMYK"``).

Command line::

    python -m byol_fast.data index DATA [--workers N] [--max-pixels N] [--no-cache]
    python -m byol_fast.data demo OUT [--seed S] [--size PX] ...
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .constants import LUMA


class DatasetError(ValueError):
    """A dataset the index cannot use (missing, empty, wrong layout); the message names the folder."""


# torchvision.datasets.folder.IMG_EXTENSIONS: the same candidates, so our list matches ImageFolder's.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Container formats (as PIL names them) that DALI's image decoder reads. MPO is a JPEG with extra
# frames appended (camera files); decoders read its first JPEG frame. GIF is not in DALI's list.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "PPM", "TIFF", "WEBP", "JPEG2000"})

# Above ImageNet's largest images (about 6000 x 6000 = 36 MP) with room to spare, and below PIL's
# own decompression-bomb error (2 x Image.MAX_IMAGE_PIXELS = 179 MP), so our limit is the one hit.
MAX_PIXELS = 100_000_000

INDEX_NAME = ".byol_index.json"
INDEX_FORMAT = "byol_fast.index"
# Bump when check_image's verdicts change, so older caches are not trusted.
INDEX_VERSION = 1

# Reasons that depend on something other than the file's bytes (permissions, a link's target):
# never cached, checked again on every scan.
TRANSIENT_REASONS = ("unreadable", "missing")

# Below this many files to decode, process start-up costs more than it saves.
POOL_MIN_FILES = 64


# ------------------------------------------------------------------------------ checking one file


def check_image(path: str, max_pixels: int = MAX_PIXELS) -> tuple[bool, str]:
    """Decode one file fully; return ``(True, kind)`` or ``(False, reason)``. Never raises.

    kind is ``"<FORMAT>:<MODE>"`` with ``":progressive"`` for progressive JPEGs, e.g. ``"JPEG:RGB"``,
    ``"JPEG:CMYK"``, ``"JPEG:L:progressive"``, ``"PNG:RGBA"``. reason starts with a category
    (``empty file``, ``unreadable``, ``missing``, ``not an image``, ``unsupported format``,
    ``too large``, ``truncated``, ``corrupt``), then ``": "`` and details.
    """
    try:
        if os.path.getsize(path) == 0:
            return False, "empty file: 0 bytes"
        # Very large images make PIL warn; the size is judged below against max_pixels instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return _decode_opened(img, max_pixels)
    except Image.DecompressionBombError as e:
        return False, f"too large: {e}"
    except PermissionError:
        return False, "unreadable: permission denied"
    except FileNotFoundError:
        return False, "missing: file or link target not found"
    except Image.UnidentifiedImageError:
        return False, "not an image: no known image format in the content"
    except OSError as e:
        if "truncated" in str(e).lower():
            return False, f"truncated: {e}"
        return False, f"corrupt: OSError: {e}"
    except Exception as e:  # noqa: BLE001  PIL plugins raise many types on bad data; none may stop the scan
        return False, f"corrupt: {type(e).__name__}: {e}"


def _decode_opened(img: Image.Image, max_pixels: int) -> tuple[bool, str]:
    """Check format and size from the header, then decode every byte of the pixel data."""
    fmt, (width, height) = img.format, img.size
    if fmt not in DALI_FORMATS:
        return False, f"unsupported format: {fmt} (DALI cannot decode it)"
    if width * height > max_pixels:
        return False, f"too large: {width}x{height} pixels > max_pixels {max_pixels}"
    kind = f"{fmt}:{img.mode}" + (":progressive" if img.info.get("progressive") else "")
    # JPEG only: decode at 1/8 scale. Every entropy-coded byte is still decoded (so truncation and
    # broken scans are still caught); only the inverse DCT shrinks, which is most of the cost.
    img.draft(None, (max(1, width // 8), max(1, height // 8)))
    img.load()
    img.convert("RGB")  # the pipeline wants 3 channels; CMYK, palette and 16-bit must convert
    return True, kind


def _reason_category(reason: str) -> str:
    """The part of a skip reason before the first colon: what the summary counts by."""
    return reason.split(":", 1)[0]


# ------------------------------------------------------------------------------ the index


@dataclass
class Index:
    """Decodable images of one folder, in ImageFolder order.

    files: absolute paths; labels: class index per file (``-1`` for a flat folder); classes: sorted
    class-folder names (empty for a flat folder); root: the absolute folder; skipped: (path, reason)
    for every candidate left out (and empty class folders); kinds: what each kept file really is.
    checked / reused: files decoded by this call / taken from the cache (0 / len(files) on a
    fully cached second scan).
    """

    root: str
    files: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    index_path: str | None = None
    report_path: str | None = None
    checked: int = 0
    reused: int = 0
    max_pixels: int = MAX_PIXELS
    # (size, mtime_ns) per path, kept and cacheable skipped files alike: the cache key.
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """True for a class tree; False for a flat folder (labels all -1)."""
        return bool(self.classes)

    def skip_counts(self) -> Counter:
        """Number of skipped entries per reason category."""
        return Counter(_reason_category(reason) for _, reason in self.skipped)

    def summary(self) -> str:
        """A few human-readable lines: kept, kinds, skipped by reason, classes, where files are."""
        kinds = ", ".join(f"{k} {n}" for k, n in Counter(self.kinds).most_common())
        skips = ", ".join(f"{k} {n}" for k, n in sorted(self.skip_counts().items())) or "none"
        lines = [
            f"index of {self.root}",
            f"  kept     {len(self.files)} images ({kinds})",
            f"  skipped  {len(self.skipped)} ({skips})",
            f"  classes  {self.num_classes}" if self.labelled else "  classes  none (flat folder, labels -1)",
            f"  decoded  {self.checked} files now, {self.reused} reused from the cache",
            f"  index    {self.index_path or 'not written'}",
            f"  report   {self.report_path or 'not written'}",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ scanning the tree


def _is_candidate(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _list_candidates(root: str) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Walk ``root`` like ImageFolder: (classes, [(path, label)], [(path, reason)] for layout skips)."""
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot list dataset folder {root}: {e.strerror}") from e
    classes = [e.name for e in entries if e.is_dir()]
    top_files = [os.path.join(root, e.name) for e in entries if not e.is_dir() and _is_candidate(e.name)]
    if not classes:
        return [], [(p, -1) for p in top_files], []
    _refuse_split_root(root, classes)
    candidates: list[tuple[str, int]] = []
    stray = "outside class folders: images directly under the root have no class"
    layout_skips = [(p, stray) for p in top_files]
    for label, name in enumerate(classes):
        found, unlisted = _walk_class(os.path.join(root, name), label)
        layout_skips += [(e.filename, f"unreadable: cannot list folder ({e.strerror})") for e in unlisted]
        if not found and not unlisted:
            layout_skips.append((os.path.join(root, name), "empty class folder: no image files"))
        candidates += found
    return classes, candidates, layout_skips


def _walk_class(folder: str, label: int) -> tuple[list[tuple[str, int]], list[OSError]]:
    """Image files under one class folder in torchvision's order (sorted walk, links followed),
    and the errors of sub-folders that could not be listed (os.walk would drop them silently)."""
    found, errors = [], []
    for dirpath, _, names in sorted(os.walk(folder, onerror=errors.append, followlinks=True)):
        found += [(os.path.join(dirpath, n), label) for n in sorted(names) if _is_candidate(n)]
    return found, errors


def _refuse_split_root(root: str, classes: list[str]) -> None:
    """Stop on DATA holding train/ and val/: their names would silently become two 'classes'."""
    if set(classes) <= {"train", "val", "validation", "test"}:
        raise DatasetError(
            f"{root} holds dataset splits ({', '.join(classes)}), not classes: "
            f"pass one split, e.g. {os.path.join(root, classes[0])}"
        )


def _relative(path: str, root: str) -> str:
    """``path`` relative to ``root``, for paths built by joining onto root (os.path.relpath is
    a hundred times slower, which shows on a million files)."""
    return path[len(os.path.join(root, "")):]


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, following links; None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------------------ decoding in parallel


class _Progress:
    """Throttled progress line on stderr: done/total, files/s, ETA."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.tty = sys.stderr.isatty()
        # Overwrite one line on a terminal; in a log file, a line every 15 s is plenty.
        self.interval = 0.5 if self.tty else 15.0
        self.start = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.interval):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{self.label}: {done}/{self.total} files, {rate:.0f} files/s, ETA {_duration(eta)}"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _cpu_count() -> int:
    """Cores this process may use (respects taskset/SLURM affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_all(paths: list[str], max_pixels: int, workers: int,
               progress: _Progress) -> list[tuple[bool, str]]:
    """check_image over ``paths``, in order; in worker processes when that pays off."""
    workers = workers or _cpu_count()
    check = functools.partial(check_image, max_pixels=max_pixels)
    results: list[tuple[bool, str]] = []
    if workers == 1 or len(paths) < POOL_MIN_FILES:
        for path in paths:
            results.append(check(path))
            progress.update(len(results))
    else:
        # spawn, not fork: the caller may already run DALI or CUDA threads, which fork breaks.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(256, len(paths) // (workers * 16)))
        with ctx.Pool(min(workers, len(paths))) as pool:
            for result in pool.imap(check, paths, chunksize=chunk):
                results.append(result)
                progress.update(len(results))
    progress.update(len(results), final=True)
    return results


# ------------------------------------------------------------------------------ cache file


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


def _read_json_index(path: Path) -> dict | None:
    """A saved index as a dict, or None when absent, unreadable or not ours."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return data if (data.get("format"), data.get("version")) == (INDEX_FORMAT, INDEX_VERSION) else None


@dataclass
class _Saved:
    """A previous scan's index file: where it is, its content, and its verdicts by relative path."""

    path: Path | None = None
    content: dict | None = None
    verdicts: dict[str, tuple[int, int, bool, str]] = field(default_factory=dict)  # size, mtime, ok, what


def _load_saved(root: str, max_pixels: int) -> _Saved:
    """The first saved index of ``root`` made with the same max_pixels, or an empty _Saved."""
    for path in index_locations(root):
        data = _read_json_index(path)
        if data is None or data.get("root") != root or data.get("max_pixels") != max_pixels:
            continue
        try:
            return _Saved(path, data, _saved_verdicts(data))
        except (KeyError, TypeError, ValueError):  # hand-edited or damaged: scan afresh
            continue
    return _Saved()


def _saved_verdicts(data: dict) -> dict[str, tuple[int, int, bool, str]]:
    """relpath -> (size, mtime_ns, ok, kind or reason) for every cacheable entry of a saved index."""
    f = data["files"]
    verdicts = {p: (s, m, True, k) for p, s, m, k in zip(f["path"], f["size"], f["mtime_ns"], f["kind"])}
    for s in data["skipped"]:
        if s["size"] is not None:
            verdicts[s["path"]] = (s["size"], s["mtime_ns"], False, s["reason"])
    return verdicts


def _to_json(index: Index) -> dict:
    """The index file's content; paths relative to root, kept files as parallel columns."""
    rel = functools.partial(_relative, root=index.root)
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
    }


def _from_json(data: dict, index_path: Path) -> Index:
    """An Index from a saved index file, trusted as written (no rescan)."""
    root, f = data["root"], data["files"]
    files = [os.path.join(root, p) for p in f["path"]]
    stamps = {p: (s, m) for p, s, m in zip(files, f["size"], f["mtime_ns"])}
    skipped = [(os.path.join(root, s["path"]), s["reason"]) for s in data["skipped"]]
    stamps.update({p: (s["size"], s["mtime_ns"]) for p, s in zip((p for p, _ in skipped), data["skipped"])
                   if s.get("size") is not None})
    report = report_path_for(index_path)
    return Index(root=root, files=files, labels=list(f["label"]), classes=list(data["classes"]),
                 skipped=skipped, kinds=list(f["kind"]), index_path=str(index_path),
                 report_path=str(report) if report.exists() else None, reused=len(files),
                 max_pixels=data["max_pixels"], stamps=stamps)


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
    text = json.dumps(_to_json(index), separators=(",", ":"))
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


# ------------------------------------------------------------------------------ public entry points


def build_index(root: str | os.PathLike, workers: int = 0, cache: bool = True, progress: bool = True,
                max_pixels: int = MAX_PIXELS) -> Index:
    """Scan ``root`` (class tree or flat folder), decode every candidate, return the Index.

    workers: decoding processes, 0 = all usable cores. cache: reuse verdicts of a previous scan for
    files whose (size, mtime) did not change, and save the index and report (see save_index).
    progress: a throttled progress line on stderr. max_pixels: larger images are skipped.
    Raises DatasetError for a missing folder or one without a single decodable image.
    Worker processes are spawned (never forked, so a caller's CUDA/DALI threads are safe); as with
    any spawn, a script calling this with workers != 1 needs an ``if __name__ == "__main__":`` guard.
    """
    root = _check_folder(root)
    if progress:  # listing and stat'ing a million files on network storage takes a while
        print(f"indexing {root}: listing files", file=sys.stderr, flush=True)
    classes, candidates, skipped = _list_candidates(root)
    if not candidates:
        raise DatasetError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in {root}")
    saved = _load_saved(root, max_pixels) if cache else _Saved()
    stamps = {path: _stamp(path) for path, _ in candidates}
    verdicts, todo = _reuse_verdicts(root, stamps, saved.verdicts)
    meter = _Progress(len(todo), f"checking images in {root}", progress)
    verdicts.update(zip(todo, _check_all(todo, max_pixels, workers, meter)))
    index = _assemble(root, classes, candidates, skipped, verdicts, stamps)
    index.checked, index.max_pixels = len(todo), max_pixels
    index.reused = sum(stamp is not None for stamp in stamps.values()) - len(todo)
    if cache:
        _save_if_changed(index, saved)
    if not index.files:
        where = f"; see {index.report_path}" if index.report_path else ""
        raise DatasetError(f"no decodable images in {root}: {len(index.skipped)} files skipped{where}")
    return index


def _check_folder(root: str | os.PathLike) -> str:
    """The absolute folder, or a DatasetError naming what is wrong with it."""
    path = os.path.abspath(os.fspath(root))
    if not os.path.exists(path):
        raise DatasetError(f"dataset folder not found: {path}")
    if not os.path.isdir(path):
        raise DatasetError(f"not a folder: {path}")
    return path


def _reuse_verdicts(root: str, stamps: dict, known: dict) -> tuple[dict[str, tuple[bool, str]], list[str]]:
    """Split files into verdicts taken from the cache and paths that must be decoded now."""
    verdicts, todo = {}, []
    for path, stamp in stamps.items():
        entry = known.get(_relative(path, root))
        if stamp is None:
            verdicts[path] = (False, "missing: cannot stat the file (broken link?)")
        elif entry is not None and entry[:2] == stamp and not _transient(entry[3]):
            verdicts[path] = entry[2:]
        else:
            todo.append(path)
    return verdicts, todo


def _transient(reason: str) -> bool:
    return _reason_category(reason) in TRANSIENT_REASONS


def _assemble(root, classes, candidates, layout_skips, verdicts, stamps) -> Index:
    """Index in candidate (ImageFolder) order; stamps kept only for verdicts worth caching."""
    index = Index(root=root, files=[], labels=[], classes=classes, skipped=list(layout_skips))
    for path, label in candidates:
        ok, what = verdicts[path]
        if ok:
            index.files.append(path)
            index.labels.append(label)
            index.kinds.append(what)
        else:
            index.skipped.append((path, what))
        if stamps[path] is not None and (ok or not _transient(what)):
            index.stamps[path] = stamps[path]
    return index


def _save_if_changed(index: Index, saved: _Saved) -> None:
    """Write index and report unless the saved ones already say exactly this (a second scan)."""
    report = report_path_for(saved.path) if saved.path else None
    if saved.content == _to_json(index) and report.exists():
        index.index_path, index.report_path = str(saved.path), str(report)
    else:
        save_index(index)


def load_index(path_or_root: str | os.PathLike, **build_kwargs) -> Index:
    """An Index from a saved index JSON (as written, no rescan) or a folder (build_index, cached).

    A rank of a distributed job can load the JSON that rank 0 wrote instead of scanning again.
    """
    path = Path(path_or_root)
    if path.is_file():
        data = _read_json_index(path)
        if data is None:
            raise DatasetError(f"not a byol_fast index file (or another version): {path}")
        return _from_json(data, path.absolute())
    return build_index(path, **build_kwargs)


def checked_index(path: str | os.PathLike, info, workers: int = 0) -> Index:
    """The index of ``path`` for one process of a distributed run (``info``: byol_fast.dist.DistInfo):
    rank 0 scans or refreshes it, every other rank waits and then reads the result, so the images
    are decoded once, not once per process."""
    from . import dist

    if info.is_main:
        index = load_index(path, workers=workers, progress=True)
    dist.barrier()
    if not info.is_main:
        index = load_index(path, progress=False)
    if index.skipped and info.is_main:
        print(f"index: {len(index.files)} images, {len(index.skipped)} left out (see {index.report_path})", flush=True)
    return index


# ------------------------------------------------------------------------------ demo dataset

# One texture family per class. Colours, phase, scale, position and a wobble are random per image,
# so only the geometry tells classes apart; it survives crops (textures repeat), colour jitter and
# grayscale (foreground and background differ in luminance) and flips (diagonals go both ways).
DEMO_CLASSES = (
    "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "polka_dots",
    "concentric_rings", "radial_spokes", "smooth_blobs", "crosshatch", "mosaic",
)
DEMO_MANIFEST = "demo.json"
JPEG_QUALITY = 90


def _soft_square(s: np.ndarray, sharpness: float) -> np.ndarray:
    """A sine wave pushed towards a square wave, in [0, 1]."""
    return 0.5 + 0.5 * np.tanh(sharpness * s) / np.tanh(sharpness)


def _rotated(x, y, degrees):
    a = np.deg2rad(degrees)
    return x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)


def _stripes(rng, x, y, degrees):
    u, _ = _rotated(x, y, degrees + rng.uniform(-10, 10))
    period, phase, sharpness = rng.uniform(7, 16), rng.uniform(0, 2 * np.pi), rng.uniform(1, 4)
    return _soft_square(np.sin(2 * np.pi * u / period + phase), sharpness)


def _checkerboard(rng, x, y):
    u, v = _rotated(x, y, rng.uniform(-15, 15))
    p = rng.uniform(8, 18)
    return _soft_square(np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p), 4.0)


def _polka_dots(rng, x, y):
    u, v = _rotated(x, y, rng.uniform(0, 90))
    p = rng.uniform(10, 20)
    du, dv = (u / p + rng.random()) % 1 - 0.5, (v / p + rng.random()) % 1 - 0.5
    d = np.hypot(du, dv) * p
    return np.clip(rng.uniform(0.2, 0.35) * p - d + 0.5, 0, 1)


def _rings(rng, x, y, size):
    cx, cy = rng.uniform(-0.3, 1.3, 2) * size
    return _soft_square(np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / rng.uniform(7, 15)), 3.0)


def _spokes(rng, x, y, size):
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    return _soft_square(np.sin(rng.integers(6, 14) * np.arctan2(y - cy, x - cx) + rng.uniform(0, 6.3)), 3.0)


def _blobs(rng, x, y):
    g = int(rng.integers(3, 7))
    field_ = Image.fromarray(rng.random((g, g), dtype=np.float32), mode="F")
    smooth = np.asarray(field_.resize((x.shape[1], x.shape[0]), Image.Resampling.BICUBIC))
    return _soft_square(smooth - np.median(smooth), 12.0)


def _crosshatch(rng, x, y):
    u, v = _rotated(x, y, rng.uniform(-20, 20))
    p, width = rng.uniform(10, 18), rng.uniform(0.8, 1.6)
    du, dv = ((u / p) % 1 - 0.5) * p, ((v / p) % 1 - 0.5) * p
    return np.maximum(np.exp(-du**2 / (2 * width**2)), np.exp(-dv**2 / (2 * width**2)))


def _mosaic(rng, x, y):
    b = int(rng.integers(8, 17))
    h, w = x.shape
    cells = rng.random((h // b + 2, w // b + 2))
    oy, ox = rng.integers(0, b, 2)
    return np.repeat(np.repeat(cells, b, 0), b, 1)[oy:oy + h, ox:ox + w]


def _pattern(name: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Texture ``name`` on pixel coordinates (x, y); values in [0, 1]."""
    makers = {
        "horizontal_stripes": lambda: _stripes(rng, x, y, 90),
        "vertical_stripes": lambda: _stripes(rng, x, y, 0),
        "diagonal_stripes": lambda: _stripes(rng, x, y, rng.choice([45, 135])),
        "checkerboard": lambda: _checkerboard(rng, x, y),
        "polka_dots": lambda: _polka_dots(rng, x, y),
        "concentric_rings": lambda: _rings(rng, x, y, size),
        "radial_spokes": lambda: _spokes(rng, x, y, size),
        "smooth_blobs": lambda: _blobs(rng, x, y),
        "crosshatch": lambda: _crosshatch(rng, x, y),
        "mosaic": lambda: _mosaic(rng, x, y),
    }
    return makers[name]()


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random background/foreground RGB whose luminance differs, so grayscale keeps the pattern."""
    luma = np.array(LUMA)
    while True:
        bg, fg = rng.random(3), rng.random(3)
        if abs((fg - bg) @ luma) >= 0.3:
            return bg, fg


def demo_image(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One demo image of class ``name``: uint8 array (size, size, 3)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    # A gentle wobble of the coordinates, so lines are not ruler-straight.
    amp, wave = rng.uniform(0, 2.5), rng.uniform(30, 80)
    x_w = x + amp * np.sin(2 * np.pi * y / wave + rng.uniform(0, 6.3))
    y_w = y + amp * np.sin(2 * np.pi * x / wave + rng.uniform(0, 6.3))
    p = _pattern(name, rng, x_w, y_w, size)[..., None]
    bg, fg = _two_colours(rng)
    img = bg + (fg - bg) * p
    # Uneven lighting and sensor-like noise.
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    img = img * (1 + gx * (x / size - 0.5) + gy * (y / size - 0.5))[..., None]
    img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _demo_params(num_classes, train_per_class, val_per_class, size, seed) -> dict:
    return {"generator": "byol_fast.data.make_demo_dataset", "version": 1, "num_classes": num_classes,
            "train_per_class": train_per_class, "val_per_class": val_per_class, "size": size, "seed": seed,
            "classes": list(DEMO_CLASSES[:num_classes])}


def make_demo_dataset(root: str | os.PathLike, num_classes: int = 8, train_per_class: int = 64,
                      val_per_class: int = 64, size: int = 112, seed: int = 0) -> Path:
    """Write a small synthetic ImageFolder dataset of real JPEGs; return its root.

    Layout: ``root/train/<class>/<class>_NNNN.JPEG``, ``root/val/<class>/...`` and
    ``root/demo.json`` (the parameters). Classes are texture families (DEMO_CLASSES, first
    ``num_classes``); images are ``size`` x ``size`` RGB, JPEG quality 90. Same seed, same bytes.
    Defaults: 512 train + 512 val images, about 8 MB, a couple of seconds.
    Built in a temporary sibling folder and renamed into place, so ``root`` is complete or absent.
    """
    if not 1 <= num_classes <= len(DEMO_CLASSES):
        raise DatasetError(f"num_classes must be 1..{len(DEMO_CLASSES)}, got {num_classes}")
    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"demo dataset folder already exists and is not empty: {root}")
    params = _demo_params(num_classes, train_per_class, val_per_class, size, seed)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for label, name in enumerate(params["classes"]):
                _write_demo_class(tmp / split / name, name, count, size, (seed, split_id, label))
        (tmp / DEMO_MANIFEST).write_text(json.dumps(params, indent=1) + "\n")
        if root.exists():
            root.rmdir()  # empty (checked above); rename cannot replace a folder on every platform
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_demo_class(folder: Path, name: str, count: int, size: int, key: tuple[int, int, int]) -> None:
    """``count`` JPEGs of one class; image i draws from its own seed, so subsets agree across counts."""
    folder.mkdir(parents=True)
    for i in range(count):
        rng = np.random.default_rng([*key, i])
        # Fixed quality, no EXIF, no timestamps in the file: identical bytes on every run.
        image = Image.fromarray(demo_image(name, rng, size))
        image.save(folder / f"{name}_{i:04d}.JPEG", quality=JPEG_QUALITY)


def ensure_demo_dataset(root: str | os.PathLike, **params) -> Path:
    """The demo dataset at ``root``, made (make_demo_dataset(root, **params)) only if missing.

    A folder that exists but was made with other parameters, or is not a demo dataset, is an error
    (never overwritten).
    """
    root = Path(root).absolute()
    manifest = root / DEMO_MANIFEST
    if not manifest.exists():
        try:
            return make_demo_dataset(root, **params)
        except OSError:
            if not manifest.exists():  # another process may have just finished the same rename
                raise
    wanted = _demo_params(**{**_DEMO_DEFAULTS, **params})
    found = json.loads(manifest.read_text())
    if found != wanted:
        raise DatasetError(f"{root} holds a demo dataset made with other parameters ({found}); "
                           f"delete it or choose another folder")
    return root


_DEMO_DEFAULTS = dict(num_classes=8, train_per_class=64, val_per_class=64, size=112, seed=0)


# ------------------------------------------------------------------------------ command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index", help="scan and check an image folder; write its index and report")
    idx.add_argument("data", help="ImageFolder tree (class folders) or flat folder of images")
    idx.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    idx.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="skip larger images")
    idx.add_argument("--no-cache", action="store_true", help="decode everything; write nothing")
    demo = sub.add_parser("demo", help="write the synthetic demo dataset (ImageFolder of JPEGs)")
    demo.add_argument("out", help="folder to create (train/ and val/ inside)")
    for name, default in _DEMO_DEFAULTS.items():
        demo.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a user mistake, with a one-line error)."""
    args = _parse_args(argv)
    try:
        if args.command == "index":
            if args.workers < 0:
                raise DatasetError(f"--workers must be >= 0, got {args.workers}")
            if args.max_pixels <= 0:
                raise DatasetError(f"--max-pixels must be > 0, got {args.max_pixels}")
            index = build_index(args.data, workers=args.workers, cache=not args.no_cache,
                                max_pixels=args.max_pixels)
            print(index.summary())
        else:
            params = {k: getattr(args, k) for k in _DEMO_DEFAULTS}
            root = ensure_demo_dataset(args.out, **params)
            print(f"demo dataset ready: {root} (train/ and val/, {params['num_classes']} classes)")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
