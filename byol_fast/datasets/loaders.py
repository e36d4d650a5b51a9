"""The loader a config asks for, built for this process: the one place where loaders are made.

Pretraining, linear evaluation, the kNN monitor and the benchmark all get their image loaders here,
so that each is built from the config's sections whole (the images' recipe and the ``reader``
section) and the benchmark times exactly what the drivers run. (Linear evaluation's cached features
are not images: ``byol_fast.evaluation.classifier.FeatureLoader``.) Every loader follows the
contract of ``pipelines.contract`` (steps per epoch, the epoch, ``state_dict()``).
"""
from __future__ import annotations

import torch

from byol_fast.config import DataConfig, LinearDataConfig, ReaderConfig
from byol_fast.datasets.samples import Index
from byol_fast.datasets.shard_set import ShardSet
from byol_fast.errors import ConfigError
from byol_fast.runtime.device import decode_device
from byol_fast.runtime.dist import DistInfo
from pipelines.contract import Loader, Shard, steps_per_epoch
from pipelines.loader import DaliEvalLoader, DaliTwoViewLoader
from pipelines.reference import TorchvisionEvalLoader, TorchvisionTwoViewLoader

Dataset = Index | ShardSet


def shard_of(info: DistInfo) -> Shard:
    return Shard(info.rank, info.world_size, info.local_rank)


def _check_fills(index: Dataset, batch: int, info: DistInfo, key: str) -> None:
    """A ConfigError naming ``key`` when the index cannot fill one training step on every rank."""
    try:
        steps_per_epoch(len(index), batch, info.world_size)
    except ValueError as e:
        raise ConfigError(f"{key}: {index.root}: {e}") from None


def _items(index: Dataset, reader: ReaderConfig):
    """What the loader reads: the files of an image folder, or the samples of a shard set (DALI only)."""
    if not isinstance(index, ShardSet):
        return index.files
    if reader.loader == "torchvision":
        raise ConfigError(f"reader.loader: {index.root} is a shard set, which DALI reads; the torchvision "
                          "loader reads image folders (use reader.loader=dali, or the folder)")
    return index.samples


def two_view_loader(index: Dataset, data: DataConfig, reader: ReaderConfig, batch: int, info: DistInfo,
                    device: torch.device, seed: int, labels: bool = False, windows: bool = False) -> Loader:
    """This rank's two-view loader over the training ``index`` (an image folder's index or a shard
    set): DALI (reader.loader=dali) or the torchvision/PIL reference (folders only); with ``labels``
    it also yields each image's class label, with ``windows`` each view's crop window and flip
    (PixPro), before the labels."""
    _check_fills(index, batch, info, "optim.batch_size")
    items, shard = _items(index, reader), shard_of(info)
    labels_ = index.labels if labels else None
    if reader.loader == "torchvision":
        return TorchvisionTwoViewLoader(items, data, batch, reader.num_threads, shard, seed, labels_, windows)
    return DaliTwoViewLoader(items, data, reader, batch, decode_device(reader, device), shard, seed, device,
                             labels_, windows)


def eval_loader(index: Dataset, train: bool, data: LinearDataConfig, reader: ReaderConfig, batch: int,
                info: DistInfo, device: torch.device, seed: int = 0) -> Loader:
    """This rank's loader of one labelled split, yielding (images (B, 3, S, S) float32 normalised,
    labels (B,) int64): ``train`` picks random resized crop + flip, else resize + center crop."""
    if train:
        _check_fills(index, batch, info, "batch_size")
    items, shard = _items(index, reader), shard_of(info)
    if reader.loader == "torchvision":
        return TorchvisionEvalLoader(items, index.labels, train, data, batch, reader.num_threads, shard, seed)
    return DaliEvalLoader(items, index.labels, train, data, reader, batch, decode_device(reader, device),
                          shard, seed, device)
