"""The dense demo: images made of several texture regions of the demo's classes, with their masks.

Each image is split into ``regions`` Voronoi cells around random points; each cell shows a texture of
another class (byol_fast.datasets.demo.demo_image, the demo's families and colours), so that telling
pixels apart needs what the classification demo teaches, at the pixel level. Same seed, same bytes.

Layout (ImageFolder-like): ``root/{train,val}/images/NNNN.png``, ``root/{train,val}/masks/NNNN.png``
(one uint8 class index per pixel) and ``root/segmentation.json`` (the parameters and the classes).
``python -m byol_fast.data demo-seg OUT``; read back by :func:`read_split`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from byol_fast.datasets.demo import DEMO_CLASSES, demo_image
from byol_fast.errors import DatasetError

MANIFEST = "segmentation.json"
SEG_DEFAULTS = dict(num_classes=8, train_images=96, val_images=48, size=112, regions=3, seed=0)


def segmentation_image(rng: np.random.Generator, classes: list[str], size: int, regions: int):
    """(uint8 image (size, size, 3), uint8 mask (size, size)): Voronoi cells, a texture class each."""
    picked = rng.choice(len(classes), size=regions, replace=False)
    centres = rng.uniform(0, size, (regions, 2))
    y, x = np.mgrid[0:size, 0:size]
    cell = np.argmin((x[..., None] - centres[:, 0]) ** 2 + (y[..., None] - centres[:, 1]) ** 2, axis=-1)
    image = np.zeros((size, size, 3), np.uint8)
    for r, label in enumerate(picked):
        image[cell == r] = demo_image(classes[label], rng, size)[cell == r]
    return image, picked[cell].astype(np.uint8)


def make_segmentation_demo(root: str | os.PathLike, num_classes: int = 8, train_images: int = 96,
                           val_images: int = 48, size: int = 112, regions: int = 3, seed: int = 0) -> Path:
    """Write the dense demo dataset at ``root`` (new or empty); return it. Built in a temporary
    sibling folder and renamed into place, so ``root`` is complete or absent."""
    if not 2 <= regions <= num_classes <= len(DEMO_CLASSES):
        raise DatasetError(f"need 2 <= regions <= num_classes <= {len(DEMO_CLASSES)}")
    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root}: already exists and is not empty")
    classes = list(DEMO_CLASSES[:num_classes])
    params = {"generator": "byol_fast.demo_segmentation", "version": 1, "num_classes": num_classes,
              "train_images": train_images, "val_images": val_images, "size": size, "regions": regions,
              "seed": seed, "classes": classes}
    tmp = root.with_name(f".{root.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split_id, (split, count) in enumerate((("train", train_images), ("val", val_images))):
            (tmp / split / "images").mkdir(parents=True)
            (tmp / split / "masks").mkdir(parents=True)
            for i in range(count):
                image, mask = segmentation_image(np.random.default_rng([seed, split_id, i]), classes, size, regions)
                Image.fromarray(image).save(tmp / split / "images" / f"{i:04d}.png")
                Image.fromarray(mask).save(tmp / split / "masks" / f"{i:04d}.png")
        (tmp / MANIFEST).write_text(json.dumps(params, indent=1) + "\n")
        if root.exists():
            root.rmdir()
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, H, W, 3), masks int64 (N, H, W), classes) of ``root/split``; a DatasetError
    naming what is missing or mismatched."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: missing (make one with python -m byol_fast.data demo-seg OUT)")
    classes = json.loads(manifest.read_text())["classes"]
    names = sorted(p.name for p in (root / split / "images").glob("*.png"))
    if not names:
        raise DatasetError(f"{root / split / 'images'}: no PNG images")
    images, masks = [], []
    for name in names:
        mask_path = root / split / "masks" / name
        if not mask_path.is_file():
            raise DatasetError(f"{mask_path}: missing (the mask of images/{name})")
        images.append(np.asarray(Image.open(root / split / "images" / name).convert("RGB")))
        masks.append(np.asarray(Image.open(mask_path)))
        if masks[-1].shape != images[-1].shape[:2]:
            raise DatasetError(f"{mask_path}: {masks[-1].shape} pixels, its image {images[-1].shape[:2]}")
    return np.stack(images), np.stack(masks).astype(np.int64), classes
