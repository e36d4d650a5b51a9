"""The BYOL two-view augmentation graph (Grill et al. 2020, Appendix B / Table 6) in DALI.

One graph, two devices: :func:`two_view_graph` takes ``device="cpu"`` (CPU decoder, CPU ops,
``device_id=None``: what CI runs) or ``device="gpu"`` (the "mixed" nvJPEG decoder, every later op on
the GPU). Nothing calls ``.gpu()``: the device follows from the decoder.

Each image is decoded once; the two views are two independent random resized crops of it, and each
view then gets its own augmentations, in torchvision's order:

    crop -> flip -> colour jitter (p) -> grayscale (p) -> gaussian blur (p) -> solarize (p) -> normalise

How it is computed, and where it departs from torchvision's transforms:

* Colour jitter and grayscale are linear maps of each pixel's RGB vector, except that contrast blends
  towards the image's grey mean. Composed in the drawn order they give, per image,
  ``out = A x + D mu`` with ``mu`` the crop's per-channel mean; A and D are 3x3 matrices that numpy
  builds on the CPU from DALI's uniforms (:func:`colour_matrices`). So jitter + grayscale is one pass
  over the pixels with a single clamp and rounding to uint8 at the end, where torchvision clamps (and
  on PIL images rounds) after each of the four ops: pixels that saturate mid-way differ slightly.
* Hue is a rotation of the RGB vector about the grey axis by ``hue * 360`` degrees (positive = red
  towards green, as in HSV). torchvision (and TF, the paper's) shift H in HSV space, which is not
  linear in RGB; the grey-axis rotation is about the least-squares best linear map (measured on random
  and smooth images), but it reproduces only part of the shift: at the largest shift, 36 degrees, it is
  off torchvision's output by about 15 uint8 levels on average, against 22 for no shift at all. DALI's
  own ``fn.hue`` (a YIQ rotation) is further off.
* Flip is done inside the final ``crop_mirror_normalize``: every op in between commutes with a
  horizontal mirror (per-pixel maps, a symmetric blur kernel with mirrored borders), so the
  distribution of outputs is the same as flipping right after the crop.
* Blur and solarize work on uint8, as torchvision does on PIL images; solarize inverts pixels
  ``>= 255 * threshold`` (a pixel of 128 is inverted at threshold 0.5).

Outputs: two float32 batches, layout HWC (``(N, H, W, 3)`` once stacked), normalised with ``mean`` and
``std`` given for [0, 1] pixels. HWC is chosen so that torch's ``x.permute(0, 3, 1, 2)`` is an NCHW
tensor with channels_last strides, the format the convolutions run fastest in, without a copy.
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline, do_not_convert

from byol_fast.config import DataConfig, ViewConfig
from byol_fast.constants import LUMA

INTERP = {"cubic": types.INTERP_CUBIC, "linear": types.INTERP_LINEAR}

# ImageNet holds images up to about 6000 x 6000: size the nvJPEG buffers once so that the decoder
# does not reallocate mid-training (the values of DALI's ResNet-50 example).
_HW_DECODER_HINTS = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)

# Columns of the per-sample uniform draw that decides a view's colour ops (see colour_matrices).
JITTER_FIRE, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(5)
ORDER = slice(5, 9)  # four uniforms whose argsort is the order of (brightness, contrast, saturation, hue)
GRAY_FIRE = 9
NUM_UNIFORMS = 10


# ---------------------------------------------------------------------------- colour matrices


def _factor(u: np.ndarray, strength: float) -> np.ndarray:
    """Uniforms (N,) -> factors uniform in [max(0, 1 - s), 1 + s] (torchvision's ColorJitter range)."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return lo + (hi - lo) * u


def grey_axis_rotation(theta: np.ndarray) -> np.ndarray:
    """Angles (N,) in radians -> (N, 3, 3) rotations of RGB about (1, 1, 1), right-handed (Rodrigues)."""
    k = np.full(3, 1.0 / np.sqrt(3.0))
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    return cos * np.eye(3) + sin * cross + (1.0 - cos) * np.outer(k, k)


def colour_matrices(u: np.ndarray, view: ViewConfig) -> tuple[np.ndarray, np.ndarray]:
    """Uniforms (N, NUM_UNIFORMS) -> (A, D), float32 (N, 3, 4): jitter then grayscale is ``A x + D mu``.

    x is a pixel's RGB column, mu the image's per-channel mean; the last column of A and D is zero
    (the [M | T] form of fn.coord_transform). Brightness (b I), saturation (s I + (1 - s) J, J the
    grey projection) and hue (a rotation about the grey axis) are linear in the pixel. Contrast,
    ``c x + (1 - c) grey(mean)``, scales the pixel by c and maps the image mean by c I + (1 - c) J.
    A is the product of the pixel maps and C of the mean maps, both in the drawn order; then
    ``out = A x + (C - A) mu`` and D = C - A.
    """
    n = len(u)
    fire = u[:, JITTER_FIRE] < view.jitter_p
    b = np.where(fire, _factor(u[:, BRIGHTNESS], view.brightness), 1.0)
    c = np.where(fire, _factor(u[:, CONTRAST], view.contrast), 1.0)
    s = np.where(fire, _factor(u[:, SATURATION], view.saturation), 1.0)
    theta = np.where(fire, (2.0 * u[:, HUE] - 1.0) * view.hue * 2.0 * np.pi, 0.0)  # hue 0.1 = +-36 degrees

    eye = np.broadcast_to(np.eye(3), (n, 3, 3))
    grey = np.broadcast_to(np.outer(np.ones(3), LUMA), (n, 3, 3))
    col = lambda f: f[:, None, None]  # noqa: E731  (N,) -> (N, 1, 1)
    saturation = col(s) * eye + col(1.0 - s) * grey
    hue = grey_axis_rotation(theta)
    pixel_ops = np.stack([col(b) * eye, col(c) * eye, saturation, hue], axis=1)  # (N, 4, 3, 3)
    mean_ops = np.stack([col(b) * eye, col(c) * eye + col(1.0 - c) * grey, saturation, hue], axis=1)

    order = np.argsort(u[:, ORDER], axis=1)  # a uniform random permutation: torchvision's randperm(4)
    a, m = eye.copy(), eye.copy()
    for k in range(4):
        pick = order[:, k, None, None, None]
        a = np.take_along_axis(pixel_ops, pick, axis=1)[:, 0] @ a
        m = np.take_along_axis(mean_ops, pick, axis=1)[:, 0] @ m

    gray = col(u[:, GRAY_FIRE] < view.grayscale_p)
    g = np.where(gray, grey, eye)
    a, m = g @ a, g @ m
    return _affine(a), _affine(m - a)


def _affine(m: np.ndarray) -> np.ndarray:
    """(N, 3, 3) -> float32 (N, 3, 4) with a zero translation column."""
    return np.concatenate([m, np.zeros((len(m), 3, 1))], axis=2).astype(np.float32)


@do_not_convert  # keep AutoGraph (enable_conditionals) away from plain numpy code
def _colour_function(view: ViewConfig):
    """fn.python_function body: a batch of uniform vectors -> lists of per-sample A and D."""

    def colour_batch(us):
        a, d = colour_matrices(np.stack(us), view)
        return list(a), list(d)

    return colour_batch


def jitter_and_grayscale(img, view: ViewConfig):
    """uint8 HWC image -> uint8 HWC image after colour jitter (p, random order) and grayscale (p).

    One pass over the pixels: ``clamp(round(A x + D mu))`` (see colour_matrices). The matrices come
    from DALI uniforms (so they are seeded and checkpointed with the pipeline) mapped by numpy on the
    CPU, a few microseconds per batch; mu is reduced where the image lives (the GPU for device="gpu").
    """
    u = fn.random.uniform(range=(0.0, 1.0), shape=(NUM_UNIFORMS,))
    a, d = fn.python_function(u, function=_colour_function(view), batch_processing=True, num_outputs=2)
    mu = fn.reductions.mean(img, axes=(0, 1))  # (3,) float
    shift = fn.coord_transform(fn.reshape(mu, shape=(1, 3)), MT=d)  # (1, 3): (C - A) mu
    out = fn.coord_transform(img, MT=a) + fn.reshape(shift, shape=(1, 1, 3))
    # The cast saturates to [0, 255] and rounds to nearest: torchvision's clamp to [0, 1], on uint8.
    return fn.reshape(fn.cast(out, dtype=types.UINT8), layout="HWC")


# ---------------------------------------------------------------------------- per-image ops


def _maybe(p: float, op, img):
    """op(img) with probability p per sample; p in {0, 1} is decided when the graph is built."""
    if p <= 0:
        return img
    if p >= 1:
        return op(img)
    fire = fn.random.coin_flip(probability=p, dtype=types.BOOL)
    if fire:  # a DALI conditional (enable_conditionals=True): only the chosen samples run op
        img = op(img)
    return img


def _blur(view: ViewConfig):
    lo, hi = view.blur_sigma
    # Drawn for every sample (outside the conditional), so the random stream does not depend on p.
    sigma = fn.random.uniform(range=(lo, hi)) if hi > lo else float(lo)
    return lambda img: fn.gaussian_blur(img, window_size=view.blur_kernel, sigma=sigma)


def _solarize(view: ViewConfig):
    threshold = 255.0 * view.solarize_threshold
    table = [255 - k if k >= threshold else k for k in range(256)]
    return lambda img: fn.lookup_table(img, keys=list(range(256)), values=table, dtype=types.UINT8)


def augment_view(img, view: ViewConfig, data: DataConfig):
    """Decoded uint8 HWC image -> one augmented view, float32 HWC (image_size, image_size, 3), normalised."""
    crop = fn.random_resized_crop(
        img,
        size=(data.image_size, data.image_size),
        random_area=view.crop_area,  # area fraction, uniform
        random_aspect_ratio=view.crop_aspect,  # DALI draws it log-uniform, as torchvision does
        interp_type=INTERP[data.interp],
        antialias=True,  # PIL's resize (the reference) also filters when downscaling
    )
    flip = fn.random.coin_flip(probability=view.flip_p)
    if view.jitter_p > 0 or view.grayscale_p > 0:
        crop = jitter_and_grayscale(crop, view)
    crop = _maybe(view.blur_p, _blur(view), crop)
    crop = _maybe(view.solarize_p, _solarize(view), crop)
    return normalise(crop, data, mirror=flip)


def normalise(images, data, mirror=0, crop=None):
    """uint8 HWC -> float32 HWC, optionally mirrored and center-cropped to ``crop`` (h, w), normalised
    by ``data.mean``/``data.std`` given on [0, 1] pixels: the last op of every pipeline here."""
    extra = {} if crop is None else dict(crop=crop, crop_pos_x=0.5, crop_pos_y=0.5)
    return fn.crop_mirror_normalize(
        images,
        mirror=mirror,
        mean=[255.0 * m for m in data.mean],
        std=[255.0 * s for s in data.std],
        dtype=types.FLOAT,
        output_layout="HWC",
        **extra,
    )


def decode(jpegs, data: DataConfig, device: str):
    """Encoded files -> uint8 HWC RGB images, on the CPU ("cpu") or the GPU via nvJPEG ("gpu")."""
    if device == "gpu":
        return fn.decoders.image(
            jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=data.hw_decoder_load, **_HW_DECODER_HINTS
        )
    if device == "cpu":
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def two_view_graph(jpegs, data: DataConfig, device: str):
    """Encoded files -> (view1, view2): each a float32 HWC batch, both crops of one decoded image."""
    img = decode(jpegs, data, device)
    return augment_view(img, data.view1, data), augment_view(img, data.view2, data)


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _pretrain_pipeline(files, data: DataConfig, device: str, shard_id: int, num_shards: int, reader_seed: int,
                       labels=None):
    # ``files`` are in pipelines.loader.epoch_order: shuffled and cut to whole batches on every
    # shard. shuffle_after_epoch reshuffles the whole list between epochs, identically on every
    # shard, so each epoch the shards partition it (random_shuffle would only mix a buffer of
    # initial_fill samples inside a shard, and shard edges drift across epochs).
    jpegs, label = fn.readers.file(
        files=list(files),
        labels=None if labels is None else list(labels),
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=True,
        seed=reader_seed,
        name="Reader",
    )
    views = two_view_graph(jpegs, data, device)
    return views if labels is None else (*views, label)


def build_pretrain_pipeline(
    files: list[str],
    data: DataConfig,
    batch_size: int,
    device: str,
    shard_id: int,
    num_shards: int,
    device_id: int | None,
    seed: int,
    checkpoint: bytes | str | None = None,
    reader_seed: int | None = None,
    labels: list[int] | None = None,
) -> Pipeline:
    """The two-view pipeline of one rank, built.

    shard_id = global rank, num_shards = world size, device_id = local rank (None for device="cpu"),
    seed = base seed + rank. ``checkpoint`` (from ``Pipeline.checkpoint()``) resumes exactly where
    that pipeline was. ``run()`` returns (view1, view2), each ``batch_size`` float32 HWC samples, and
the int32 class labels (on the CPU) as a third output when ``labels`` (one per file) are given.
    """
    if device == "cpu" and device_id is not None:
        raise ValueError("device='cpu' runs without a GPU: pass device_id=None")
    if device == "gpu" and device_id is None:
        raise ValueError("device='gpu' needs device_id (the local rank)")
    pipe = _pretrain_pipeline(
        files=files,
        data=data,
        device=device,
        shard_id=shard_id,
        num_shards=num_shards,
        reader_seed=seed if reader_seed is None else reader_seed,
        batch_size=batch_size,
        num_threads=max(1, data.num_threads),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=data.prefetch,
        checkpoint=checkpoint,
        labels=labels,
    )
    pipe.build()
    return pipe
