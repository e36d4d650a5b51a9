"""The demo dataset: a small synthetic ImageFolder of real JPEGs; same seed, same bytes.

Ten texture families (DEMO_CLASSES), one a class, drawn by :func:`demo_image`; make_demo_dataset
writes ``train/`` and ``val/`` splits and a ``demo.json`` manifest of the parameters;
ensure_demo_dataset makes it only when missing (``python -m byol_fast.data demo OUT``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from byol_fast.constants import LUMA
from byol_fast.errors import DatasetError

# One texture family per class. Colours, phase, scale, position and a wobble are random per image,
# so only the geometry tells classes apart; it survives crops (textures repeat), colour jitter and
# grayscale (foreground and background differ in luminance) and flips (diagonals go both ways).
DEMO_CLASSES = (
    "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "polka_dots",
    "concentric_rings", "radial_spokes", "smooth_blobs", "crosshatch", "mosaic",
)
DEMO_MANIFEST = "demo.json"
JPEG_QUALITY = 90

# The parameters of make_demo_dataset and their defaults (also the options of the demo command).
DEMO_DEFAULTS = dict(num_classes=8, train_per_class=64, val_per_class=64, size=112, seed=0)


def _soft_square(s: np.ndarray, sharpness: float) -> np.ndarray:
    """A sine wave pushed towards a square wave, in [0, 1]."""
    return 0.5 + 0.5 * np.tanh(sharpness * s) / np.tanh(sharpness)


def _rotated(x, y, degrees):
    a = np.deg2rad(degrees)
    return x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)


def _stripes(rng, x, y, degrees):
    u, _ = _rotated(x, y, degrees + rng.uniform(-10, 10))
    period, phase, sharpness = rng.uniform(7, 16), rng.uniform(0, 2 * np.pi), rng.uniform(1, 4)
    return _soft_square(np.sin(2 * np.pi * u / period + phase), sharpness)


def _checkerboard(rng, x, y):
    u, v = _rotated(x, y, rng.uniform(-15, 15))
    p = rng.uniform(8, 18)
    return _soft_square(np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p), 4.0)


def _polka_dots(rng, x, y):
    u, v = _rotated(x, y, rng.uniform(0, 90))
    p = rng.uniform(10, 20)
    du, dv = (u / p + rng.random()) % 1 - 0.5, (v / p + rng.random()) % 1 - 0.5
    d = np.hypot(du, dv) * p
    return np.clip(rng.uniform(0.2, 0.35) * p - d + 0.5, 0, 1)


def _rings(rng, x, y, size):
    cx, cy = rng.uniform(-0.3, 1.3, 2) * size
    return _soft_square(np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / rng.uniform(7, 15)), 3.0)


def _spokes(rng, x, y, size):
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    return _soft_square(np.sin(rng.integers(6, 14) * np.arctan2(y - cy, x - cx) + rng.uniform(0, 6.3)), 3.0)


def _blobs(rng, x, y):
    g = int(rng.integers(3, 7))
    field_ = Image.fromarray(rng.random((g, g), dtype=np.float32), mode="F")
    smooth = np.asarray(field_.resize((x.shape[1], x.shape[0]), Image.Resampling.BICUBIC))
    return _soft_square(smooth - np.median(smooth), 12.0)


def _crosshatch(rng, x, y):
    u, v = _rotated(x, y, rng.uniform(-20, 20))
    p, width = rng.uniform(10, 18), rng.uniform(0.8, 1.6)
    du, dv = ((u / p) % 1 - 0.5) * p, ((v / p) % 1 - 0.5) * p
    return np.maximum(np.exp(-du**2 / (2 * width**2)), np.exp(-dv**2 / (2 * width**2)))


def _mosaic(rng, x, y):
    b = int(rng.integers(8, 17))
    h, w = x.shape
    cells = rng.random((h // b + 2, w // b + 2))
    oy, ox = rng.integers(0, b, 2)
    return np.repeat(np.repeat(cells, b, 0), b, 1)[oy:oy + h, ox:ox + w]


def _pattern(name: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Texture ``name`` on pixel coordinates (x, y); values in [0, 1]."""
    makers = {
        "horizontal_stripes": lambda: _stripes(rng, x, y, 90),
        "vertical_stripes": lambda: _stripes(rng, x, y, 0),
        "diagonal_stripes": lambda: _stripes(rng, x, y, rng.choice([45, 135])),
        "checkerboard": lambda: _checkerboard(rng, x, y),
        "polka_dots": lambda: _polka_dots(rng, x, y),
        "concentric_rings": lambda: _rings(rng, x, y, size),
        "radial_spokes": lambda: _spokes(rng, x, y, size),
        "smooth_blobs": lambda: _blobs(rng, x, y),
        "crosshatch": lambda: _crosshatch(rng, x, y),
        "mosaic": lambda: _mosaic(rng, x, y),
    }
    return makers[name]()


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random background/foreground RGB whose luminance differs, so grayscale keeps the pattern."""
    luma = np.array(LUMA)
    while True:
        bg, fg = rng.random(3), rng.random(3)
        if abs((fg - bg) @ luma) >= 0.3:
            return bg, fg


def demo_image(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One demo image of class ``name``: uint8 array (size, size, 3)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    # A gentle wobble of the coordinates, so lines are not ruler-straight.
    amp, wave = rng.uniform(0, 2.5), rng.uniform(30, 80)
    x_w = x + amp * np.sin(2 * np.pi * y / wave + rng.uniform(0, 6.3))
    y_w = y + amp * np.sin(2 * np.pi * x / wave + rng.uniform(0, 6.3))
    p = _pattern(name, rng, x_w, y_w, size)[..., None]
    bg, fg = _two_colours(rng)
    img = bg + (fg - bg) * p
    # Uneven lighting and sensor-like noise.
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    img = img * (1 + gx * (x / size - 0.5) + gy * (y / size - 0.5))[..., None]
    img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _demo_params(num_classes, train_per_class, val_per_class, size, seed) -> dict:
    """The manifest (demo.json) of a dataset made with these parameters. "generator" keeps the
    function's old path, byol_fast.data: existing demo.json files hold it and must still match."""
    return {"generator": "byol_fast.data.make_demo_dataset", "version": 1, "num_classes": num_classes,
            "train_per_class": train_per_class, "val_per_class": val_per_class, "size": size, "seed": seed,
            "classes": list(DEMO_CLASSES[:num_classes])}


def make_demo_dataset(root: str | os.PathLike, num_classes: int = 8, train_per_class: int = 64,
                      val_per_class: int = 64, size: int = 112, seed: int = 0) -> Path:
    """Write a small synthetic ImageFolder dataset of real JPEGs; return its root.

    Layout: ``root/train/<class>/<class>_NNNN.JPEG``, ``root/val/<class>/...`` and
    ``root/demo.json`` (the parameters). Classes are texture families (DEMO_CLASSES, first
    ``num_classes``); images are ``size`` x ``size`` RGB, JPEG quality 90. Same seed, same bytes.
    Defaults: 512 train + 512 val images, about 8 MB.
    Built in a temporary sibling folder and renamed into place, so ``root`` is complete or absent.
    """
    if not 1 <= num_classes <= len(DEMO_CLASSES):
        raise DatasetError(f"num_classes must be 1..{len(DEMO_CLASSES)}, got {num_classes}")
    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"demo dataset folder already exists and is not empty: {root}")
    params = _demo_params(num_classes, train_per_class, val_per_class, size, seed)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            for label, name in enumerate(params["classes"]):
                _write_demo_class(tmp / split / name, name, count, size, (seed, split_id, label))
        (tmp / DEMO_MANIFEST).write_text(json.dumps(params, indent=1) + "\n")
        if root.exists():
            root.rmdir()  # empty (checked above); rename cannot replace a folder on every platform
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_demo_class(folder: Path, name: str, count: int, size: int, key: tuple[int, int, int]) -> None:
    """``count`` JPEGs of one class; image i draws from its own seed, so subsets agree across counts."""
    folder.mkdir(parents=True)
    for i in range(count):
        rng = np.random.default_rng([*key, i])
        # Fixed quality, no EXIF, no timestamps in the file: identical bytes on every run.
        image = Image.fromarray(demo_image(name, rng, size))
        image.save(folder / f"{name}_{i:04d}.JPEG", quality=JPEG_QUALITY)


def ensure_demo_dataset(root: str | os.PathLike, **params) -> Path:
    """The demo dataset at ``root``, made (make_demo_dataset(root, **params)) only if missing.

    A folder that exists but was made with other parameters, or is not a demo dataset, is an error
    (never overwritten).
    """
    root = Path(root).absolute()
    manifest = root / DEMO_MANIFEST
    if not manifest.exists():
        try:
            return make_demo_dataset(root, **params)
        except OSError:
            if not manifest.exists():  # another process may have just finished the same rename
                raise
    wanted = _demo_params(**{**DEMO_DEFAULTS, **params})
    found = json.loads(manifest.read_text())
    if found != wanted:
        raise DatasetError(f"{root} holds a demo dataset made with other parameters ({found}); "
                           f"delete it or choose another folder")
    return root
