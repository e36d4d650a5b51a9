"""The ``shards`` stage: the benchmark's images packed as a shard set
(byol_fast.datasets.shard_pack.pack) and read through the same DALI two-view pipeline as the ``dali``
stage, so that files and shards are compared side by side. A set is packed once per run and shard
size, on the benchmark's disk, and removed when every stage has run."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from byol_fast.datasets.shard_pack import pack
from byol_fast.datasets.shard_set import open_shard_set

from ..progress import log
from .context import PackedSet, Shared, StageContext, StageUnavailable
from .loaders import measure_loader

DEFAULT_SHARDS = 8  # without shard_size=: the benchmark's images in about this many shards


def default_shard_bytes(index) -> int:
    """An eighth of the index's bytes (at least 1 MB, at most the CLI's 1 GB), so that even a small
    benchmark set reads from several shards."""
    total = sum(os.path.getsize(f) for f in index.files)
    return min(10**9, max(10**6, math.ceil(total / DEFAULT_SHARDS)))


def _pack(ctx: StageContext, shard_bytes: int, packed: PackedSet) -> None:
    """Pack the index into ``packed.folder``, open the set (byol_fast.datasets.shard_set checks it)
    and record what packing it measured."""
    index = ctx.shared.index
    workers = ctx.cfg.reader.index_workers or ctx.settings.cores
    log(f"  packing {len(index.files)} images into shards of at most {shard_bytes / 1e6:.1f} MB "
        f"({workers} threads) under {packed.folder}")
    t = time.perf_counter()
    manifest = pack(index, packed.folder, shard_bytes, ctx.settings.seed, workers, progress=False)
    pack_seconds = time.perf_counter() - t
    pack_peak = ctx.host_peak.restart() if ctx.host_peak else None  # the packing's buffers: not the reader's memory
    t = time.perf_counter()
    shard_set = open_shard_set(str(packed.folder))
    sizes = [sh["bytes"] for sh in manifest["shards"]]
    record = {"pack_mb_per_s": manifest["packed_mb_per_s"], "pack_seconds": pack_seconds,
              "pack_host_peak_rss_gb": None if pack_peak is None else pack_peak / 2**30,
              "open_seconds": time.perf_counter() - t, "shard_bytes": shard_bytes, "shards": len(sizes),
              "shard_sizes_bytes": sizes, "packed_bytes": sum(sizes), "packed_samples": manifest["num_samples"],
              "num_samples": len(shard_set), "shard_set": str(packed.folder)}
    log(f"  {record['packed_samples']} images, {sum(sizes) / 1e6:.1f} MB in {len(sizes)} shards, packed at "
        f"{record['pack_mb_per_s']:.1f} MB/s ({pack_seconds:.1f} s)")
    packed.shard_set, packed.record = shard_set, record


def packed_shards(ctx: StageContext, shard_bytes: int) -> tuple[object, dict]:
    """The benchmark's index as a shard set of ``shard_bytes`` shards, packed once per run in a new
    folder under the scratch folder; a later stage asking for the same size gets the same set. Returns
    the set and what packing it measured (``packed_here``: False for a later stage reading a set
    packed before)."""
    sets = ctx.shared.shard_sets
    fresh = shard_bytes not in sets
    if fresh:
        ctx.shared.scratch.mkdir(parents=True, exist_ok=True)
        # On the benchmark's disk (bench_data/, as a real shard set would be), not /tmp, which may be RAM.
        sets[shard_bytes] = PackedSet(Path(tempfile.mkdtemp(prefix="shards_", dir=ctx.shared.scratch)))
        _pack(ctx, shard_bytes, sets[shard_bytes])  # the folder is removed at the end even if this fails
    packed = sets[shard_bytes]
    if packed.shard_set is None:
        raise StageUnavailable(f"packing {packed.folder} failed in an earlier stage")
    return packed.shard_set, {**packed.record, "packed_here": fresh}


def remove_shard_sets(shared: Shared) -> None:
    """The shard sets packed in this run: removed once every stage has run."""
    for packed in shared.shard_sets.values():
        shutil.rmtree(packed.folder, ignore_errors=True)
    shared.shard_sets.clear()


def run_shards(ctx: StageContext) -> dict:
    """The ``dali`` stage's loader and measurement over the same images packed as a shard set."""
    shard_bytes = ctx.options.get("shard_size") or default_shard_bytes(ctx.shared.index)
    shard_set, record = packed_shards(ctx, shard_bytes)
    out = measure_loader("dali", shard_set, ctx)
    return {**out, **record, "where": f"DALI on {ctx.cfg.reader.decode}, {record['shards']} shards"}
