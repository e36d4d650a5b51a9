"""A packed shard set (``byol_fast.datasets.shard_pack``), opened for reading and checked before
training.

``open_shard_set(path)`` takes a folder or an ``s3://bucket/prefix`` holding ``manifest.json``, its
tars and their index files, and returns a :class:`ShardSet`: the labels and classes (an image
folder's :class:`byol_fast.datasets.samples.Index` offers the same), and the
:class:`pipelines.shards.ShardSamples` the DALI loaders read. Before anything trains it checks, and
stops with one line naming the shard:

- the manifest: present, read bounded (byol_fast.datasets.untrusted: 256 MB, nested 32 deep at
  most), of this format, every field of its type, every tar and index file named by a path inside
  the set's folder, no tar listed twice, its counts adding up;
- each tar: present, of the size the manifest records (a truncated tar is refused), its first and
  last sample's tar headers intact and naming what the index file says, and its first and last images
  the bytes packed (sha256; a tar replaced by another of the same layout is refused);
- each index file: present, at most 64 MB, the one the manifest records (sha256: a stale or edited
  one is refused), every sample with one image and its ``.cls`` label, each member named
  ``<key>.<ext>`` and inside the tar;
- the folder: no tar that the manifest does not list.

Rank 0 checks; the others open the set after it
(``byol_fast.datasets.open_dataset.checked_dataset``), and an error on rank 0 is raised on every
rank. What these checks cannot see without reading every byte (an image damaged in the middle of a
tar of the right size) :func:`verify` finds (``python -m byol_fast.data verify``): every tar's
sha256 against the manifest, every label member against the manifest's labels.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from byol_fast.datasets import object_store as store
from byol_fast.datasets.samples import LabelledSamples
from byol_fast.datasets.shard_pack import FORMAT, LABEL_EXT, MANIFEST, VERSION
from byol_fast.datasets.untrusted import MAX_JSON_BYTES, join_inside, parse_json
from byol_fast.errors import DatasetError
from pipelines.shards import IMAGE_EXTS, ShardSamples

_BLOCK = 512
_EXT_ID = {e: i for i, e in enumerate(IMAGE_EXTS)}
_THREADS = 16  # parallel requests when checking many shards on object storage
_MAX_INDEX_FILE_BYTES = 64 * 2**20  # a 1 GB shard of small images lists about 10,000 samples: 1 MB
# What each shard entry of a manifest holds, and its type.
_ENTRY_TYPES = {"tar": str, "index": str, "samples": int, "bytes": int, "sha256": str, "index_sha256": str,
                "edge_sha256": str, "labels": list}


def is_shard_set(path) -> bool:
    """True for a folder or ``s3://`` prefix holding a shard-set manifest (a ``manifest.json`` of
    another kind, as some downloaded image folders hold, does not count)."""
    where = store.join(path, MANIFEST)
    if store.is_s3(path):
        return store.size(where) is not None
    if not os.path.isfile(where):
        return False
    try:
        with open(where, "rb") as f:
            manifest = parse_json(f.read(MAX_JSON_BYTES + 1), where)
    except (OSError, DatasetError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


@dataclass
class ShardSet(LabelledSamples):
    """The samples of a shard set: ``labels`` per sample (packed order), ``classes``, ``root`` (folder or
    URL), ``samples`` (where each image lies, for the DALI reader) and the ``manifest``."""

    root: str
    labels: list[int]
    classes: list[str]
    samples: ShardSamples
    manifest: dict = field(repr=False)

    def _subset(self, keep: list[int]) -> "ShardSet":
        return ShardSet(self.root, [self.labels[i] for i in keep], self.classes, self.samples.subset(keep),
                        self.manifest)

    def named(self, names: list[str], source: str) -> list[int]:
        raise DatasetError(f"{source}: a subset list names image files, and the shard set {self.root} keeps no "
                           "file names: use --label-fraction, or the image folder")

    def summary(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "unlabelled"
        return f"shard set {self.root}: {len(self.labels)} images in {len(self.manifest['shards'])} shards, {classes}"


def _fail(where: str, what: str) -> DatasetError:
    return DatasetError(f"{where}: {what}")


def read_manifest(root: str) -> dict:
    path = store.join(root, MANIFEST)
    raw = store.read_if_there(path, 0, MAX_JSON_BYTES + 1)
    if raw is None:
        raise _fail(path, "missing: not a shard set, or its packing did not finish "
                          "(python -m byol_fast.data shards SRC OUT writes it last)")
    manifest = parse_json(raw, path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise _fail(path, f"not a manifest of this byol_fast version ({FORMAT!r}, version {VERSION})")
    shards, classes = manifest.get("shards"), manifest.get("classes", [])
    if not shards or not isinstance(shards, list):
        raise _fail(path, "lists no shards")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise _fail(path, "classes: expected a list of class names")
    for n, s in enumerate(shards):
        if not isinstance(s, dict) or any(not isinstance(s.get(k), t) or isinstance(s.get(k), bool)
                                          for k, t in _ENTRY_TYPES.items()):
            raise _fail(path, f"shards[{n}]: expected {{{', '.join(f'{k}: {t.__name__}' for k, t in _ENTRY_TYPES.items())}}}")
        if not all(isinstance(y, int) and not isinstance(y, bool) for y in s["labels"]):
            raise _fail(path, f"{s['tar']}: labels must be whole numbers")
        if len(s["labels"]) != s["samples"]:
            raise _fail(path, f"{s['tar']}: {len(s['labels'])} labels for {s['samples']} samples")
    for key in ("tar", "index"):
        join_inside(root, [s[key] for s in shards], path, f"shards.{key}")
    names = [s["tar"] for s in shards]
    if len(set(names)) != len(names):
        raise _fail(path, f"{next(t for t in names if names.count(t) > 1)} is listed twice")
    if sum(s["samples"] for s in shards) != manifest.get("num_samples"):
        raise _fail(path, "the shards' sample counts do not add up to num_samples")
    return manifest


def parse_index(text: str, where: str, tar_bytes: int) -> list[dict[str, tuple[int, int, str]]]:
    """A DALI webdataset index file -> per sample {ext: (offset, size, member name)}; a DatasetError
    naming ``where`` for a malformed line, a sample without exactly one image and one label, or a
    member outside the tar."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise _fail(where, "not a DALI webdataset index file (first line 'v1.2 <samples>')")
    if int(head[1]) != len(lines) - 1:
        raise _fail(where, f"says {head[1]} samples but lists {len(lines) - 1}")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise _fail(where, f"line {n}: expected '<ext> <offset> <size> <name>' per member")
        members, key = {}, parts[3].partition(".")[0]
        for ext, offset, size, name in zip(*[iter(parts)] * 4):
            if not (offset.isdigit() and size.isdigit()):
                raise _fail(where, f"line {n}: offset and size must be numbers")
            if name != f"{key}.{ext}" or ext in members:
                raise _fail(where, f"line {n}: member {name[:100]!r} is not {key}.<ext>, one per extension "
                                   "(byol_fast.datasets.shard_pack names them so)")
            o, z = int(offset), int(size)
            if o % _BLOCK or o + z > tar_bytes:
                raise _fail(where, f"line {n}: {name} lies outside the tar ({o}+{z} of {tar_bytes} bytes)")
            members[ext] = (o, z, name)
        images = [e for e in members if e in _EXT_ID]
        if not key.isdigit():
            raise _fail(where, f"line {n}: sample key {key!r} is not a number (byol_fast.datasets.shard_pack numbers them)")
        if LABEL_EXT not in members:
            raise _fail(where, f"sample {key} has no .{LABEL_EXT} label")
        if len(images) != 1:
            raise _fail(where, f"sample {key} has {len(images)} images ({', '.join(members)}), not one")
        out.append(members)
    return out


def _check_sample(tar_path: str, members: dict[str, tuple[int, int, str]], where: str) -> bytes:
    """Read one sample's members (headers and data: one request) and check that the tar header in
    front of each is intact and names it with its size; return its image's bytes."""
    start = min(o for o, _, _ in members.values()) - _BLOCK
    raw = store.read(tar_path, start, max(o + z for o, z, _ in members.values()) - start)
    for offset, size, name in members.values():
        try:
            info = tarfile.TarInfo.frombuf(raw[offset - _BLOCK - start:offset - start], "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise _fail(where, f"damaged: no valid tar header before {name} ({e}); pack it again") from None
        if info.name != name or info.size != size:
            raise _fail(where, f"does not match its index file at {name} (the tar has {info.name}, {info.size} "
                               "bytes): a stale index file or a replaced tar")
    offset, size, _ = next(m for e, m in members.items() if e in _EXT_ID)
    return raw[offset - start:offset - start + size]


def _open_shard(root: str, entry: dict, check_headers: bool) -> list[dict]:
    tar_path, idx_path = store.join(root, entry["tar"]), store.join(root, entry["index"])
    size = store.size(tar_path)
    if size is None:
        raise _fail(tar_path, "missing (the manifest lists it)")
    if size != entry["bytes"]:
        raise _fail(tar_path, f"{size} bytes, the manifest says {entry['bytes']}: truncated or replaced; pack it again")
    raw = store.read_if_there(idx_path, 0, _MAX_INDEX_FILE_BYTES + 1)
    if raw is None:
        raise _fail(idx_path, f"missing: the index file of {entry['tar']} (DALI's wds2idx writes one)")
    if len(raw) > _MAX_INDEX_FILE_BYTES:
        raise _fail(idx_path, f"larger than {_MAX_INDEX_FILE_BYTES // 2**20} MB, too large for a shard's index file")
    samples = parse_index(raw.decode("utf-8", "replace"), idx_path, size)  # what is wrong, where it can say
    if hashlib.sha256(raw).hexdigest() != entry["index_sha256"]:
        raise _fail(idx_path, f"not the index file the manifest records for {entry['tar']} (stale or edited)")
    if len(samples) != entry["samples"]:
        raise _fail(idx_path, f"{len(samples)} samples, the manifest says {entry['samples']}")
    if check_headers:
        edges = hashlib.sha256()
        for members in (samples[0], samples[-1]) if len(samples) > 1 else samples[:1]:
            edges.update(_check_sample(tar_path, members, tar_path))
        if edges.hexdigest() != entry["edge_sha256"]:
            raise _fail(tar_path, "its first and last images differ from those packed (sha256): a replaced or "
                                  "damaged tar; pack it again")
    return samples


def _root(root) -> str:
    return str(root).rstrip("/") if store.is_s3(root) else str(root)


def _checked_manifest(root: str) -> dict:
    """The manifest, checked, and no tar in the folder that it does not list."""
    manifest = read_manifest(root)
    listed = {s["tar"] for s in manifest["shards"]}
    extra = [n for n in store.listing(root, ".tar") if n not in listed]
    if extra:
        raise _fail(store.join(root, extra[0]), f"not in {MANIFEST}: the files do not match the manifest "
                                                f"({len(extra)} unlisted tars); pack again into an empty folder")
    return manifest


def open_shard_set(root: str, check_headers: bool = True) -> ShardSet:
    """Open and check the shard set at ``root`` (a folder or ``s3://bucket/prefix``); see the module
    docstring for what is checked. ``check_headers=False`` skips reading tar headers (ranks other
    than the one that checked)."""
    root = _root(root)
    manifest = _checked_manifest(root)
    with ThreadPoolExecutor(_THREADS if store.is_s3(root) else 1) as pool:
        per_shard = list(pool.map(lambda e: _open_shard(root, e, check_headers), manifest["shards"]))
    tar_of, key, ext, offset, size, labels = [], [], [], [], [], []
    for t, (entry, samples) in enumerate(zip(manifest["shards"], per_shard)):
        for members in samples:
            e = next(x for x in members if x in _EXT_ID)
            o, z, name = members[e]
            tar_of.append(t)
            key.append(int(name.partition(".")[0]))  # parse_index checked it is a number
            ext.append(_EXT_ID[e])
            offset.append(o)
            size.append(z)
        labels += [int(y) for y in entry["labels"]]
    classes = list(manifest.get("classes", []))
    if classes and not all(0 <= y < len(classes) for y in labels):
        raise _fail(store.join(root, MANIFEST), f"a label outside the {len(classes)} classes")
    samples = ShardSamples(tuple(store.join(root, s["tar"]) for s in manifest["shards"]),
                           np.asarray(tar_of, np.int32), np.asarray(key, np.int64), np.asarray(ext, np.uint8),
                           np.asarray(offset, np.int64), np.asarray(size, np.int64))
    return ShardSet(root, labels, classes, samples, manifest)


def verify(root: str, progress=None) -> int:
    """Read every byte of the shard set at ``root`` (one tar in memory at a time) after the checks of
    :func:`open_shard_set`: each tar's sha256 against the manifest, each sample's label member against
    the manifest's label. Returns the number of samples checked; a DatasetError naming the first
    shard that differs."""
    root = _root(root)
    checked = 0
    for entry in _checked_manifest(root)["shards"]:
        samples = _open_shard(root, entry, check_headers=True)
        tar_path = store.join(root, entry["tar"])
        data = store.read(tar_path)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _fail(tar_path, "its bytes differ from those packed (sha256): damaged; pack it again")
        for members, label in zip(samples, entry["labels"]):
            o, z, name = members[LABEL_EXT]
            if data[o:o + z].decode(errors="replace").strip() != str(label):
                raise _fail(tar_path, f"{name} does not hold the manifest's label {label}")
        checked += len(samples)
        if progress:
            progress(entry["tar"], checked)
    return checked
