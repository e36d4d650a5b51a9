"""Colour jitter and grayscale as per-image matrices, in numpy: the reference the DALI graph is tested against.

Brightness, saturation, hue (a rotation about the grey axis) and grayscale are linear maps of a
pixel's RGB vector; contrast blends towards the image's grey mean. Composed in the drawn order they
give, per image, ``out = A x + D mu`` with mu the image's per-channel mean.

The DALI graph (``pipelines.pretrain.colour_maps``) builds A and D with DALI operators only, from
the draws of each view: whether the jitter fires, whether grayscale fires, which of the 24 orders,
and four uniforms (the three factors and the hue angle). This module says what the uniforms mean
(:func:`jitter_values`) and computes A and D from the drawn values the plain way, one 3x3 product
after another (:func:`colour_matrices`), so that tests can check the graph's matrices sample by
sample. Nothing here runs in the graph. Why the hue is a rotation and where this departs from
torchvision: the docstring of ``pipelines.pretrain``.
"""
from __future__ import annotations

import itertools

import numpy as np

from byol_fast.config import ViewConfig
from byol_fast.constants import LUMA

# torchvision's ColorJitter numbers its ops so, and applies them in the order of torch.randperm(4).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
ORDERS = tuple(itertools.permutations(range(4)))  # the 24 orders; ORDERS[k][j] is the op applied j-th
GREY = np.outer(np.ones(3), LUMA)  # J: every channel becomes the luma (torchvision's rgb_to_grayscale)


def factor_range(strength: float) -> tuple[float, float]:
    """torchvision's ColorJitter range of a brightness, contrast or saturation factor."""
    return max(0.0, 1.0 - strength), 1.0 + strength


def hue_range(hue: float) -> tuple[float, float]:
    """The rotation angle's range in radians: a hue shift of h turns of the colour wheel (0.1 = 36 degrees)."""
    return -hue * 2.0 * np.pi, hue * 2.0 * np.pi


def jitter_values(fire, u, view: ViewConfig) -> dict[str, np.ndarray]:
    """The jitter's draws -> its brightness, contrast and saturation factors and hue angle, per sample:
    uniform on their ranges where it fires, 1, 1, 1 and 0 (the identity) where it does not.

    fire: (N,) flags; u: (N, 4) uniforms in [0, 1) for (b, c, s, hue), any shape with 4 per sample.
    """
    fire = np.asarray(fire).reshape(-1).astype(bool)
    u = np.asarray(u, np.float64).reshape(len(fire), 4)
    ranges = [factor_range(view.brightness), factor_range(view.contrast), factor_range(view.saturation),
              hue_range(view.hue)]
    lo, hi = np.array(ranges).T
    values = np.where(fire[:, None], lo + (hi - lo) * u, [1.0, 1.0, 1.0, 0.0])
    return dict(b=values[:, 0], c=values[:, 1], s=values[:, 2], theta=values[:, 3])


def grey_axis_rotation(theta: np.ndarray) -> np.ndarray:
    """Angles (N,) in radians -> (N, 3, 3) rotations of RGB about (1, 1, 1), right-handed (Rodrigues)."""
    k = np.full(3, 1.0 / np.sqrt(3.0))
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    return cos * np.eye(3) + sin * cross + (1.0 - cos) * np.outer(k, k)


def colour_matrices(b, c, s, theta, order, gray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample draws (N,) each -> (A, D), float32 (N, 3, 4): jitter then grayscale is ``A x + D mu``.

    b, c, s: brightness, contrast and saturation factors; theta: the hue angle (radians); order: an
    index into ORDERS; gray: whether grayscale fires (the jitter's "did not fire" is factors 1 and
    angle 0, see jitter_values). x is a pixel's RGB column, mu the image's per-channel mean; the last
    column of A and D is zero (the [M | T] form of fn.coord_transform). Brightness (b I), saturation
    (s I + (1 - s) J, J the grey projection) and hue (a rotation about the grey axis) are linear in the
    pixel. Contrast, ``c x + (1 - c) grey(mean)``, scales the pixel by c and maps the image mean by
    c I + (1 - c) J. A is the product of the pixel maps and C of the mean maps, both in the drawn
    order, then grayscale (J) if it fires; then ``out = A x + (C - A) mu`` and D = C - A.
    """
    b, c, s, theta = (np.asarray(v, np.float64).reshape(-1) for v in (b, c, s, theta))
    n = len(b)
    eye = np.broadcast_to(np.eye(3), (n, 3, 3))
    grey = np.broadcast_to(GREY, (n, 3, 3))
    col = lambda f: f[:, None, None]  # noqa: E731  (N,) -> (N, 1, 1)
    saturation = col(s) * eye + col(1.0 - s) * grey
    hue = grey_axis_rotation(theta)
    pixel_ops = np.stack([col(b) * eye, col(c) * eye, saturation, hue], axis=1)  # (N, 4, 3, 3), by op number
    mean_ops = np.stack([col(b) * eye, col(c) * eye + col(1.0 - c) * grey, saturation, hue], axis=1)

    orders = np.array(ORDERS)[np.asarray(order).reshape(-1)]  # (N, 4)
    rows = np.arange(n)
    a, m = eye.copy(), eye.copy()
    for j in range(4):
        a = pixel_ops[rows, orders[:, j]] @ a
        m = mean_ops[rows, orders[:, j]] @ m

    g = np.where(col(np.asarray(gray, bool).reshape(-1)), grey, eye)
    a, m = g @ a, g @ m
    return _affine(a), _affine(m - a)


def _affine(m: np.ndarray) -> np.ndarray:
    """(N, 3, 3) -> float32 (N, 3, 4) with a zero translation column."""
    return np.concatenate([m, np.zeros((len(m), 3, 1))], axis=2).astype(np.float32)
