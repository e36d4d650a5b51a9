"""The loader contract: what every byol_fast loader promises, and which files rank r reads in epoch e.

The DALI two-view and evaluation loaders (``pipelines.loader``), their PIL/torchvision references
(``pipelines.reference``) and linear evaluation's cached features
(``byol_fast.evaluation.classifier.FeatureLoader``) implement it; each is an :class:`EpochLoader`:

- ``steps_per_epoch``: batches per epoch, the same on every rank (collectives such as DDP and
  SyncBatchNorm would wait forever on a rank that stopped early);
- ``epoch``: the epoch that the next ``iter()`` walks; ``iter()`` yields the rest of it, then the
  loader moves to the next epoch;
- ``state_dict()`` / ``load_state_dict()``: the position after the last batch returned; a loader
  built the same way and given that state yields the very batches that would have followed, bit for bit.

Which files a rank reads is decided here, by :func:`rank_files`, for every loader alike:

- training (``train=True``): each epoch a seeded permutation of all files (the same on every rank,
  a new one every epoch) cut to whole global batches, rank r taking the r-th contiguous block of
  ``steps_per_epoch x batch_size`` files. The ranks' blocks partition the kept files; fewer than one
  global batch is left out, a different few each epoch;
- evaluation (``train=False``): every file exactly once over the ranks, in order, rank r taking the
  r-th contiguous block (sizes differ by at most one); every rank runs the same number of steps,
  so the last batches of a rank can be short, or empty.

Samples packed in tar shards (``pipelines.shards``) are read in an order that keeps each rank's reads
within a few tars: :func:`shard_order` (training: the tars in a new seeded order every epoch, the
samples of each tar in a new seeded order, then cut and split as above; evaluation: as for files).

Batches are tuples of tensors: (view1, view2[, labels]) for two-view loaders, (images, labels) for
evaluation loaders; images float32 (N, 3, H, W), labels int64 (N,).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Shard:
    """Where a loader runs: global rank, world size, and local rank (its GPU on this node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


class Loader(Protocol):
    steps_per_epoch: int
    epoch: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def steps_per_epoch(num_files: int, batch_size: int, world_size: int, train: bool = True) -> int:
    """Batches each rank runs per epoch; a ValueError if training cannot fill one step."""
    if not train:
        return math.ceil(math.ceil(num_files / world_size) / batch_size)
    steps = num_files // (batch_size * world_size)
    if steps < 1:
        raise ValueError(
            f"{num_files} files cannot fill one step of {batch_size} images per rank x {world_size} ranks "
            f"(= {batch_size * world_size} images): add files or lower the batch size"
        )
    return steps


def rank_files(num_files: int, batch_size: int, shard: Shard, epoch: int, seed: int, train: bool = True) -> list[int]:
    """Indices of the files ``shard.rank`` reads in ``epoch``, in reading order (see the module docstring)."""
    rank, world = shard.rank, shard.world_size
    if not train:
        return list(range((num_files * rank) // world, (num_files * (rank + 1)) // world))
    per_rank = steps_per_epoch(num_files, batch_size, world) * batch_size
    order = np.random.default_rng([seed, epoch]).permutation(num_files)
    return order[rank * per_rank:(rank + 1) * per_rank].tolist()


def shard_order(groups, batch_size: int, shard: Shard, epoch: int, seed: int, train: bool = True) -> list[int]:
    """Indices of the samples ``shard.rank`` reads in ``epoch`` when sample i lies in tar ``groups[i]``.

    Training: each epoch a seeded permutation of the tars (the same on every rank), each tar's samples
    in a seeded permutation of their own, concatenated, cut to whole global batches, rank r taking the
    r-th contiguous block; so a rank reads from about (tars / ranks + 1) tars, each once, and the tar
    left partly unread at the end changes every epoch. Evaluation: as :func:`rank_files`.
    """
    num = len(groups)
    if not train:
        return rank_files(num, batch_size, shard, epoch, seed, train=False)
    per_rank = steps_per_epoch(num, batch_size, shard.world_size) * batch_size
    rng = np.random.default_rng([seed, epoch])
    groups = np.asarray(groups)
    tars, inverse = np.unique(groups, return_inverse=True)
    rank_of_tar = np.empty(len(tars), dtype=np.int64)
    rank_of_tar[rng.permutation(len(tars))] = np.arange(len(tars))  # the epoch's place of each tar
    within = rng.permutation(num)  # ties broken at random: a permutation inside each tar
    order = np.lexsort((within, rank_of_tar[inverse]))
    return order[shard.rank * per_rank:(shard.rank + 1) * per_rank].tolist()


def pipeline_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of the random augmentations of one rank in one epoch (each epoch builds its pipeline)."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0] & 0x7FFF_FFFF)


class EpochLoader:
    """The bookkeeping of the contract; a loader supplies ``_batches(epoch, step)``, which yields the
    batches of ``epoch`` from ``step`` on, and may add to the state with ``_position``/``_restore``."""

    def __init__(self, num_files: int, batch_size: int, shard: Shard, seed: int, train: bool):
        self.num_files, self.batch_size, self.shard, self.seed, self.train = num_files, batch_size, shard, seed, train
        self.steps_per_epoch = steps_per_epoch(num_files, batch_size, shard.world_size, train)
        self._epoch = 0
        self.step = 0  # batches of ``_epoch`` already returned

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch of the next batch (a finished epoch counts as the start of the next)."""
        return self._next_position()[0]

    def files_of(self, epoch: int) -> list[int]:
        return rank_files(self.num_files, self.batch_size, self.shard, epoch, self.seed, self.train)

    def __iter__(self):
        self._epoch, self.step = self._next_position()
        for batch in self._batches(self._epoch, self.step):
            self.step += 1  # before the yield: a state taken while the batch is in use counts it
            yield batch
        self._epoch, self.step = self._next_position()

    def _next_position(self) -> tuple[int, int]:
        """(epoch, step) of the next batch: a finished epoch is the start of the next one."""
        return (self._epoch + 1, 0) if self.step >= self.steps_per_epoch else (self._epoch, self.step)

    def state_dict(self) -> dict:
        epoch, step = self._next_position()
        return {"epoch": epoch, "step": step, **self._position(epoch, step)}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self.step = int(state["epoch"]), int(state["step"])
        self._restore(state)

    def _batches(self, epoch: int, step: int):
        raise NotImplementedError

    def _position(self, epoch: int, step: int) -> dict:
        return {}

    def _restore(self, state: dict) -> None:
        pass
