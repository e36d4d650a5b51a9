"""The two ends every DALI graph here shares: reading and decoding files, and the final normalisation.

Each loader hands its graph what this rank reads in this epoch, in order: a list of files
(``pipelines.contract.rank_files``) or samples of tar shards (a :class:`pipelines.shards.ShardList`,
``pipelines.contract.shard_order``). The reader walks it as given, never shuffling or sharding it
itself, so which image comes when is decided in one place for every loader. Labels do not travel
through the graphs: the loaders know which samples each batch holds and attach them.
"""
from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from byol_fast.config import ReaderConfig
from pipelines.shards import IMAGE_EXTS, ShardList

INTERP = {"cubic": types.INTERP_CUBIC, "linear": types.INTERP_LINEAR}
DEVICES = ("cpu", "gpu")

# ImageNet holds images up to about 6000 x 6000: size the nvJPEG buffers once so that the decoder
# does not reallocate mid-training (the values of DALI's ResNet-50 example).
_HW_DECODER_HINTS = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)


def read(source: list[str] | ShardList):
    """The encoded images of ``source`` in the order given: files, or samples of tar shards."""
    if isinstance(source, ShardList):
        return fn.readers.webdataset(paths=source.tars, index_paths=source.index_paths, ext=";".join(IMAGE_EXTS),
                                     missing_component_behavior="error", name="Reader")
    return fn.readers.file(files=list(source), random_shuffle=False, shuffle_after_epoch=False, name="Reader")[0]


# The operator that parses every image's header before the decoder sees it (see headers_parsed); a
# loader that meets its error reports an image that could not be decoded.
HEADER_CHECK = "HeaderCheck"


def headers_parsed(jpegs):
    """The encoded files unchanged (a zero-copy reshape to their own shape), but only once every
    file's header has been parsed by nvImageCodec in ``fn.peek_image_shape``.

    DALI's image decoder (``fn.decoders.image``, CPU or mixed) parses a large batch's headers on its
    thread pool, and a header that fails to parse in one of the pool's blocks leaves the decoder
    running on samples it never parsed: a SIGSEGV in its worker threads rather than an error
    (benchmarks/RESULTS.md, "DALI's CPU image decoder crashes on an unreadable header"). The peek
    parses with the same library and fails cleanly, one iteration error; making the decoder's input
    depend on its output (the reshape's target shape adds 0 times the first image dimension) keeps
    the decoder from running on a batch the peek refused, whatever the executor's order. It costs a
    second header parse per image (microseconds, next to a decode's milliseconds) and no copy."""
    first_dim = fn.peek_image_shape(jpegs, name=HEADER_CHECK)[0]
    return fn.reshape(jpegs, shape=jpegs.shape(dtype=types.INT64) + first_dim * 0)


def decode(jpegs, reader: ReaderConfig, device: str):
    """Encoded files -> uint8 HWC RGB images, on the CPU ("cpu") or the GPU via nvJPEG ("gpu"); every
    header is parsed first (:func:`headers_parsed`), so bytes that are no image stop the iteration
    with an error instead of crashing the decoder."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    jpegs = headers_parsed(jpegs)
    if device == "gpu":
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB,
                                 hw_decoder_load=reader.hw_decoder_load, **_HW_DECODER_HINTS)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


def normalise(images, data, mirror=0, crop=None):
    """uint8 HWC -> float32 HWC, optionally mirrored and center-cropped to ``crop`` (h, w), normalised
    by ``data.mean``/``data.std`` given on [0, 1] pixels: the last op of every pipeline here."""
    extra = {} if crop is None else dict(crop=crop, crop_pos_x=0.5, crop_pos_y=0.5)
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=[255.0 * m for m in data.mean],
                                    std=[255.0 * s for s in data.std], dtype=types.FLOAT,
                                    output_layout="HWC", **extra)


def build(pipeline_fn, reader: ReaderConfig, batch_size: int, device: str, device_id: int | None, seed: int,
          checkpoint: str | None, **graph_args) -> Pipeline:
    """A ``@pipeline_def`` graph built for one rank: device_id = local rank (None for device="cpu");
    ``checkpoint`` (from ``Pipeline.checkpoint()``) resumes exactly where that pipeline was."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu" and device_id is not None:
        raise ValueError("device='cpu' runs without a GPU: pass device_id=None")
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs device_id (the local rank)")
    pipe = pipeline_fn(reader=reader, device=device, batch_size=batch_size, num_threads=max(1, reader.num_threads),
                       device_id=device_id, seed=seed, prefetch_queue_depth=reader.prefetch, checkpoint=checkpoint,
                       **graph_args)
    pipe.build()
    return pipe
