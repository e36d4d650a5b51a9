"""Samples of tar shards as DALI's webdataset reader reads them: any subset, in any order.

A shard set (packed by ``byol_fast.datasets.shard_pack``, opened and checked by
``byol_fast.datasets.shard_set``) reaches the pipelines as :class:`ShardSamples`: the tar of every
sample and where its image lies in that tar.
DALI's ``fn.readers.webdataset`` walks (tar, index file) pairs in the order given and each index
file's samples in the order listed, reading each sample at the offset its line states. So a loader
that wants samples ``order`` (``pipelines.contract.shard_order`` in training) writes, for each run of
consecutive samples from one tar, a small index file listing just those samples' images in that
order (:meth:`ShardSamples.reader_list`). The reader then neither shuffles nor shards: which sample
comes when is decided by the loader contract, as for files, and a DALI checkpoint of the reader is a
position in that list.

Only the image of a sample is listed (its ``.cls`` member is never read): labels come from the
manifest, batch by batch, in the loader. On object storage that is one ranged GET per sample.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# The extensions an image member may have (byol_fast.datasets.shard_pack stores each under what it really is).
IMAGE_EXTS = ("bmp", "jp2", "jpg", "png", "ppm", "tiff", "webp")


@dataclass(frozen=True)
class ShardList:
    """What one pipeline reads: DALI webdataset ``paths`` and ``index_paths``, pairwise."""

    tars: list[str]
    index_paths: list[str]

    def __len__(self) -> int:
        return len(self.tars)


@dataclass(frozen=True)
class ShardSamples:
    """Every sample of a shard set: ``tar_of[i]`` indexes ``tars``; the image member of sample i is
    ``<key[i]:09d>.<IMAGE_EXTS[ext[i]]>`` with its data at ``offset[i]``, ``size[i]`` bytes long."""

    tars: tuple[str, ...]
    tar_of: np.ndarray  # int32 (N,)
    key: np.ndarray  # int64 (N,)
    ext: np.ndarray  # uint8 (N,), an index into IMAGE_EXTS
    offset: np.ndarray  # int64 (N,)
    size: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.tar_of)

    def subset(self, keep) -> "ShardSamples":
        keep = np.asarray(keep, dtype=np.int64)
        return ShardSamples(self.tars, self.tar_of[keep], self.key[keep], self.ext[keep], self.offset[keep],
                            self.size[keep])

    def reader_list(self, order, folder: str, tag: str) -> ShardList:
        """Index files in ``folder`` (named ``<tag>-<n>.idx``) that make the webdataset reader return
        exactly the samples ``order``, in that order."""
        order = np.asarray(order, dtype=np.int64)
        if not len(order):
            raise ValueError("no samples to read")
        tars = self.tar_of[order]
        cuts = np.flatnonzero(np.diff(tars)) + 1  # where the next run of one tar starts
        paths, index_paths = [], []
        for n, run in enumerate(np.split(order, cuts)):
            lines = [f"{IMAGE_EXTS[e]} {o} {s} {k:09d}.{IMAGE_EXTS[e]}" for e, o, s, k in
                     zip(self.ext[run].tolist(), self.offset[run].tolist(), self.size[run].tolist(),
                         self.key[run].tolist())]
            path = os.path.join(folder, f"{tag}-{n:06d}.idx")
            with open(path, "w") as f:
                f.write(f"v1.2 {len(run)}\n" + "\n".join(lines) + "\n")
            paths.append(self.tars[int(self.tar_of[run[0]])])
            index_paths.append(path)
        return ShardList(paths, index_paths)
