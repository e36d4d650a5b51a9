"""What a shard set of ImageNet's size costs the loaders' bookkeeping, without the images:
``python benchmarks/shard_scale.py``.

Builds the sample table of 1,281,167 samples in 140 shards (synthetic offsets, nothing on disk), then
times, per epoch of one rank at 1, 8 and 32 ranks, ``pipelines.contract.shard_order`` (which samples
the rank reads) and ``ShardSamples.reader_list`` (writing its index files for DALI's reader), and the
parse of 140 index files of 9,151 samples (``byol_fast.datasets.shard_set.parse_index``, done once when a run
opens the set).
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from byol_fast.datasets.shard_set import parse_index  # noqa: E402
from pipelines.contract import Shard, shard_order  # noqa: E402
from pipelines.shards import ShardSamples  # noqa: E402

SAMPLES, TARS, IMAGE, BATCH = 1_281_167, 140, 110_000, 256


def main() -> None:
    per_tar = np.full(TARS, SAMPLES // TARS)
    per_tar[: SAMPLES - per_tar.sum()] += 1
    tar_of = np.repeat(np.arange(TARS), per_tar).astype(np.int32)
    within = np.concatenate([np.arange(n) for n in per_tar])
    stride = 512 + -(-IMAGE // 512) * 512 + 1024  # image header + data, label header + data
    samples = ShardSamples(tuple(f"/data/shard-{t:06d}.tar" for t in range(TARS)), tar_of, np.arange(SAMPLES),
                           np.zeros(SAMPLES, np.uint8), 512 + within * stride, np.full(SAMPLES, IMAGE))
    for world in (1, 8, 32):
        t0 = time.perf_counter()
        order = shard_order(tar_of, BATCH, Shard(0, world), 3, 0)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            pairs = len(samples.reader_list(order, folder, "rank0"))
        t2 = time.perf_counter()
        print(f"{world:2d} ranks: order {t1 - t0:.2f} s, index files {t2 - t1:.2f} s, "
              f"{pairs} (tar, index file) pairs, {len(order)} samples per rank")
    n = int(per_tar[0])
    text = "\n".join([f"v1.2 {n}"] + [f"jpg {512 + i * stride} {IMAGE} {i:09d}.jpg cls {512 + i * stride + stride - 512} "
                                       f"3 {i:09d}.cls" for i in range(n)]) + "\n"
    t0 = time.perf_counter()
    for _ in range(TARS):
        parse_index(text, "shard.idx", 10**13)
    print(f"parse {TARS} index files of {n} samples: {time.perf_counter() - t0:.1f} s "
          f"({TARS * len(text) / 1e6:.0f} MB of index text)")


if __name__ == "__main__":
    main()
