"""DALI graphs of evaluation: linear evaluation's training and validation crops, and the kNN monitor's.

train: random resized crop (area ``crop_area``, aspect 3/4-4/3) to ``image_size`` + horizontal flip;
val: shorter side resized to ``resize`` (256), center crop ``image_size`` (224); the protocol behind
the published top-1 (docs/reference.md section 1). Both normalised with ``mean``/``std`` (on
[0, 1] pixels), float32 HWC in DALI, (N, 3, H, W) channels_last views in torch. Same ``device``
switch as pretraining: "cpu" (everything on the CPU) or "gpu" (nvJPEG + GPU ops).

``data`` is a :class:`byol_fast.config.LinearDataConfig` (image_size, resize, crop_area, interp,
mean, std); how files are read comes from the :class:`byol_fast.config.ReaderConfig`.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def
from nvidia.dali.pipeline import Pipeline

from byol_fast.config import LinearDataConfig, ReaderConfig
from pipelines.decode import INTERP, build, decode, normalise, read
from pipelines.shards import ShardList

ASPECT = (3 / 4, 4 / 3)


def train_graph(images, data: LinearDataConfig):
    """Decoded uint8 HWC -> float32 HWC (image_size, image_size, 3): random resized crop + flip."""
    crop = fn.random_resized_crop(images, size=(data.image_size, data.image_size), random_area=data.crop_area,
                                  random_aspect_ratio=ASPECT, interp_type=INTERP[data.interp], antialias=True)
    return normalise(crop, data, mirror=fn.random.coin_flip(probability=0.5))


def val_graph(images, data: LinearDataConfig):
    """Decoded uint8 HWC -> float32 HWC (image_size, image_size, 3): resize shorter side, center crop."""
    resized = fn.resize(images, resize_shorter=data.resize, interp_type=INTERP[data.interp], antialias=True)
    return normalise(resized, data, crop=(data.image_size, data.image_size))


@pipeline_def(enable_checkpointing=True)
def _eval_pipeline(source, data: LinearDataConfig, reader: ReaderConfig, train: bool, device: str):
    images = decode(read(source), reader, device)
    return train_graph(images, data) if train else val_graph(images, data)


def build_eval_pipeline(source: list[str] | ShardList, data: LinearDataConfig, reader: ReaderConfig, train: bool,
                        batch_size: int, device: str, device_id: int | None, seed: int,
                        checkpoint: str | None = None) -> Pipeline:
    """The training (``train``) or validation graph over ``source`` (files, or samples of tar shards)
    in the order given, built; ``run()`` returns the images."""
    return build(_eval_pipeline, reader, batch_size, device, device_id, seed, checkpoint, source=source, data=data,
                 train=train)
