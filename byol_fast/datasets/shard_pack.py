"""A dataset packed into tar shards in the WebDataset layout, as DALI's ``fn.readers.webdataset`` reads them.

On a shared filesystem every open of ImageNet's 1.28 million small files is a metadata round trip;
shards turn an epoch into a few hundred large sequential reads. :func:`pack` writes, from a dataset
index (so that only files that decode go in):

- ``shard-000000.tar`` ...: each sample is two members, ``<key>.<ext>`` (the file's original encoded
  bytes, under the extension of what it really is: a PNG named ``.JPEG`` is stored as ``.png``) and
  ``<key>.cls`` (its class index as ASCII digits, ``-1`` for a flat folder). ``key`` is the sample's
  position in the packed order, nine digits. Samples are in a seeded random order, so every shard
  mixes the classes; each shard is closed before it would exceed ``shard_bytes``. Members carry no
  timestamps, owners or permissions of the source: the same index and seed give the same bytes.
- ``shard-000000.idx`` ...: the index file DALI's reader needs (the format of DALI's ``wds2idx``:
  a ``v1.2 <samples>`` line, then per sample ``<ext> <data offset> <size> <member name>`` for each
  member), written from the offsets as the tar is written, so that the reader never scans a tar.
- ``manifest.json``, written last (a shard set without it is incomplete): the shards with their
  sample counts, sizes, sha256 digests (of the tar, of its index file, and of its first and last
  images: ``edge_sha256``, cheap to check before every run) and labels, the classes,
  and the identity of the source index (its root, file count and a fingerprint of every file's path,
  size and mtime). Readers (``byol_fast.datasets.shard_set``) check the files against it.

Shards are written to temporary names and renamed when whole, in parallel over ``workers``
threads.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from byol_fast.datasets.samples import Index
from byol_fast.errors import DatasetError
from byol_fast.runtime.progress import Progress
from pipelines.shards import IMAGE_EXTS as READER_EXTS

MANIFEST = "manifest.json"
FORMAT = "byol_fast shards"
VERSION = 1
LABEL_EXT = "cls"
# PIL's format name (an index's kind starts with it) -> the extension a sample is stored under.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "BMP": "bmp", "PPM": "ppm", "TIFF": "tiff",
              "WEBP": "webp", "JPEG2000": "jp2"}
IMAGE_EXTS = sorted(set(EXTENSIONS.values()))
assert set(IMAGE_EXTS) <= set(READER_EXTS), "every stored extension must be one the reader lists"
_TAR_BLOCK = 512


@dataclass(frozen=True)
class Sample:
    """One file going into a shard: its path, the extension it is stored under, its label, its size."""

    path: str
    ext: str
    label: int
    size: int


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KiB', '1e9' -> bytes (decimal units; KiB/MiB/GiB binary)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not 0 < value < 1e18:  # also refuses inf and nan
        raise DatasetError(f"--shard-size: {text!r} is not a size (e.g. 1GB, 500MB, 256MiB)")
    return int(value * units[unit])


def samples_of(index: Index) -> list[Sample]:
    """The index's files as samples, each under the extension of its real format, with the size the
    index recorded (stat'ed only where it recorded none)."""
    if len(index.kinds) != len(index.files):
        raise DatasetError(f"{index.index_path or index.root}: the index records no file kinds; "
                           "build it again (python -m byol_fast.data index)")
    out = []
    for path, kind, label in zip(index.files, index.kinds, index.labels):
        fmt = kind.split(":")[0]
        if fmt not in EXTENSIONS:
            raise DatasetError(f"{path}: {fmt} images cannot go into a shard (DALI reads {', '.join(EXTENSIONS)})")
        stamp = index.stamps.get(path)
        out.append(Sample(path, EXTENSIONS[fmt], int(label), stamp[0] if stamp else os.path.getsize(path)))
    return out


def _member_bytes(size: int) -> int:
    """Bytes a member of ``size`` takes in a tar: its header block and its data padded to blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def tar_bytes(members: int) -> int:
    """Size of a tar whose members take ``members`` bytes: two end-of-archive blocks, then padding
    to whole records of 20 blocks (as tarfile writes it)."""
    record = tarfile.RECORDSIZE
    return -(-(members + 2 * _TAR_BLOCK) // record) * record


def sample_bytes(s: Sample) -> int:
    """Bytes one sample takes in a tar: its image and its label, headers and padding included."""
    return _member_bytes(s.size) + _member_bytes(len(str(s.label)))


def plan(samples: list[Sample], shard_bytes: int, seed: int) -> list[list[tuple[int, Sample]]]:
    """Shards as lists of (key, sample): a seeded permutation of the samples, cut greedily so that no
    shard exceeds ``shard_bytes`` (a sample larger than that gets a shard of its own)."""
    order = np.random.default_rng(seed).permutation(len(samples))
    shards, current, used = [], [], 0
    for key, i in enumerate(order.tolist()):
        s = samples[i]
        need = sample_bytes(s)
        if current and tar_bytes(used + need) > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((key, s))
        used += need
    if current:
        shards.append(current)
    return shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> str:
    """Append one member; return its entry of DALI's index line: ``<ext> <data offset> <size> <name>``."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = len(data), 0o644, 0, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))
    offset = tar.offset - -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK  # the data ends the archive, padded to a block
    return f"{name.partition('.')[2]} {offset} {len(data)} {name}"


class _Hashing(io.RawIOBase):
    """A write-only file that passes bytes on to ``f`` and hashes them on the way."""

    def __init__(self, f):
        self.f, self.sha, self.written = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.written

    def write(self, data) -> int:
        self.sha.update(data)
        self.written += len(data)
        return self.f.write(data)


def write_shard(members: list[tuple[int, Sample]], tar_path: str) -> dict:
    """One shard and its index file, each written to a temporary name and renamed when whole.
    Returns its manifest entry without the names: samples, bytes, digests, labels."""
    tmp = f"{tar_path}.tmp"
    with open(tmp, "wb") as f:
        hashing = _Hashing(f)
        edges, lines = hashlib.sha256(), [f"v1.2 {len(members)}"]
        with tarfile.open(fileobj=hashing, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
            for n, (key, s) in enumerate(members):
                try:
                    with open(s.path, "rb") as src:
                        data = src.read()
                except OSError as e:
                    raise DatasetError(f"{s.path}: cannot be read ({e.strerror}); index the folder again") from None
                if n == 0 or n == len(members) - 1:
                    edges.update(data)
                lines.append(_add(tar, f"{key:09d}.{s.ext}", data) + " "
                             + _add(tar, f"{key:09d}.{LABEL_EXT}", str(s.label).encode()))
        f.flush()
        os.fsync(f.fileno())
    idx_path = str(Path(tar_path).with_suffix(".idx"))
    text = "\n".join(lines) + "\n"
    with open(f"{idx_path}.tmp", "w") as f:
        f.write(text)
    os.replace(tmp, tar_path)
    os.replace(f"{idx_path}.tmp", idx_path)
    return {"samples": len(members), "bytes": os.path.getsize(tar_path), "sha256": hashing.sha.hexdigest(),
            "edge_sha256": edges.hexdigest(),
            "index_sha256": hashlib.sha256(text.encode()).hexdigest(), "labels": [s.label for _, s in members]}


def fingerprint(index: Index) -> str:
    """sha256 over every file's path (relative to the root), size and mtime as the index recorded them
    (stat'ed where it recorded none): the source's identity."""
    h = hashlib.sha256()
    for path in index.files:
        stamp = index.stamps.get(path)
        if stamp is None:
            st = os.stat(path)
            stamp = (st.st_size, st.st_mtime_ns)
        h.update(f"{os.path.relpath(path, index.root)}\0{stamp[0]}\0{stamp[1]}\n".encode())
    return h.hexdigest()


def pack(index: Index, out: str | Path, shard_bytes: int = 10**9, seed: int = 0, workers: int = 1,
         progress: bool = True) -> dict:
    """Write ``index``'s files as a shard set in the folder ``out`` (new or empty); return the manifest."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: a file; shards go into a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: not empty; shards go into a new or empty folder")
    samples = samples_of(index)
    if not samples:
        raise DatasetError(f"{index.root}: no images to pack")
    shards = plan(samples, shard_bytes, seed)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"shard-{k:06d}.tar" for k in range(len(shards))]
    meter = Progress(sum(tar_bytes(sum(sample_bytes(s) for _, s in sh)) for sh in shards), "packing", progress,
                     unit="MB", scale=1e6)
    results, done, start = [], 0, time.monotonic()
    # Threads: reading, hashing and writing release the GIL, so threads pack nearly as fast as forked
    # processes (forkserver's start-up costs far more than it saves), and a fork of a caller holding
    # torch or DALI threads could copy a held lock.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for r in pool.map(write_shard, shards, [str(out / n) for n in names]):
            results.append(r)
            done += r["bytes"]
            meter.update(done, final=len(results) == len(shards))
    packed_mb_per_s = done / 1e6 / max(time.monotonic() - start, 1e-9)
    manifest = {
        "format": FORMAT, "version": VERSION, "seed": seed, "shard_bytes": shard_bytes,
        "num_samples": len(samples), "classes": list(index.classes),
        "shards": [{"tar": n, "index": Path(n).with_suffix(".idx").name, **r} for n, r in zip(names, results)],
        "source": {"root": index.root, "index": index.index_path, "files": len(index.files),
                   "fingerprint": fingerprint(index)},
        "packed_mb_per_s": round(packed_mb_per_s, 1),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest
