"""Colour jitter and grayscale as per-image 3x3 matrices, in numpy (no DALI needed to test them).

Brightness, saturation, hue (a rotation about the grey axis) and grayscale are linear maps of a
pixel's RGB vector; contrast blends towards the image's grey mean. Composed in the drawn order they
give, per image, ``out = A x + D mu`` with mu the image's per-channel mean. :func:`colour_matrices`
builds A and D from uniform draws; the DALI graph (``pipelines.pretrain``) draws the uniforms and
applies the matrices. Why the hue is a rotation and where this departs from torchvision: the
docstring of ``pipelines.pretrain``.
"""
from __future__ import annotations

import numpy as np

from byol_fast.config import ViewConfig
from byol_fast.constants import LUMA

# Columns of the per-sample uniform draw that decides a view's colour ops (see colour_matrices).
JITTER_FIRE, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(5)
ORDER = slice(5, 9)  # four uniforms whose argsort is the order of (brightness, contrast, saturation, hue)
GRAY_FIRE = 9
NUM_UNIFORMS = 10


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
