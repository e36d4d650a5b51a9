"""The data path alone: the two-view loader byol_fast.train builds (``dali``), and the
torchvision/PIL DataLoader doing the same recipe with as many workers as DALI has threads
(``torchvision``). Batches are taken where each loader delivers them."""
from __future__ import annotations

import dataclasses

import torch

from byol_fast.datasets.loaders import two_view_loader
from byol_fast.runtime.dist import DistInfo

from ..timing import endless, measure
from .context import StageContext


def reader_for(kind: str, cfg):
    """The config's reader section with ``loader`` set to the stage's kind (dali | torchvision)."""
    return dataclasses.replace(cfg.reader, loader=kind)


def pretrain_loader(kind: str, dataset, cfg, device: torch.device):
    """The two-view loader byol_fast.train builds (byol_fast.datasets.loaders), for a world of one, over
    ``dataset``: the benchmark's index (its files) or a shard set."""
    return two_view_loader(dataset, cfg.data, reader_for(kind, cfg), cfg.optim.batch_size, DistInfo(), device,
                           cfg.seed)


def loader_signature(kind: str, cfg) -> dict:
    """What makes two loader stages the same pipeline (reader settings, batch): a shards figure is
    compared with the files figure of the same signature (dali stage), never with another setting."""
    return {"reader": dataclasses.asdict(reader_for(kind, cfg)), "batch": cfg.optim.batch_size}


def worker_rounds(kind: str, cfg) -> int:
    """Steps in one round of the torchvision DataLoader's workers (1 for DALI, which streams)."""
    return max(1, cfg.reader.num_threads) if kind == "torchvision" else 1


def measure_loader(kind: str, dataset, ctx: StageContext) -> dict:
    """A loader alone (``kind``: dali | torchvision) over ``dataset`` (files or a shard set)."""
    cfg = ctx.cfg
    stream = endless(pretrain_loader(kind, dataset, cfg, ctx.device))
    try:
        out = measure(lambda: next(stream), ctx.batch, ctx.sync, ctx.plan, ctx.name,
                      rounds=worker_rounds(kind, cfg))
    finally:
        stream.close()
    where = f"DALI on {cfg.reader.decode}" if kind == "dali" else f"{cfg.reader.num_threads} DataLoader workers"
    return {**out, "where": where, "loader": loader_signature(kind, cfg)}


def run_dali(ctx: StageContext) -> dict:
    """byol_fast's DALI two-view pipeline over the benchmark's files."""
    return measure_loader("dali", ctx.shared.index, ctx)


def run_torchvision(ctx: StageContext) -> dict:
    """The torchvision/PIL DataLoader over the benchmark's files."""
    return measure_loader("torchvision", ctx.shared.index, ctx)
