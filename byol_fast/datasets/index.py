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
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from byol_fast.datasets import label_files
from byol_fast.datasets.image_check import MAX_PIXELS, check_all, reason_category
from byol_fast.datasets.index_file import (
    Saved,
    load_index_json,
    load_saved,
    recorded_labels,
    relative,
    report_path_for,
    save_if_changed,
)
from byol_fast.datasets.samples import Index
from byol_fast.datasets.untrusted import join_inside, leads_out, shown, utf8
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


@dataclass
class _Scan:
    """What a walk of the tree has met so far: the folders entered (by device and inode, so that no
    folder is walked twice, whatever links lead to it), the real folders a link may lead into
    (``roots``), and the entries left out with their reason."""

    root: str
    roots: list[str]
    entered: set[tuple[int, int]] = field(default_factory=set)
    skips: list[tuple[str, str]] = field(default_factory=list)

    def enter(self, path: str, entry: os.DirEntry | None = None) -> bool:
        """Mark the folder ``path`` entered; False (and reported) when it was already."""
        try:
            st = entry.stat() if entry is not None else os.stat(path)
        except OSError as e:
            self.skips.append((path, f"unreadable: cannot stat folder ({e.strerror})"))
            return False
        if (st.st_dev, st.st_ino) in self.entered:
            self.skips.append((path, f"duplicate: the folder {os.path.realpath(path)} is indexed already"))
            return False
        self.entered.add((st.st_dev, st.st_ino))
        return True

    def split(self, folder: str, entries: list[os.DirEntry]) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
        """(folders, candidate files) among ``entries``; a name that is not UTF-8 is reported once
        (its bytes escaped) and left out, with everything under it."""
        folders, files = [], []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if not is_dir and not _is_candidate(e.name):
                continue  # ignored silently, as ImageFolder ignores it
            if not utf8(e.name):
                self.skips.append((os.path.join(folder, shown(e.name)), NOT_UTF8))
            elif is_dir:
                folders.append(e)
            else:
                files.append(e)
        return folders, files


NOT_UTF8 = "not UTF-8: the name is not UTF-8 text, which DALI and the index file need; rename it"


def _list_candidates(root: str) -> tuple[list[str], list[tuple[str, int]], _Scan]:
    """Walk ``root`` like ImageFolder: (classes, [(path, label)], the scan and its layout skips).

    Links: a class folder may be a link to a folder anywhere (the usual way to assemble a subset of
    a larger dataset), but not to one inside the root or holding it; inside a class folder, links
    to folders are never followed (one inside the dataset leads to images indexed where they are,
    one outside it leaves the dataset), so no walk loops and no image is listed twice. Links to
    files are judged in :func:`_screen`."""
    scan = _Scan(root, [os.path.realpath(root)])
    scan.enter(root)
    folders, top_files = scan.split(root, _sorted_entries(root))
    classes = [e.name for e in folders]
    top_paths = [os.path.join(root, e.name) for e in top_files]
    if not classes:
        return [], [(p, -1) for p in top_paths], scan
    _refuse_split_root(root, classes)
    scan.skips += [(p, "outside class folders: images directly under the root have no class") for p in top_paths]
    walk = [e for e in folders if not e.is_symlink() and scan.enter(e.path, e)]
    walk += [e for e in folders if e.is_symlink() and _class_link(scan, e)]
    walked = {e.name for e in walk}
    candidates: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        if name not in walked:
            continue
        folder, reported = os.path.join(root, name), len(scan.skips)
        found = _walk_class(scan, folder, label)
        if not found and len(scan.skips) == reported:
            scan.skips.append((folder, "empty class folder: no image files"))
        candidates += found
    return classes, candidates, scan


def _class_link(scan: _Scan, entry: os.DirEntry) -> bool:
    """Whether the class folder ``entry``, a link, is walked: its target becomes part of the dataset
    unless it lies inside the root (those images are indexed where they are) or holds the root."""
    real, root = os.path.realpath(entry.path), scan.roots[0]
    if leads_out(entry.path, (root,)) is None:
        scan.skips.append((entry.path, f"folder link: not followed, {real} is inside the dataset and indexed there"))
        return False
    if root.startswith(os.path.join(real, "")):
        scan.skips.append((entry.path, f"outside the dataset: a link to {real}, which holds the dataset itself"))
        return False
    if not scan.enter(entry.path, entry):
        return False
    scan.roots.append(real)
    return True


def _sorted_entries(root: str) -> list[os.DirEntry]:
    try:
        with os.scandir(root) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot list dataset folder {root}: {e.strerror}") from None


def _walk_class(scan: _Scan, folder: str, label: int) -> list[tuple[str, int]]:
    """Image files under one class folder in torchvision's order (every folder's path sorted, then
    its file names), walked with os.scandir; links to folders are reported, not followed, and a
    folder that cannot be listed is reported (os.walk would drop it silently)."""
    listed, pending = [], [folder]
    while pending:
        here = pending.pop()
        try:
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as e:
            scan.skips.append((here, f"unreadable: cannot list folder ({e.strerror})"))
            continue
        folders, files = scan.split(here, entries)
        listed.append((here, sorted(e.name for e in files)))
        for e in folders:
            if not e.is_symlink():
                if scan.enter(e.path, e):
                    pending.append(e.path)
                continue
            real = leads_out(e.path, tuple(scan.roots))
            scan.skips.append((e.path, f"outside the dataset: a link to {real}, outside {scan.root}" if real else
                               f"folder link: not followed, {os.path.realpath(e.path)} is indexed where it is"))
    return [(os.path.join(d, n), label) for d, names in sorted(listed) for n in names]


def _refuse_split_root(root: str, classes: list[str]) -> None:
    """Stop on DATA holding train/ and val/: their names would silently become two 'classes'."""
    if set(classes) <= {"train", "val", "validation", "test"}:
        raise DatasetError(
            f"{root} holds dataset splits ({', '.join(classes)}), not classes: "
            f"pass one split, e.g. {os.path.join(root, classes[0])}"
        )


def _screen(candidates: list[tuple[str, int]], scan: _Scan) -> tuple[dict, dict[str, tuple[bool, str]]]:
    """(size, mtime_ns) of every candidate, following links (None when it cannot be stat'ed), and the
    verdicts of those left out before any decoding: a file that is not a regular one (a FIFO would
    block the decoder), the same file (device and inode) as one listed before it, by a link or a hard
    link (each image counts once). A link to a file may lead anywhere: datasets are often subsets
    made of links into a shared copy, and reading a file is all that is done with it."""
    stamps, verdicts, first = {}, {}, {}
    for path, _ in candidates:
        stamps[path] = None  # kept for a file worth decoding (or caching) only
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            verdicts[path] = (False, "not a regular file: a folder, FIFO, device or socket is never read")
        elif (st.st_dev, st.st_ino) in first:
            verdicts[path] = (False, f"duplicate: the same file as {first[st.st_dev, st.st_ino]}")
        else:
            first[st.st_dev, st.st_ino] = path
            stamps[path] = st.st_size, st.st_mtime_ns
    return stamps, verdicts


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
    classes, candidates, scan = _list_candidates(root)
    if not candidates:
        raise DatasetError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in {root}")
    source = _label_source(root, classes, candidates, labels, cache)
    if source is not None:  # labelled before anything is decoded: a wrong label file stops at once
        classes, paths = _class_folders(source), [p for p, _ in candidates]
        candidates = list(zip(paths, label_files.assign(source, root, paths, classes)))
    saved = load_saved(root, max_pixels) if cache else Saved()
    stamps, screened = _screen(candidates, scan)
    verdicts, todo = _reuse_verdicts(root, stamps, saved.verdicts, screened)
    meter = Progress(len(todo), f"checking images in {root}", progress)
    verdicts.update(zip(todo, check_all(todo, max_pixels, workers, meter)))
    index = _assemble(root, classes, candidates, scan.skips, verdicts, stamps)
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
    classes = [e.name for e in _sorted_entries(folder) if e.is_dir() and utf8(e.name)] if os.path.isdir(folder) else []
    if not classes:
        raise DatasetError(f"{source.files[0]}: its labels need the class folders of {folder}, "
                           "and there are none (the classes of a label file are those of train/)")
    return classes


def _check_folder(root: str | os.PathLike) -> str:
    """The absolute folder, or a DatasetError naming what is wrong with it."""
    path = os.path.abspath(os.fspath(root))
    if not utf8(path):
        raise DatasetError(f"dataset folder name is not UTF-8 text, which DALI needs: {shown(path)}")
    if not os.path.exists(path):
        raise DatasetError(f"dataset folder not found: {path}")
    if not os.path.isdir(path):
        raise DatasetError(f"not a folder: {path}")
    return path


def _reuse_verdicts(root: str, stamps: dict, known: dict,
                    screened: dict) -> tuple[dict[str, tuple[bool, str]], list[str]]:
    """Split files into verdicts given before decoding (``screened``), taken from the cache, and
    paths that must be decoded now."""
    verdicts, todo = dict(screened), []
    for path, stamp in stamps.items():
        entry = known.get(relative(path, root))
        if path in screened:
            continue
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

    A rank of a distributed job can load the JSON that rank 0 wrote instead of scanning again. The
    file is read bounded and checked (byol_fast.datasets.index_file.load_index_json), and every path
    in it must stay inside its root.
    """
    path = Path(path_or_root)
    if path.is_file():
        return _from_json(load_index_json(path), path.absolute())
    return build_index(path, **build_kwargs)


def _from_json(data: dict, index_path: Path) -> Index:
    """An Index from a saved index file, its verdicts trusted as written (no rescan)."""
    root, f, where = data["root"], data["files"], str(index_path)
    files = join_inside(root, f["path"], where, "files.path")
    stamps = {p: (s, m) for p, s, m in zip(files, f["size"], f["mtime_ns"])}
    skipped = list(zip(join_inside(root, [s["path"] for s in data["skipped"]], where, "skipped.path"),
                       (s["reason"] for s in data["skipped"])))
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
