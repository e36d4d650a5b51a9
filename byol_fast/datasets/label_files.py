"""Labels of a flat image folder from the files ImageNet's downloads keep them in.

The official validation split is one flat folder of 50,000 images whose labels sit in a separate
file; three forms are read here, each mapped to the classes of the ``train/`` beside the folder
(its sorted class-folder names: the synset order, so indices agree with ImageFolder's):

- ``devkit``: the ILSVRC2012 devkit's ``data/ILSVRC2012_validation_ground_truth.txt`` (line i holds
  the ILSVRC2012 ID of ``ILSVRC2012_val_<i, 8 digits>``) and ``data/meta.mat`` (a MATLAB v5 file
  whose ``synsets`` struct array maps ``ILSVRC2012_ID`` to ``WNID``), read with scipy.io.loadmat;
- ``kaggle_csv``: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the prediction
  string starts with the synset);
- ``list``: mmpretrain's annotation lists (``meta/val.txt`` or ``val_list.txt``): ``relative/path
  label`` lines, the label a class index.

:func:`detect` finds such files beside a split folder, :func:`explicit` takes one named by the
user, and :func:`assign` labels a folder's files from one, checking that every listed image is
there, that every image is listed, and that every class is one of ``train/``'s. A label file is
read whole but only up to :data:`MAX_LABEL_FILE_BYTES`; a path in a list must stay inside the
folder. Every mistake is one DatasetError naming the file (and the line).
"""
from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from dataclasses import dataclass

from byol_fast.datasets.untrusted import escapes, leads_out
from byol_fast.errors import DatasetError

# The largest label file read: ImageNet's are 0.3-3 MB (a 1.28-million-line train list about 40 MB).
MAX_LABEL_FILE_BYTES = 64 * 2**20

DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
KAGGLE_CSV = "LOC_val_solution.csv"
KAGGLE_HEADER = ["ImageId", "PredictionString"]
# Where Kaggle's download keeps the split folders, below the folder holding its CSV files.
KAGGLE_TREE = ("ILSVRC", "Data", "CLS-LOC")
# The official validation images' names: only a folder holding these takes the devkit's or Kaggle's labels.
VAL_PREFIX = "ILSVRC2012_val_"
KINDS = {"devkit": "ILSVRC2012 devkit", "kaggle_csv": "Kaggle CSV", "list": "annotation list"}


@dataclass(frozen=True)
class LabelSource:
    """Where a flat folder's labels come from: ``kind`` (a key of :data:`KINDS`), the label
    ``files`` (absolute; the devkit's ground truth, then its meta.mat), and ``classes_from``, the
    class tree whose sorted folder names are the classes."""

    kind: str
    files: tuple[str, ...]
    classes_from: str

    def record(self) -> dict:
        """What the index file keeps, so that a later load reads the same files."""
        return {"kind": self.kind, "files": list(self.files), "classes_from": self.classes_from}

    @classmethod
    def from_record(cls, record) -> LabelSource | None:
        """The source an index file recorded, or None when there is none or it is not well formed."""
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            return None
        files, classes_from = record.get("files"), record.get("classes_from")
        if not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)
                and isinstance(classes_from, str)):
            return None
        return cls(record["kind"], tuple(files), classes_from)

    def present(self) -> bool:
        return all(os.path.isfile(f) for f in self.files)


# ------------------------------------------------------------------------------ finding the files


def detect(folder: str, names: list[str]) -> LabelSource | None:
    """The label files beside the flat split ``folder`` (absolute), whose image file names are
    ``names``, or None. Looked for, first found wins: the devkit (``ILSVRC2012_devkit_t12/`` in
    the folder's parent), Kaggle's CSV (in the parent, or at the top of Kaggle's download when the
    folder sits in ``ILSVRC/Data/CLS-LOC/``), both only for a folder of ``ILSVRC2012_val_*``
    images, then an annotation list named after the folder (``meta/<name>.txt`` or
    ``<name>_list.txt`` in the parent). Only a folder with a ``train/`` beside it is labelled:
    those folder names are the classes."""
    parent, name = os.path.split(folder)
    classes_from = os.path.join(parent, "train")
    if classes_from == folder or not os.path.isdir(classes_from):
        return None  # no train/ beside it to name the classes: a folder on its own stays unlabelled
    candidates = []
    if any(n.startswith(VAL_PREFIX) for n in names):
        data = os.path.join(parent, DEVKIT, "data")
        candidates.append(("devkit", (os.path.join(data, GROUND_TRUTH), os.path.join(data, META_MAT))))
        tops = [parent] + ([os.path.dirname(os.path.dirname(os.path.dirname(parent)))]
                           if tuple(parent.split(os.sep)[-3:]) == KAGGLE_TREE else [])
        candidates += [("kaggle_csv", (os.path.join(top, KAGGLE_CSV),)) for top in tops]
    candidates += [("list", (os.path.join(parent, "meta", f"{name}.txt"),)),
                   ("list", (os.path.join(parent, f"{name}_list.txt"),))]
    for kind, files in candidates:
        if all(os.path.isfile(f) for f in files):
            return LabelSource(kind, files, classes_from)
    return None


def explicit(path: str | os.PathLike, folder: str) -> LabelSource:
    """The source of a label file named by the user (``--labels``), its kind from its name: a
    ``.csv`` is Kaggle's, the devkit's ground truth (or its meta.mat, or the devkit folder) the
    devkit's, anything else an annotation list. Classes: the ``train/`` beside ``folder``."""
    path = os.path.abspath(os.fspath(path))
    classes_from = os.path.join(os.path.dirname(folder), "train")
    if os.path.isdir(path):
        data = os.path.join(path, "data") if os.path.isdir(os.path.join(path, "data")) else path
        files = (os.path.join(data, GROUND_TRUTH), os.path.join(data, META_MAT))
        kind = "devkit"
    elif os.path.basename(path) in (GROUND_TRUTH, META_MAT):
        data = os.path.dirname(path)
        files, kind = (os.path.join(data, GROUND_TRUTH), os.path.join(data, META_MAT)), "devkit"
    else:
        files, kind = (path,), "kaggle_csv" if path.lower().endswith(".csv") else "list"
    for f in files:
        if not os.path.isfile(f):
            raise DatasetError(f"label file not found: {f}" + (f" (the devkit's, for {path})" if f != path else ""))
    return LabelSource(kind, files, classes_from)


# ------------------------------------------------------------------------------ reading them


def read_capped(path: str) -> bytes:
    """A label file's bytes; a DatasetError when it cannot be read or is over the cap."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LABEL_FILE_BYTES + 1)
    except OSError as e:
        raise DatasetError(f"cannot read label file {path}: {e.strerror}") from None
    if len(data) > MAX_LABEL_FILE_BYTES:
        raise DatasetError(f"{path}: larger than {MAX_LABEL_FILE_BYTES // 2**20} MB, too large for a label file")
    return data


def _text_lines(path: str) -> list[str]:
    try:
        return read_capped(path).decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}); is it the label file?") from None


@dataclass
class Entry:
    """One labelled image of a label file: ``key`` (a relative path, or a file name without its
    extension), its class (a synset name or a class index), the line it is on."""

    key: str
    cls: str | int
    line: int


def _kaggle_entries(path: str) -> list[Entry]:
    rows = csv.reader(_text_lines(path))
    header = next(rows, None)
    if [h.strip() for h in header or []] != KAGGLE_HEADER:
        raise DatasetError(f"{path}:1: expected the header {','.join(KAGGLE_HEADER)} (Kaggle's {KAGGLE_CSV})")
    entries = []
    for row in rows:
        line = rows.line_num
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].split():
            raise DatasetError(f"{path}:{line}: expected 'ImageId,synset ...', got {','.join(row)[:80]!r}")
        entries.append(Entry(_plain_name(row[0].strip(), path, line), row[1].split()[0], line))
    return entries


def _plain_name(name: str, path: str, line: int) -> str:
    """An image named by a label file without a folder: no separator, no '..'."""
    if "/" in name or "\\" in name or name in (".", ".."):
        raise DatasetError(f"{path}:{line}: {name!r} is not a plain image name")
    return name


def _devkit_entries(ground_truth: str, meta: str) -> list[Entry]:
    wnids = read_meta_mat(meta)
    entries = []
    for line, text in enumerate(_text_lines(ground_truth), 1):
        key = f"{VAL_PREFIX}{line:08d}"
        try:
            ilsvrc_id = int(text)
        except ValueError:
            raise DatasetError(f"{ground_truth}:{line}: expected an ILSVRC2012 ID, got {text[:40]!r}") from None
        if ilsvrc_id not in wnids:
            raise DatasetError(f"{ground_truth}:{line}: ID {ilsvrc_id} of {key} is not a synset of {meta}")
        entries.append(Entry(key, wnids[ilsvrc_id], line))
    return entries


def _list_entries(path: str) -> list[Entry]:
    entries = []
    for line, text in enumerate(_text_lines(path), 1):
        if not text.strip():
            continue
        fields = text.rsplit(None, 1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise DatasetError(f"{path}:{line}: expected 'relative/path label', got {text[:80]!r}")
        entries.append(Entry(fields[0].strip(), int(fields[1]), line))
    return entries


def read_meta_mat(path: str) -> dict[int, str]:
    """ILSVRC2012 ID -> WNID from the devkit's meta.mat (``synsets``), read as data only
    (scipy.io.loadmat) from at most :data:`MAX_LABEL_FILE_BYTES`, compressed parts included."""
    import numpy as np
    from scipy.io import loadmat

    data = read_capped(path)
    _check_expansion(data, path)
    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True, variable_names=["synsets"]).get("synsets")
    except Exception as e:  # a damaged or foreign file: one line, whatever the reader raised
        raise DatasetError(f"{path}: not a readable MATLAB v5 file ({type(e).__name__}: {e})") from None
    fields = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    if "ILSVRC2012_ID" not in fields or "WNID" not in fields:
        raise DatasetError(f"{path}: no 'synsets' struct with ILSVRC2012_ID and WNID fields "
                           "(the devkit's data/meta.mat)")
    synsets = np.atleast_1d(synsets)
    try:
        return {int(np.asarray(s["ILSVRC2012_ID"]).item()): str(np.asarray(s["WNID"]).item()) for s in synsets}
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: a synset's ILSVRC2012_ID or WNID is not a single value ({e})") from None


def _check_expansion(data: bytes, path: str) -> None:
    """Refuse a MATLAB v5 file whose compressed variables inflate past the cap (a small file may
    hold gigabytes of zeros); the variables are walked by their tags, without keeping the output."""
    order = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if order is None:
        return  # not v5: loadmat says what it is
    offset, total = 128, 0
    while offset + 8 <= len(data):
        kind, nbytes = struct.unpack(order + "II", data[offset:offset + 8])
        if kind == 15:  # miCOMPRESSED: a zlib stream of one variable
            inflater, chunk = zlib.decompressobj(), data[offset + 8:offset + 8 + nbytes]
            try:
                while chunk and total <= MAX_LABEL_FILE_BYTES:
                    total += len(inflater.decompress(chunk, 2**20))
                    chunk = inflater.unconsumed_tail
            except zlib.error as e:
                raise DatasetError(f"{path}: a compressed variable is damaged ({e})") from None
        else:
            total += min(nbytes, len(data) - offset)
        if total > MAX_LABEL_FILE_BYTES:
            raise DatasetError(f"{path}: its variables inflate to more than {MAX_LABEL_FILE_BYTES // 2**20} MB, "
                               "too large for the devkit's meta.mat")
        offset += 8 + (nbytes if kind == 15 else -(-nbytes // 8) * 8)


def entries(source: LabelSource) -> list[Entry]:
    """The labelled images a source lists, in its order."""
    if source.kind == "devkit":
        return _devkit_entries(*source.files)
    return (_kaggle_entries if source.kind == "kaggle_csv" else _list_entries)(source.files[0])


# ------------------------------------------------------------------------------ labelling a folder


def assign(source: LabelSource, root: str, files: list[str], classes: list[str]) -> list[int]:
    """The class index of each of ``files`` (absolute paths under the folder ``root``), from
    ``source``, with ``classes`` the class names its synsets or indices refer to. A DatasetError
    names the label file and the line for a path leaving ``root``, an entry listed twice, a class
    not in ``classes``, or a listed image that is not there, and the image for one not listed."""
    by_stem, where = source.kind != "list", source.files[0]
    keys = [path[len(os.path.join(root, "")):] for path in files]
    keys = [os.path.splitext(k)[0] for k in keys] if by_stem else keys
    found: dict[str, str] = {}
    for key, path in zip(keys, files):
        if key in found:
            raise DatasetError(f"{path}: {found[key]} has the same name; {where} cannot tell which it labels")
        found[key] = path
    index = {name: i for i, name in enumerate(classes)}
    labels, first_line, missing = {}, {}, []
    for e in entries(source):
        key = e.key if by_stem else _relative(e.key, where, e.line)
        if key in first_line:
            raise DatasetError(f"{where}:{e.line}: {e.key} is listed twice (first on line {first_line[key]})")
        first_line[key] = e.line
        labels[key] = _class_index(e, index, len(classes), source, where)
        if key not in found:
            missing.append(e)
        elif not by_stem:
            _refuse_link_out(found[key], root, where, e.line)
    if missing:
        more = f" ({len(missing)} listed images are missing)" if len(missing) > 1 else ""
        raise DatasetError(f"{where}:{missing[0].line}: {missing[0].key} is listed but not in {root}{more}")
    unlisted = [p for k, p in found.items() if k not in labels]
    if unlisted:
        more = f" ({len(unlisted)} images are not listed)" if len(unlisted) > 1 else ""
        raise DatasetError(f"{unlisted[0]}: not listed in {where}, so it has no label{more}")
    return [labels[k] for k in keys]


def _relative(rel: str, where: str, line: int) -> str:
    """A listed path, normalised; a DatasetError when it leaves the folder (byol_fast.datasets.untrusted.escapes)."""
    why = escapes(rel)
    if why is None:
        return os.path.normpath(rel)
    raise DatasetError(f"{where}:{line}: {rel!r} is {why}; a listed image must be inside the split folder")


def _refuse_link_out(path: str, root: str, where: str, line: int) -> None:
    """A DatasetError when the listed image ``path`` resolves, through a link, outside ``root``. Only
    a link (or a path through a sub-folder, which may be one) is resolved: a plain file is inside."""
    if os.sep not in path[len(os.path.join(root, "")):] and not os.path.islink(path):
        return
    real = leads_out(path, (os.path.realpath(root),))
    if real is not None:
        raise DatasetError(f"{where}:{line}: {os.path.basename(path)} is a link leading out of {root} "
                           f"(to {real}); a listed image must be inside the split folder")


def _class_index(e: Entry, index: dict[str, int], n: int, source: LabelSource, where: str) -> int:
    if isinstance(e.cls, int):
        if not 0 <= e.cls < n:
            raise DatasetError(f"{where}:{e.line}: {e.key} has class {e.cls}, but {source.classes_from} "
                               f"has {n} class folders (0..{n - 1})")
        return e.cls
    if e.cls not in index:
        raise DatasetError(f"{where}:{e.line}: {e.key} has synset {e.cls}, which is not a class folder "
                           f"of {source.classes_from}")
    return index[e.cls]
