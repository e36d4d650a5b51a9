"""The loader a config asks for, built for this process: the one place where loaders are made.

Pretraining, linear evaluation, the kNN monitor and the benchmark all get their loaders here, so
that each is built from the config's sections whole (the images' recipe and the ``reader``
section) and the benchmark times exactly what the drivers run. Every loader follows the contract of
``pipelines.contract`` (steps per epoch, the epoch, ``state_dict()``).
"""
from __future__ import annotations

import torch

from pipelines.contract import Loader, Shard

from .config import DataConfig, LinearDataConfig, ReaderConfig
from .dist import DistInfo
from .index import Index
from .runtime import decode_device


def shard_of(info: DistInfo) -> Shard:
    return Shard(info.rank, info.world_size, info.local_rank)


def two_view_loader(index: Index, data: DataConfig, reader: ReaderConfig, batch: int, info: DistInfo,
                    device: torch.device, seed: int, labels: bool = False) -> Loader:
    """This rank's two-view loader over the training ``index``: DALI (reader.loader=dali) or the
    torchvision/PIL reference; with ``labels`` it also yields each image's class label."""
    shard = shard_of(info)
    labels_ = index.labels if labels else None
    if reader.loader == "torchvision":
        from pipelines.reference import TorchvisionTwoViewLoader

        return TorchvisionTwoViewLoader(index.files, data, batch, reader.num_threads, shard, seed, labels_)
    from pipelines.loader import DaliTwoViewLoader

    return DaliTwoViewLoader(index.files, data, reader, batch, decode_device(reader, device), shard, seed, device,
                             labels_)


def eval_loader(index: Index, train: bool, data: LinearDataConfig, reader: ReaderConfig, batch: int,
                info: DistInfo, device: torch.device, seed: int = 0) -> Loader:
    """This rank's loader of one labelled split, yielding (images (B, 3, S, S) float32 normalised,
    labels (B,) int64): ``train`` picks random resized crop + flip, else resize + center crop."""
    shard = shard_of(info)
    if reader.loader == "torchvision":
        from pipelines.reference import TorchvisionEvalLoader

        return TorchvisionEvalLoader(index.files, index.labels, train, data, batch, reader.num_threads, shard, seed)
    from pipelines.loader import DaliEvalLoader

    return DaliEvalLoader(index.files, index.labels, train, data, reader, batch, decode_device(reader, device),
                          shard, seed, device)
