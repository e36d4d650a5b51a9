"""The dataset a config's ``data.path`` names, opened and checked: an image folder (or its index
JSON), a local shard set, or one on object storage."""
from __future__ import annotations

from byol_fast.datasets import object_store as store
from byol_fast.datasets.index import checked_index
from byol_fast.datasets.samples import Index
from byol_fast.datasets.shard_set import ShardSet, is_shard_set, open_shard_set
from byol_fast.errors import DatasetError
from byol_fast.runtime import dist


def checked_dataset(path, info, workers: int = 0) -> Index | ShardSet:
    """What ``--data.path`` names, for one process of a distributed run (``info``:
    byol_fast.runtime.dist.DistInfo): a shard set (checked in full by rank 0, then opened by the
    others) or an image folder or index file (``byol_fast.datasets.index.checked_index``)."""
    if not (store.is_s3(path) or is_shard_set(path)):  # an s3:// URL can only be a shard set
        return checked_index(path, info, workers)
    def main():
        shard_set = open_shard_set(str(path))
        print(f"data: {shard_set.summary()}", flush=True)
        return shard_set

    return dist.main_first(main, lambda: open_shard_set(str(path), check_headers=False), (DatasetError,))
