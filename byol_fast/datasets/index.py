"""Building the dataset index: the decodable images of one folder, with labels, checked once and cached.

:func:`build_index` scans an image folder into an :class:`~byol_fast.datasets.samples.Index` of
(path, label) (the class itself lives in ``byol_fast.datasets.samples``); :func:`load_index` reads a
saved index file or builds one, and :func:`checked_index` does it once per distributed run (rank 0
scans, the other ranks read the result). Every file is decoded on the CPU
(byol_fast.datasets.image_check: DALI cannot skip a sample, docs/reference.md section 3); files
that fail are left out and listed, with the reason, in a report next to the index. The index is
cached (byol_fast.datasets.index_file) and a later scan decodes only files whose size or
modification time changed.

Layouts (the same rules as ``torchvision.datasets.ImageFolder``, so labels agree with it):

- ImageFolder tree ``root/<class>/**/<image>``: classes are the sorted names of all sub-folders of
  ``root`` (empty ones included, so a class keeps its label when one split lacks it); files sorted
  as ImageFolder sorts them. Image files directly under ``root`` are not in a class and are listed
  as skipped.
- Flat folder of images (no sub-folders): ``classes`` is empty and every label is ``-1``
  (unlabelled). Pretraining ignores labels; linear evaluation needs a class tree, or:
- Flat folder with a label file (ImageNet's validation split as downloaded): the ILSVRC2012
  devkit's ground truth, Kaggle's ``LOC_val_solution.csv`` or an mmpretrain annotation list, found
  beside the folder or named by ``labels`` (byol_fast.datasets.label_files); ``classes`` are those
  of the ``train/`` beside it, and every image must be listed. The index records the label file,
  and a later scan reads it again.

Candidate files are those with torchvision's image extensions (case-insensitive); other files are
ignored silently, as ImageFolder ignores them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from byol_fast.datasets import label_files
from byol_fast.datasets.image_check import MAX_PIXELS, check_all, reason_category
from byol_fast.datasets.index_file import (
    Saved,
    load_saved,
    read_index_json,
    recorded_labels,
    relative,
    report_path_for,
    save_if_changed,
)
from byol_fast.datasets.samples import Index
from byol_fast.errors import DatasetError
from byol_fast.runtime import dist
from byol_fast.runtime.progress import Progress

# torchvision.datasets.folder.IMG_EXTENSIONS: the same candidates, so our list matches ImageFolder's.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Reasons that depend on something other than the file's bytes (permissions, a link's target):
# never cached, checked again on every scan.
TRANSIENT_REASONS = ("unreadable", "missing")


# ------------------------------------------------------------------------------ scanning the tree


def _is_candidate(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _list_candidates(root: str) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """Walk ``root`` like ImageFolder: (classes, [(path, label)], [(path, reason)] for layout skips)."""
    entries = _sorted_entries(root)
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


def _sorted_entries(root: str) -> list[os.DirEntry]:
    try:
        with os.scandir(root) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot list dataset folder {root}: {e.strerror}") from e


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
                max_pixels: int = MAX_PIXELS, labels: str | os.PathLike | None = None) -> Index:
    """Scan ``root`` (class tree or flat folder), decode every candidate, return the Index.

    workers: decoding processes, 0 = all usable cores. cache: reuse verdicts of a previous scan for
    files whose (size, mtime) did not change, and save the index and report (see
    byol_fast.datasets.index_file.save_index).
    progress: a throttled progress line on stderr. max_pixels: larger images are skipped.
    labels: a label file for a flat folder (see byol_fast.datasets.label_files.explicit); without
    one, a flat folder takes the file its saved index recorded, or one found beside it.
    Raises DatasetError for a missing folder, one without a single decodable image, or labels that
    do not fit the folder.
    Worker processes are spawned (never forked, so a caller's CUDA/DALI threads are safe); as with
    any spawn, a script calling this with workers != 1 needs an ``if __name__ == "__main__":`` guard.
    """
    root = _check_folder(root)
    if progress:  # listing and stat'ing a million files on network storage takes a while
        print(f"indexing {root}: listing files", file=sys.stderr, flush=True)
    classes, candidates, skipped = _list_candidates(root)
    if not candidates:
        raise DatasetError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in {root}")
    source = _label_source(root, classes, candidates, labels, cache)
    if source is not None:  # labelled before anything is decoded: a wrong label file stops at once
        classes, paths = _class_folders(source), [p for p, _ in candidates]
        candidates = list(zip(paths, label_files.assign(source, root, paths, classes)))
    saved = load_saved(root, max_pixels) if cache else Saved()
    stamps = {path: _stamp(path) for path, _ in candidates}
    verdicts, todo = _reuse_verdicts(root, stamps, saved.verdicts)
    meter = Progress(len(todo), f"checking images in {root}", progress)
    verdicts.update(zip(todo, check_all(todo, max_pixels, workers, meter)))
    index = _assemble(root, classes, candidates, skipped, verdicts, stamps)
    index.checked, index.max_pixels = len(todo), max_pixels
    index.labels_from = source.record() if source is not None else None
    index.reused = sum(stamp is not None for stamp in stamps.values()) - len(todo)
    if cache:
        save_if_changed(index, saved)
    if not index.files:
        where = f"; see {index.report_path}" if index.report_path else ""
        raise DatasetError(f"no decodable images in {root}: {len(index.skipped)} files skipped{where}")
    return index


def _label_source(root: str, classes: list[str], candidates: list[tuple[str, int]],
                  labels: str | os.PathLike | None, cache: bool) -> label_files.LabelSource | None:
    """Where a flat folder's labels come from: the file named by ``labels``, else the one its saved
    index recorded (while it is there), else one found beside the folder; None for a class tree."""
    if classes:
        if labels is not None:
            raise DatasetError(f"{root} has class folders, which are its labels; a label file "
                               f"({os.fspath(labels)}) is for a flat folder of images")
        return None
    if labels is not None:
        return label_files.explicit(labels, root)
    recorded = label_files.LabelSource.from_record(recorded_labels(root)) if cache else None
    if recorded is not None and recorded.present():
        return recorded
    found = label_files.detect(root, [os.path.basename(p) for p, _ in candidates])
    if found is None and recorded is not None:
        raise DatasetError(f"{root}: its index took the labels from {recorded.files[0]}, which is gone; "
                           f"name the label file again (python -m byol_fast.data index {root} --labels FILE)")
    return found


def _class_folders(source: label_files.LabelSource) -> list[str]:
    """The classes a label file's synsets or indices refer to: the class-folder names of the train
    split beside the folder, sorted (the order of its own index, so that labels agree)."""
    folder = source.classes_from
    classes = [e.name for e in _sorted_entries(folder) if e.is_dir()] if os.path.isdir(folder) else []
    if not classes:
        raise DatasetError(f"{source.files[0]}: its labels need the class folders of {folder}, "
                           "and there are none (the classes of a label file are those of train/)")
    return classes


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
                 max_pixels=data["max_pixels"], stamps=stamps, labels_from=data.get("labels_from"))


def checked_index(path: str | os.PathLike, info, workers: int = 0) -> Index:
    """The index of ``path`` for one process of a distributed run (``info``: byol_fast.runtime.dist.DistInfo):
    rank 0 scans or refreshes it, every other rank waits and then reads the result, so the images
    are decoded once, not once per process."""
    index = dist.main_first(lambda: load_index(path, workers=workers, progress=True),
                            lambda: load_index(path, progress=False), (DatasetError, FileNotFoundError))
    if index.skipped and info.is_main:
        print(f"index: {len(index.files)} images, {len(index.skipped)} left out (see {index.report_path})", flush=True)
    return index
