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

from byol_fast.config import DataConfig, ReaderConfig, ViewConfig
from pipelines.colour import NUM_UNIFORMS, colour_matrices
from pipelines.decode import INTERP, build, decode, normalise, read_files

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


def two_view_graph(jpegs, data: DataConfig, reader: ReaderConfig, device: str):
    """Encoded files -> (view1, view2): each a float32 HWC batch, both crops of one decoded image."""
    img = decode(jpegs, reader, device)
    return augment_view(img, data.view1, data), augment_view(img, data.view2, data)


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _pretrain_pipeline(files, labels, data: DataConfig, reader: ReaderConfig, device: str):
    jpegs, label = read_files(files, labels)
    views = two_view_graph(jpegs, data, reader, device)
    return views if labels is None else (*views, label)


def build_pretrain_pipeline(files: list[str], data: DataConfig, reader: ReaderConfig, batch_size: int, device: str,
                            device_id: int | None, seed: int, checkpoint: str | None = None,
                            labels: list[int] | None = None) -> Pipeline:
    """The two-view pipeline over ``files`` in the order given, built.

    device_id = local rank (None for device="cpu"). ``run()`` returns (view1, view2), each
    ``batch_size`` float32 HWC samples, and the int32 class labels (on the CPU) as a third output
    when ``labels`` (one per file) are given. ``checkpoint`` resumes a pipeline exactly.
    """
    return build(_pretrain_pipeline, reader, batch_size, device, device_id, seed, checkpoint,
                 files=files, labels=labels, data=data)
