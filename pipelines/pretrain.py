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
  ``out = A x + D mu`` with ``mu`` the crop's per-channel mean; DALI operators build the 3x3 matrices
  A and D on the CPU from the view's draws (:func:`colour_maps`; the numpy reference they are tested
  against is ``pipelines.colour``), so no Python runs per batch: a Python callback would take the GIL
  from the training thread every batch. Jitter + grayscale is then one pass over the pixels with a
  single clamp and rounding to uint8 at the end, where torchvision clamps (and on PIL images rounds)
  after each of the four ops: pixels that saturate mid-way differ slightly.
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
  ``>= 255 * threshold`` (a pixel of 128 is inverted at threshold 0.5). Each sample's blur window is
  cut to 4 sigma each side of the centre (at most the configured window): the same image as the whole
  window after rounding, bar pixels at a rounding tie (:data:`BLUR_RADIUS_SIGMAS` says why).

Outputs: two float32 batches, layout HWC (``(N, H, W, 3)`` once stacked), normalised with ``mean`` and
``std`` given for [0, 1] pixels. HWC is chosen so that torch's ``x.permute(0, 3, 1, 2)`` is an NCHW
tensor with channels_last strides, the format the convolutions run fastest in, without a copy.
"""
from __future__ import annotations

import math

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from byol_fast.config import DataConfig, ReaderConfig, ViewConfig
from pipelines.colour import BRIGHTNESS, CONTRAST, GREY, HUE, ORDERS, SATURATION, factor_range, hue_range
from pipelines.decode import INTERP, build, decode, normalise, read
from pipelines.shards import ShardList

# ---------------------------------------------------------------------------- colour jitter + grayscale
#
# Every jitter map is linear in q = (1, b, c, s, cos theta, sin theta), the view's factors and angle:
# brightness b I, contrast c I (pixels) or c I + (1 - c) J (the mean), saturation s I + (1 - s) J, hue
# cos I + sin K + (1 - cos) k k^T (Rodrigues about k = (1, 1, 1) / sqrt 3, K its cross-product matrix).
# Which map stands at which place of the two chains (pixels and mean) depends only on the order. So
# the table below holds, per order, the entries of the 8 maps (4 places x 2 chains) as coefficients over
# q, built once in numpy; per sample the graph picks its order's rows with one run-time subscript,
# evaluates all 8 maps with one fn.coord_transform (the rows are 6-d points, q a 1 x 6 matrix) and
# composes each chain, then grayscale (J or I, also picked by subscript), with fn.transforms.combine.
# A jitter that does not fire is q = (1, 1, 1, 1, 1, 0): every map is the identity.
#
# Why a table rather than building the four maps with arithmetic and picking them from a stacked tensor
# by the order: each DALI operator has a fixed CPU cost per batch plus a small one per sample,
# whatever its size, so the CPU time of this part grows with the number of operators. That way takes
# some 35 operators per view, this one 18, which about halves the CPU time per batch (a Python
# callback is somewhat cheaper still, but holds the GIL every batch). One table over all 96 (fire,
# gray, order) cases would save 3 operators but make every pipeline build (once per epoch) markedly
# slower, since the build converts every float of a constant. All these operators run on the CPU
# (argument inputs are CPU data), so the same graph serves device="cpu" and "gpu".

_Q = 6  # (1, b, c, s, cos theta, sin theta)
_ONE, _B, _C, _S, _COS, _SIN = range(_Q)
_FROM_COS = np.array([1, 0, 0, 0, 1, 1], np.float32)  # q's entries taken from cos(z), the others from z


def _map(terms: dict[int, np.ndarray]) -> np.ndarray:
    """A colour map as (3, 4, Q) coefficients over q, from {slot of q: 3x3 matrix}:
    ``_map({_ONE: J, _S: I - J})`` is J + s (I - J); the translation column stays zero."""
    out = np.zeros((3, 4, _Q))
    for slot, matrix in terms.items():
        out[:, :3, slot] = matrix
    return out


def _order_table() -> np.ndarray:
    """(24, 8 * 12, Q) float32: for each order, the pixel maps at places 0..3 then the mean maps at
    places 0..3; row 12 m + 4 i + j holds entry (i, j) of map m as coefficients over q."""
    eye, grey = np.eye(3), GREY
    k = 1.0 / np.sqrt(3.0)
    cross = np.array([[0.0, -k, k], [k, 0.0, -k], [-k, k, 0.0]])
    axis = np.full((3, 3), 1.0 / 3.0)  # k k^T
    saturation = _map({_ONE: grey, _S: eye - grey})
    hue = _map({_ONE: axis, _COS: eye - axis, _SIN: cross})
    pixel = {BRIGHTNESS: _map({_B: eye}), CONTRAST: _map({_C: eye}), SATURATION: saturation, HUE: hue}
    mean = {**pixel, CONTRAST: _map({_ONE: grey, _C: eye - grey})}
    table = np.array([[pixel[op] for op in order] + [mean[op] for op in order] for order in ORDERS])
    return table.reshape(len(ORDERS), 8 * 12, _Q).astype(np.float32)


_ORDER_TABLE = _order_table()
_GRAYSCALE = np.stack([np.eye(3, 4), np.pad(GREY, ((0, 0), (0, 1)))]).astype(np.float32)  # not fired, fired


def _to_z(view: ViewConfig) -> np.ndarray:
    """(2, Q, 5) float32 [M | T] maps of the uniforms u (b, c, s, hue) to z = (0, b, c, s, theta,
    theta - pi/2), whose cosine gives q where q needs one (cos(theta - pi/2) = sin theta, to float32
    precision: 4e-8 off at theta = 0): [0] when the jitter does not fire (a constant: factors 1, angle
    0), [1] when it does (uniform on torchvision's ranges)."""
    z = np.zeros((2, _Q, 5))
    z[0, :, 4] = [0.0, 1.0, 1.0, 1.0, 0.0, -np.pi / 2]
    ranges = [factor_range(view.brightness), factor_range(view.contrast), factor_range(view.saturation),
              hue_range(view.hue)]
    for col, (slot, (lo, hi)) in enumerate(zip((_B, _C, _S, _COS), ranges)):
        z[1, slot, col], z[1, slot, 4] = hi - lo, lo
    z[1, _SIN] = z[1, _COS] - [0.0, 0.0, 0.0, 0.0, np.pi / 2]
    return z.astype(np.float32)


def colour_maps(view: ViewConfig):
    """The per-sample colour matrices of one view, as DALI DataNodes on the CPU: (A, D, draws).

    A and D are float32 (3, 4), ``out = A x + D mu`` (pipelines.colour.colour_matrices says why).
    draws (exposed for the tests): "fire" and "gray", int32 flags (jitter with jitter_p, grayscale with
    grayscale_p), "order", an int32 index into ORDERS (uniform: torchvision's randperm(4)), and "u",
    float (1, 4) uniforms of (b, c, s, hue), read by pipelines.colour.jitter_values.
    """
    fire = fn.random.coin_flip(probability=view.jitter_p, dtype=types.INT32)
    gray = fn.random.coin_flip(probability=view.grayscale_p, dtype=types.INT32)
    order = fn.random.uniform(values=list(range(len(ORDERS))), dtype=types.INT32)
    u = fn.random.uniform(range=(0.0, 1.0), shape=(1, 4))
    z = fn.coord_transform(u, MT=types.Constant(_to_z(view))[fire])  # (1, Q)
    q = z * (1.0 - _FROM_COS) + dmath.cos(z) * _FROM_COS
    entries = fn.coord_transform(types.Constant(_ORDER_TABLE)[order], M=q)  # (8 * 12, 1)
    maps = fn.element_extract(fn.reshape(entries, shape=(8, 3, 4), layout="F**"), element_map=list(range(8)))
    grayscale = types.Constant(_GRAYSCALE)[gray]
    a = fn.transforms.combine(*maps[:4], grayscale)  # applied in the listed order: the drawn order, then gray
    c = fn.transforms.combine(*maps[4:], grayscale)
    return a, c - a, dict(fire=fire, gray=gray, order=order, u=u)


def jitter_and_grayscale(img, view: ViewConfig):
    """uint8 HWC image -> uint8 HWC image after colour jitter (p, random order) and grayscale (p).

    One pass over the pixels: ``clamp(round(A x + D mu))`` (see colour_maps). The matrices are built by
    DALI operators on the CPU from DALI draws (so they are seeded and checkpointed with the pipeline);
    mu is reduced where the image lives (the GPU for device="gpu").
    """
    a, d, _ = colour_maps(view)
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


# The paper's blur window (10% of the view: 23 px at 224) is wider than its Gaussians need. The taps
# further than ceil(4 sigma) from the centre hold at most 1.8e-5 of the kernel's mass for sigma <= 2
# (the continuous tail beyond 4 sigma, 6.3e-5, bounds it for any sigma), so cutting each sample's
# window to 2 ceil(4 sigma) + 1 (never more than the configured window) moves an output by at most
# about 0.01 of a uint8 level per pass (0.03 for any sigma): the same image after rounding, bar pixels
# at a rounding tie. With sigma uniform in (0.1, 2) the window averages about 10 px instead of 23, and
# the blur, at 224 px the costliest op of the CPU graph after the colour pass, costs 2.2x less.
BLUR_RADIUS_SIGMAS = 4.0


def blur_window(sigma: float, kernel: int) -> int:
    """The window a sample blurred with ``sigma`` gets: 2 ceil(4 sigma) + 1, at most ``kernel``."""
    return min(kernel, 2 * math.ceil(BLUR_RADIUS_SIGMAS * sigma) + 1)


def blur_window_node(sigma, kernel: int):
    """:func:`blur_window` in the graph, for a per-sample sigma (a float DataNode): int32 per sample."""
    radius = fn.cast(dmath.ceil(sigma * BLUR_RADIUS_SIGMAS), dtype=types.INT32)
    return dmath.min(radius * 2 + 1, kernel)


def _blur(view: ViewConfig):
    lo, hi = view.blur_sigma
    if hi > lo:
        # Drawn for every sample (outside the conditional), so the random stream does not depend on p.
        sigma = fn.random.uniform(range=(lo, hi))
        window = blur_window_node(sigma, view.blur_kernel)
    else:
        sigma, window = float(lo), blur_window(lo, view.blur_kernel)
    return lambda img: fn.gaussian_blur(img, window_size=window, sigma=sigma)


def _solarize(view: ViewConfig):
    threshold = 255.0 * view.solarize_threshold
    table = [255 - k if k >= threshold else k for k in range(256)]
    return lambda img: fn.lookup_table(img, keys=list(range(256)), values=table, dtype=types.UINT8)


def crop_window(img, view: ViewConfig):
    """A random resized crop's window of the decoded image: (anchor, shape), each float (y, x) in whole
    pixels, on the CPU. Area fraction uniform in ``crop_area``, aspect log-uniform in ``crop_aspect``
    (as torchvision and DALI's random_resized_crop draw them), 10 attempts, then a center crop."""
    anchor, shape = fn.random_crop_generator(img.shape(), random_area=view.crop_area,
                                             random_aspect_ratio=view.crop_aspect)
    return fn.cast(anchor, dtype=types.FLOAT), fn.cast(shape, dtype=types.FLOAT)


def window_of(anchor, shape, flip):
    """float32 (5,) per sample: the crop window x0, y0, x1, y1 in the decoded image's pixels, and the
    flip (1.0 when the view is mirrored): what PixPro's correspondences need (byol_fast.models.pixpro)."""
    ya, xa = anchor[0], anchor[1]
    return fn.stack(xa, ya, xa + shape[1], ya + shape[0], fn.cast(flip, dtype=types.FLOAT))


def augment_view(img, view: ViewConfig, data: DataConfig, windows: bool = False):
    """Decoded uint8 HWC image -> one augmented view, float32 HWC (image_size, image_size, 3), normalised;
    with ``windows`` also its crop window and flip (:func:`window_of`)."""
    anchor, shape = crop_window(img, view)
    crop = fn.resize(
        img,
        roi_start=anchor,
        roi_end=anchor + shape,
        size=(data.image_size, data.image_size),
        interp_type=INTERP[data.interp],
        antialias=True,  # PIL's resize (the reference) also filters when downscaling
    )
    flip = fn.random.coin_flip(probability=view.flip_p)
    if view.jitter_p > 0 or view.grayscale_p > 0:
        crop = jitter_and_grayscale(crop, view)
    crop = _maybe(view.blur_p, _blur(view), crop)
    crop = _maybe(view.solarize_p, _solarize(view), crop)
    out = normalise(crop, data, mirror=flip)
    return (out, window_of(anchor, shape, flip)) if windows else out


def two_view_graph(jpegs, data: DataConfig, reader: ReaderConfig, device: str, windows: bool = False):
    """Encoded files -> (view1, view2): each a float32 HWC batch, both crops of one decoded image;
    with ``windows``, (view1, view2, window1, window2): each view's crop window and flip as float32
    (5,) per sample, on the CPU (:func:`window_of`)."""
    img = decode(jpegs, reader, device)
    v1, v2 = augment_view(img, data.view1, data, windows), augment_view(img, data.view2, data, windows)
    return (v1[0], v2[0], v1[1], v2[1]) if windows else (v1, v2)


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def _pretrain_pipeline(source, data: DataConfig, reader: ReaderConfig, device: str, windows: bool):
    return two_view_graph(read(source), data, reader, device, windows)


def build_pretrain_pipeline(source: list[str] | ShardList, data: DataConfig, reader: ReaderConfig, batch_size: int,
                            device: str, device_id: int | None, seed: int, checkpoint: str | None = None,
                            windows: bool = False) -> Pipeline:
    """The two-view pipeline over ``source`` (files, or samples of tar shards) in the order given, built.

    device_id = local rank (None for device="cpu"). ``run()`` returns (view1, view2), each
    ``batch_size`` float32 HWC samples, and with ``windows`` each view's crop window and flip too
    (float32 (5,) per sample: x0, y0, x1, y1 in the decoded image's pixels, flip). Instance-only
    runs leave ``windows`` off: those outputs are then not part of the graph. ``checkpoint`` resumes a
    pipeline exactly.
    """
    return build(_pretrain_pipeline, reader, batch_size, device, device_id, seed, checkpoint, source=source,
                 data=data, windows=windows)
