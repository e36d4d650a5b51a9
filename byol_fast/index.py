"""The dataset index: the decodable images of one folder, with labels, checked once and cached.

An image folder is scanned once into an :class:`Index` of (path, label); every file is decoded on
the CPU (byol_fast.image_check: DALI cannot skip a sample, byol_fast/REFERENCE.md section 3);
files that fail are left out and listed, with the reason, in a report next to the index. The index
is cached (byol_fast.index_file) and a later scan decodes only files whose size or modification
time changed.

Layouts (the same rules as ``torchvision.datasets.ImageFolder``, so labels agree with it):

- ImageFolder tree ``root/<class>/**/<image>``: classes are the sorted names of all sub-folders of
  ``root`` (empty ones included, so a class keeps its label when one split lacks it); files sorted
  as ImageFolder sorts them. Image files directly under ``root`` are not in a class and are listed
  as skipped.
- Flat folder of images (no sub-folders): ``classes`` is empty and every label is ``-1``
  (unlabelled). Pretraining ignores labels; linear evaluation needs a class tree.

Candidate files are those with torchvision's image extensions (case-insensitive); other files are
ignored silently, as ImageFolder ignores them.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .image_check import MAX_PIXELS, Progress, check_all, reason_category
from .index_file import Saved, load_saved, read_index_json, relative, report_path_for, save_if_changed


class DatasetError(ValueError):
    """A dataset the index cannot use (missing, empty, wrong layout); the message names the folder."""


# torchvision.datasets.folder.IMG_EXTENSIONS: the same candidates, so our list matches ImageFolder's.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Reasons that depend on something other than the file's bytes (permissions, a link's target):
# never cached, checked again on every scan.
TRANSIENT_REASONS = ("unreadable", "missing")


# ------------------------------------------------------------------------------ the index


class LabelledSamples:
    """What an image folder's :class:`Index` and a shard set (``byol_fast.shard_set.ShardSet``) share:
    samples with ``labels`` (``-1`` when unlabelled) and ``classes``, and seeded subsets of them.
    A subclass says how to keep a subset (``_subset``)."""

    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def labelled_fraction(self, fraction: float, seed: int) -> list[int]:
        """The positions of a seeded, class-balanced sample: round(fraction x images) of every class (at
        least one), in this index's order (the semi-supervised protocol's labelled subset)."""
        import numpy as np

        rng, keep, labels = np.random.default_rng(seed), [], np.asarray(self.labels)
        for label in range(self.num_classes):
            members = np.flatnonzero(labels == label)
            if len(members):
                n = max(1, round(fraction * len(members)))
                keep += rng.choice(members, min(n, len(members)), replace=False).tolist()
        return sorted(keep)

    def held_out(self, labelled: list[int], n: int, seed: int) -> tuple[list[int], list[int]]:
        """``(labelled, held)`` positions: ``n`` samples set aside as a local validation split (the BYOL
        paper picks its evaluation hyper-parameters on 10,009 ImageNet training images), drawn at random
        (seeded) from the samples outside ``labelled``, so that the labelled subset stays what it is;
        when those are fewer than ``n``, all of them and the rest drawn from ``labelled`` (taken out of
        it), never its last image of a class. A ValueError says why when ``n`` cannot be held out."""
        import numpy as np

        if not 0 < n < len(self.labels):
            raise ValueError(f"{n} held-out images of {len(self.labels)}: hold out at least one and leave some to train on")
        rng = np.random.default_rng([seed, 1])  # not the labelled subset's draw
        chosen = set(labelled)
        rest = [i for i in range(len(self.labels)) if i not in chosen]
        if len(rest) >= n:
            return sorted(labelled), sorted(rng.choice(rest, n, replace=False).tolist())
        left = Counter(self.labels[i] for i in chosen)
        taken = []
        for i in rng.permutation(sorted(chosen)).tolist():
            if len(rest) + len(taken) == n:
                break
            if left[self.labels[i]] > 1:
                left[self.labels[i]] -= 1
                taken.append(i)
        if len(rest) + len(taken) < n:
            raise ValueError(f"{n} held-out images of {len(self.labels)} would leave a class without a labelled "
                             f"image to train on (at most {len(rest) + len(taken)} can be held out)")
        taken_set = set(taken)
        return sorted(i for i in chosen if i not in taken_set), sorted(rest + taken)

    def take(self, positions: list[int]) -> "LabelledSamples":
        """The samples at ``positions`` (ascending), as an index of the same kind."""
        return self._subset(list(positions))

    def sample(self, n: int, seed: int) -> "LabelledSamples":
        """An index of ``n`` of these files drawn at random (seeded), kept in this index's order;
        the whole index when ``n`` is 0 or not smaller."""
        if not 0 < n < len(self.labels):
            return self
        import numpy as np

        return self._subset(np.sort(np.random.default_rng(seed).choice(len(self.labels), n, replace=False)).tolist())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """True for a class tree; False for a flat folder (labels all -1)."""
        return bool(self.classes)

    def _subset(self, keep: list[int]) -> "LabelledSamples":
        raise NotImplementedError


@dataclass
class Index(LabelledSamples):
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

    def named(self, names: list[str], source: str) -> list[int]:
        """The positions of the files whose base names are ``names`` (a published subset list, e.g. ImageNet's 1% split);
        a DatasetError naming the first name that is not in this index, or that names several files."""
        where: dict[str, list[int]] = {}
        for i, f in enumerate(self.files):
            where.setdefault(os.path.basename(f), []).append(i)
        missing = [n for n in names if n not in where]
        if missing:
            raise DatasetError(f"{source}: {len(missing)} listed images are not in {self.root} (e.g. {missing[0]})")
        several = [n for n in names if len(where[n]) > 1]
        if several:
            raise DatasetError(f"{source}: {several[0]} names {len(where[several[0]])} files of {self.root}")
        return sorted({where[n][0] for n in names})

    def _subset(self, keep: list[int]) -> "Index":
        return dataclasses.replace(self, files=[self.files[i] for i in keep], labels=[self.labels[i] for i in keep],
                                   kinds=[self.kinds[i] for i in keep] if self.kinds else [])

    def skip_counts(self) -> Counter:
        """Number of skipped entries per reason category."""
        return Counter(reason_category(reason) for _, reason in self.skipped)

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


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, following links; None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------------------ public entry points


def build_index(root: str | os.PathLike, workers: int = 0, cache: bool = True, progress: bool = True,
                max_pixels: int = MAX_PIXELS) -> Index:
    """Scan ``root`` (class tree or flat folder), decode every candidate, return the Index.

    workers: decoding processes, 0 = all usable cores. cache: reuse verdicts of a previous scan for
    files whose (size, mtime) did not change, and save the index and report (see
    byol_fast.index_file.save_index).
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
    saved = load_saved(root, max_pixels) if cache else Saved()
    stamps = {path: _stamp(path) for path, _ in candidates}
    verdicts, todo = _reuse_verdicts(root, stamps, saved.verdicts)
    meter = Progress(len(todo), f"checking images in {root}", progress)
    verdicts.update(zip(todo, check_all(todo, max_pixels, workers, meter)))
    index = _assemble(root, classes, candidates, skipped, verdicts, stamps)
    index.checked, index.max_pixels = len(todo), max_pixels
    index.reused = sum(stamp is not None for stamp in stamps.values()) - len(todo)
    if cache:
        save_if_changed(index, saved)
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
        entry = known.get(relative(path, root))
        if stamp is None:
            verdicts[path] = (False, "missing: cannot stat the file (broken link?)")
        elif entry is not None and entry[:2] == stamp and not _transient(entry[3]):
            verdicts[path] = entry[2:]
        else:
            todo.append(path)
    return verdicts, todo


def _transient(reason: str) -> bool:
    return reason_category(reason) in TRANSIENT_REASONS


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


def load_index(path_or_root: str | os.PathLike, **build_kwargs) -> Index:
    """An Index from a saved index JSON (as written, no rescan) or a folder (build_index, cached).

    A rank of a distributed job can load the JSON that rank 0 wrote instead of scanning again.
    """
    path = Path(path_or_root)
    if path.is_file():
        data = read_index_json(path)
        if data is None:
            raise DatasetError(f"not a byol_fast index file (or another version): {path}")
        return _from_json(data, path.absolute())
    return build_index(path, **build_kwargs)


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


def checked_index(path: str | os.PathLike, info, workers: int = 0) -> Index:
    """The index of ``path`` for one process of a distributed run (``info``: byol_fast.dist.DistInfo):
    rank 0 scans or refreshes it, every other rank waits and then reads the result, so the images
    are decoded once, not once per process."""
    from . import dist

    index = dist.main_first(lambda: load_index(path, workers=workers, progress=True),
                            lambda: load_index(path, progress=False), (DatasetError, FileNotFoundError))
    if index.skipped and info.is_main:
        print(f"index: {len(index.files)} images, {len(index.skipped)} left out (see {index.report_path})", flush=True)
    return index
