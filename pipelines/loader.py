"""The two-view DALI pipeline as an iterable of torch tensors, one epoch per ``iter()``.

Every rank runs the same number of steps per epoch, ``len(files) // (batch_size * world_size)``, so
that collectives (DDP, SyncBatchNorm) never wait on a rank that has stopped. The reader walks the
files in :func:`epoch_order` (cut to whole batches on every shard), so a DALI reader epoch is exactly
one training epoch: each epoch the ranks' shards partition the kept files.

DALI's outputs reach torch without a copy (DLPack; DALI's dynamic executor keeps an output's memory
alive while a torch tensor refers to it) and as ``(N, 3, H, W)`` views of NHWC memory, i.e. torch's
channels_last format.
"""
from __future__ import annotations

import numpy as np
import torch

from byol_fast.config import DataConfig

DEVICES = ("cpu", "gpu")


def steps_per_epoch(num_files: int, batch_size: int, world_size: int) -> int:
    """Batches each rank runs per epoch: the same on every rank; a ValueError if not even one."""
    steps = num_files // (batch_size * world_size)
    if steps < 1:
        raise ValueError(
            f"{num_files} files cannot fill one step of {batch_size} images per rank x {world_size} ranks "
            f"(= {batch_size * world_size} images): add files or lower the batch size"
        )
    return steps


def epoch_order(num_files: int, batch_size: int, world_size: int, seed: int) -> list[int]:
    """Indices of the files the reader walks: a seeded random order of ``num_files`` (the same on every
    rank), cut to ``steps_per_epoch x batch_size x world_size`` so every shard holds exactly one epoch
    of batches. Index the files, and their labels, with it.

    With this list and ``shuffle_after_epoch`` DALI's reader epoch is the training epoch: each epoch
    the ranks' shards partition the kept files (no file twice, none missed), and the list is
    reshuffled (the same way on every rank) between epochs. The files cut (fewer than one global
    batch, e.g. at most 4,095 of ImageNet's 1.28M at batch 4096) are the same in every epoch.
    """
    keep = steps_per_epoch(num_files, batch_size, world_size) * batch_size * world_size
    return np.random.default_rng(seed).permutation(num_files)[:keep].tolist()


def to_torch(batch) -> torch.Tensor:
    """DALI TensorList of HWC samples -> torch ``(N, C, H, W)`` with channels_last strides, no copy."""
    from nvidia.dali.tensors import TensorGPU  # here, so that steps_per_epoch needs no DALI

    tensor = batch.as_tensor()
    if isinstance(tensor, TensorGPU):
        # from_dlpack hands DALI torch's current stream, so the consumer's work is ordered after DALI's.
        with torch.cuda.device(tensor.device_id()):
            nhwc = torch.from_dlpack(tensor)
    else:
        nhwc = torch.from_dlpack(tensor)
    return nhwc.permute(0, 3, 1, 2)


class DaliTwoViewLoader:
    """Yields ``steps_per_epoch`` pairs (view1, view2) per iteration, each float32 (N, 3, H, W)
    (triples (view1, view2, labels int64 (N,)) when ``labels`` are given, for the online probe).

    batch_size is per rank. device: "cpu" (DALI on the CPU, no GPU needed) or "gpu" (nvJPEG + GPU ops
    on cuda:local_rank). The reader is sharded by global rank over the files in :func:`epoch_order`
    (each epoch a partition of the files over the ranks, reshuffled between epochs); the augmentation
    seed is seed + rank.
    Tensors land on ``torch_device`` (moved there only when DALI produced them elsewhere).

    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch exactly: the DALI checkpoint holds the
    reader position and every random generator, plus the step within the epoch. Restoring requires
    the same files, config, batch size, rank and seed.
    """

    def __init__(
        self,
        files: list[str],
        data: DataConfig,
        batch_size: int,
        device: str,
        rank: int,
        world_size: int,
        local_rank: int,
        seed: int,
        torch_device: torch.device,
        labels: list[int] | None = None,
    ):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        # The same list on every rank; labels (for the online probe) take the order of their files.
        order = epoch_order(len(files), batch_size, world_size, seed)
        self.files = [files[i] for i in order]
        self.labels = None if labels is None else [labels[i] for i in order]
        self.reader_seed = seed
        self.data = data
        self.batch_size = batch_size
        self.device = device
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.seed = seed + rank
        self.torch_device = torch.device(torch_device)
        self.steps_per_epoch = steps_per_epoch(len(self.files), batch_size, world_size)
        self._pipe = None  # built on first use, so that load_state_dict can hand it a checkpoint
        self._checkpoint = None
        self._step = 0  # batches of the current epoch already returned

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _pipeline(self):
        if self._pipe is None:
            from pipelines.pretrain import build_pretrain_pipeline

            self._pipe = build_pretrain_pipeline(
                self.files,
                self.data,
                self.batch_size,
                self.device,
                shard_id=self.rank,
                num_shards=self.world_size,
                device_id=self.local_rank if self.device == "gpu" else None,
                seed=self.seed,
                reader_seed=self.reader_seed,
                checkpoint=self._checkpoint,
                labels=self.labels,
            )
        return self._pipe

    def __iter__(self):
        if self._step >= self.steps_per_epoch:  # the last epoch was consumed without reaching StopIteration
            self._step = 0
        pipe = self._pipeline()
        while self._step < self.steps_per_epoch:
            out = pipe.run()
            self._step += 1
            views = (self._torch(out[0]), self._torch(out[1]))
            if self.labels is None:
                yield views
            else:
                labels = torch.from_dlpack(out[2].as_tensor()).reshape(-1).to(torch.int64)
                yield (*views, labels.to(self.torch_device, non_blocking=True))
        self._step = 0

    def _torch(self, batch) -> torch.Tensor:
        out = to_torch(batch)
        return out if out.device == self.torch_device else out.to(self.torch_device, non_blocking=True)

    def state_dict(self) -> dict:
        """Position after the last batch returned: {"pipeline": DALI checkpoint, "step": step in epoch}."""
        checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        return {"pipeline": checkpoint, "step": self._step % self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: the next batch is the one that followed when it was saved."""
        self._pipe = None  # rebuilt lazily from the checkpoint
        self._checkpoint = state["pipeline"]
        self._step = int(state["step"])
