"""DALI pipelines for linear evaluation (the protocol behind the published top-1, REFERENCE.md 1).

train: random resized crop (area ``crop_area``, aspect 3/4-4/3) to ``image_size`` + horizontal flip;
val: shorter side resized to ``resize`` (256), center crop ``image_size`` (224). Both normalised with
``mean``/``std`` (on [0, 1] pixels), float32, HWC in DALI and (N, 3, H, W) channels_last views in torch.
Same ``device`` switch as pretraining: "cpu" (everything on the CPU) or "gpu" (nvJPEG + GPU ops).

The data config is byol_fast.linear_eval's LinearDataConfig. Fields read: image_size, resize,
crop_area, interp, mean, std, num_threads, prefetch, hw_decoder_load.
"""
from __future__ import annotations

import math

import torch
from nvidia.dali import fn, pipeline_def

from pipelines.loader import DEVICES, epoch_order, steps_per_epoch, to_torch
from pipelines.pretrain import INTERP, decode, normalise

ASPECT = (3 / 4, 4 / 3)


def train_graph(images, data):
    """Decoded uint8 HWC -> float32 HWC (image_size, image_size, 3): random resized crop + flip."""
    crop = fn.random_resized_crop(
        images,
        size=(data.image_size, data.image_size),
        random_area=data.crop_area,
        random_aspect_ratio=ASPECT,
        interp_type=INTERP[data.interp],
        antialias=True,
    )
    return normalise(crop, data, mirror=fn.random.coin_flip(probability=0.5))


def val_graph(images, data):
    """Decoded uint8 HWC -> float32 HWC (image_size, image_size, 3): resize shorter side, center crop."""
    resized = fn.resize(
        images,
        resize_shorter=data.resize,
        interp_type=INTERP[data.interp],
        antialias=True,
    )
    return normalise(resized, data, crop=(data.image_size, data.image_size))


@pipeline_def(enable_checkpointing=True)
def _linear_pipeline(files, labels, data, train: bool, device: str, shard_id: int, num_shards: int, reader_seed: int):
    jpegs, label = fn.readers.file(
        files=list(files),
        labels=list(labels),
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=train,  # train: files in loader.epoch_order, a partition every epoch
        seed=reader_seed,
        # val: a fixed shard per rank, padded by repeating its last file to a whole number of batches,
        # the same number on every rank (the loader drops the padding).
        stick_to_shard=not train,
        pad_last_batch=not train,
        name="Reader",
    )
    images = decode(jpegs, data, device)
    out = train_graph(images, data) if train else val_graph(images, data)
    return out, label


def shard_size(num_files: int, shard_id: int, num_shards: int) -> int:
    """Files in DALI's shard ``shard_id`` of ``num_shards`` (contiguous ranges, sizes differ by <= 1)."""
    return (num_files * (shard_id + 1)) // num_shards - (num_files * shard_id) // num_shards


class DaliLinearLoader:
    """Yields (images float32 (N, 3, S, S) channels_last, labels int64 (N,)) of this rank's shard.

    train=True: ``len(files) // (batch_size * world_size)`` full batches per epoch on every rank,
    each epoch a partition of the kept files over the ranks (``loader.epoch_order``), reshuffled.
    train=False: every file of the rank's shard exactly once per iteration, in order; all ranks run
    ``ceil(ceil(N / world) / batch)`` steps (DALI pads each shard to ceil(N / world) files), so the last
    batch of a rank can be short or even empty, and the shards together cover each file exactly once.
    """

    def __init__(self, files, labels, train: bool, data, batch_size: int, device: str, rank: int,
                 world_size: int, local_rank: int, seed: int, torch_device: torch.device):
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.train, self.batch_size = train, batch_size
        self.torch_device = torch.device(torch_device)
        if train:
            self.steps_per_epoch = steps_per_epoch(len(files), batch_size, world_size)
            order = epoch_order(len(files), batch_size, world_size, seed)
            files, labels = [files[i] for i in order], [labels[i] for i in order]
        else:
            self.num_samples = shard_size(len(files), rank, world_size)  # real files of this rank
            self.steps_per_epoch = math.ceil(math.ceil(len(files) / world_size) / batch_size)
        self._pipe = _linear_pipeline(
            files=files, labels=labels, data=data, train=train, device=device, shard_id=rank,
            num_shards=world_size, reader_seed=seed, batch_size=batch_size,
            num_threads=max(1, data.num_threads), device_id=local_rank if device == "gpu" else None,
            seed=seed + rank, prefetch_queue_depth=data.prefetch,
        )
        self._pipe.build()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        left = None if self.train else self.num_samples
        for _ in range(self.steps_per_epoch):
            images, labels = self._pipe.run()
            images = to_torch(images)
            labels = torch.from_dlpack(labels.as_tensor()).reshape(-1).to(torch.int64)
            if left is not None:  # val: drop the padding
                images, labels = images[:left], labels[:left]
                left -= len(labels)
            yield images.to(self.torch_device, non_blocking=True), labels.to(self.torch_device, non_blocking=True)
