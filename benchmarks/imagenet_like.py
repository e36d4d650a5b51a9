"""ImageNet-like JPEGs for throughput benchmarks: what decoding and augmenting real photos cost.

A loader benchmark is only as honest as its files. White noise compresses badly and decodes
slowly; flat colours compress to nothing and decode fast; neither costs what a photo costs. These
images mimic ImageNet's training set where it matters to a loader (docs/reference.md section 2):

- size: about 400 x 350 pixels on average, mostly landscape 4:3 and 3:2 with a long side of 500
  (as ImageNet's Flickr images are), some portrait, some smaller, a few larger;
- bytes: about 110 KB on average at JPEG quality 80-95 with 4:2:0 chroma subsampling, spread
  over a factor of a few between images (the "detail" of each image is random);
- content: a smooth illumination gradient, a low-frequency colour field, a 1/f multi-octave
  texture (scales from a quarter of the image down to 2 pixels), a handful of objects with hard
  or soft edges and their own textures, and fine sensor grain; colour channels are correlated
  (mostly luminance detail, weaker chroma), as in photos. Not white noise.

Deterministic: image ``i`` of seed ``s`` draws from its own generator ``default_rng([s, i])``,
so the same arguments give the same bytes, and a larger set starts with the smaller one's files.

Layout ``root/train/<class>/<class>_NNNNNN.JPEG`` (an ImageFolder tree, so linear evaluation can
read it too) plus ``root/imagenet_like.json`` with the parameters and the measured statistics.

Command line::

    python benchmarks/imagenet_like.py [--num-images 4000] [--out bench_data] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GENERATOR_VERSION = 1
MANIFEST = "imagenet_like.json"
FINE = 5.0  # amplitude of the octaves of 8 pixels and finer, before the per-image detail factor
QUALITY = (90, 96)  # JPEG quality, uniform; ImageNet's Flickr JPEGs are mostly about 90
GRAIN = 0.04  # sensor noise, as a fraction of full scale, before the per-image detail factor
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "bench_data"


# ------------------------------------------------------------------------------ one image


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): ImageNet-like mix; mean about 400 x 350 over many draws."""
    r = rng.random()
    if r < 0.55:  # the common Flickr case: long side 500, 4:3 or 3:2
        long_side = 500
    elif r < 0.97:  # smaller images, long side 180-500
        long_side = int(rng.uniform(180, 500))
    else:  # a few large ones (ImageNet's tail reaches thousands of pixels)
        long_side = int(rng.uniform(600, 1200))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, rng.uniform(1.0, 2.0)], p=[0.5, 0.25, 0.1, 0.15])
    short_side = max(64, int(round(long_side / aspect)))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def _field(rng: np.random.Generator, w: int, h: int, cell: float, channels: int) -> np.ndarray:
    """Smooth random field (h, w, channels), roughly unit variance, features about ``cell`` pixels wide.

    Random values on a coarse grid, upsampled bicubically: the building block of every octave.
    """
    gw, gh = max(2, int(np.ceil(w / cell)) + 1), max(2, int(np.ceil(h / cell)) + 1)
    out = np.empty((h, w, channels), np.float32)
    for c in range(channels):
        coarse = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32), mode="F")
        out[..., c] = np.asarray(coarse.resize((w, h), Image.BICUBIC))
    return out


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A photo-like RGB colour in [0, 1]: moderately saturated, any hue."""
    grey = rng.uniform(0.25, 0.75)
    tint = rng.normal(0, 0.15, 3)
    return np.clip(grey + tint - tint.mean(), 0.02, 0.98).astype(np.float32)


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bicubic resize of a float32 (rows, cols) array to (h, w)."""
    return np.asarray(Image.fromarray(a, mode="F").resize((w, h), Image.BICUBIC))


def _texture(rng: np.random.Generator, w: int, h: int, detail: float) -> np.ndarray:
    """1/f multi-octave luminance texture (h, w, 1), built coarse to fine like a Laplacian pyramid.

    Octaves from a quarter of the image down to 2 pixels, each random values on a grid of that
    pitch; the sum so far is upsampled to the next grid and the next octave added, so the whole
    texture costs about one and a third full-size resizes. ``detail`` scales the octaves of 8
    pixels and finer, which set most of the JPEG's bytes and of its decoding cost.
    """
    cell = max(w, h) / 4
    acc = None
    while cell >= 2:
        gw, gh = max(2, int(np.ceil(w / cell))), max(2, int(np.ceil(h / cell)))
        amp = 0.06 * (cell / 64) ** 0.15 * (detail * FINE if cell <= 8 else 1.0)
        octave = amp * rng.standard_normal((gh, gw), dtype=np.float32)
        acc = octave if acc is None else _resize(acc, gw, gh) + octave
        cell /= 2
    return _resize(acc, w, h)[..., None]


def _object_mask(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """One shape (ellipse, polygon or rectangle, hard or soft edges) as a float mask in [0, 1]
    (rows, cols, 1) over its bounding box (x0, y0, x1, y1); None if it falls outside the image."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    rx, ry = rng.uniform(0.05, 0.4) * w, rng.uniform(0.05, 0.4) * h
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == 1:
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(0.4, 1.0, n)
        draw.polygon([(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    else:
        draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    box = mask.getbbox()
    if box is None:
        return None
    if rng.random() < 0.5:  # out-of-focus edge: blur the box and a margin of three sigmas
        sigma = rng.uniform(0.5, 4.0)
        pad = int(np.ceil(3 * sigma))
        box = (max(0, box[0] - pad), max(0, box[1] - pad), min(w, box[2] + pad), min(h, box[3] + pad))
        return np.asarray(mask.crop(box).filter(ImageFilter.GaussianBlur(sigma)), np.float32)[..., None] / 255, box
    return np.asarray(mask.crop(box), np.float32)[..., None] / 255, box


def imagenet_like_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One image: uint8 array (height, width, 3). See the module docstring for its layers."""
    w, h = width, height
    detail = float(np.exp(rng.normal(0.0, 0.4)))  # per-image richness: spreads file sizes
    # A few textures per image, shared by background and objects (shifted, scaled, mirrored),
    # so the cost of making an image does not grow with its number of objects.
    # Colour varies slowly (photos carry little fine chroma): one chroma field for the image.
    chroma = 0.06 * _field(rng, w, h, max(w, h) / 2, 3)
    textures = [_texture(rng, w, h, detail * rng.uniform(0.5, 1.5)) + 0.3 * chroma for _ in range(3)]
    img = _colour(rng) + chroma + textures[0]
    for _ in range(int(rng.integers(3, 12))):  # objects, back to front, composited in their box
        shape = _object_mask(rng, w, h)
        if shape is None:
            continue
        m, (x0, y0, x1, y1) = shape
        rows = (np.arange(y0, y1) + rng.integers(h)) % h
        cols = (np.arange(x0, x1) + rng.integers(w)) % w
        if rng.random() < 0.5:
            cols = cols[::-1]
        obj = _colour(rng) + np.float32(rng.uniform(0.5, 1.5)) * textures[int(rng.integers(3))][np.ix_(rows, cols)]
        if rng.random() < 0.3:  # a regular pattern: stripes, fabric, fences
            angle, period = rng.uniform(0, np.pi), rng.uniform(3, 25)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
            obj += np.float32(rng.uniform(0.05, 0.2)) * wave[..., None]
        region = img[y0:y1, x0:x1]
        region += m * (obj - region)
    # Illumination: a gradient in a random direction, then sensor grain.
    angle = rng.uniform(0, 2 * np.pi)
    ramp_x = (np.arange(w, dtype=np.float32) - w / 2) * np.float32(np.cos(angle) / max(w, h))
    ramp_y = (np.arange(h, dtype=np.float32) - h / 2) * np.float32(np.sin(angle) / max(w, h))
    img *= 1 + np.float32(rng.uniform(0.1, 0.6)) * (ramp_y[:, None, None] + ramp_x[None, :, None])
    img += rng.normal(0, GRAIN * detail, (h, w, 1)).astype(np.float32)
    # Highlight and shadow roll-off (slope 1 at mid-grey) instead of a hard clip, which would
    # flatten a tenth of the pixels and their detail.
    img = 0.5 + 0.5 * np.tanh(2 * (img - 0.5))
    return (img * 255 + 0.5).astype(np.uint8)


def write_image(path: Path, seed: int, index: int) -> tuple[int, int, int]:
    """Draw image ``index`` of ``seed`` and save it as JPEG; return (width, height, bytes)."""
    rng = np.random.default_rng([seed, index])
    w, h = image_size(rng)
    quality = int(rng.integers(QUALITY[0], QUALITY[1] + 1))
    # No EXIF and no timestamps: the same bytes on every run.
    Image.fromarray(imagenet_like_image(rng, w, h)).save(path, quality=quality, subsampling="4:2:0")
    return w, h, path.stat().st_size


# ------------------------------------------------------------------------------ a dataset


def _params(num_images: int, num_classes: int, seed: int) -> dict:
    return {"generator": "benchmarks/imagenet_like.py", "version": GENERATOR_VERSION,
            "num_images": num_images, "num_classes": num_classes, "seed": seed}


def dataset_root(out: str | os.PathLike, num_images: int, seed: int = 0) -> Path:
    """The folder a set of these parameters lives in, so sets of different sizes coexist."""
    return Path(out).absolute() / f"imagenet_like_n{num_images}_s{seed}_v{GENERATOR_VERSION}"


def _work(job: tuple[str, int, int]) -> tuple[int, int, int]:
    path, seed, index = job
    return write_image(Path(path), seed, index)


def make_dataset(out: str | os.PathLike = DEFAULT_ROOT, num_images: int = 4000, num_classes: int = 10,
                 seed: int = 0, workers: int = 0, progress: bool = True) -> Path:
    """Generate (or reuse) ``num_images`` JPEGs; return the dataset root (its ``train`` is the tree).

    Reuses a complete earlier set with the same parameters; otherwise writes into a temporary
    sibling folder and renames it into place, so the root is complete or absent.
    """
    root = dataset_root(out, num_images, seed)
    params = _params(num_images, num_classes, seed)
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            if {k: v for k, v in json.loads(manifest.read_text()).items() if k in params} == params:
                return root
        except (OSError, ValueError):
            pass
        shutil.rmtree(root)
    tmp = root.with_name(f".{root.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []
    for i in range(num_images):
        folder = tmp / "train" / f"class_{i % num_classes:03d}"
        jobs.append((str(folder / f"class_{i % num_classes:03d}_{i:06d}.JPEG"), seed, i))
    for c in range(min(num_classes, num_images)):
        (tmp / "train" / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    workers = workers or len(os.sched_getaffinity(0))
    start, stats = time.perf_counter(), []
    try:
        with multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
            for n, stat in enumerate(pool.imap(_work, jobs, chunksize=8), 1):
                stats.append(stat)
                if progress and (n % 250 == 0 or n == num_images):
                    rate = n / (time.perf_counter() - start)
                    print(f"  generated {n}/{num_images} images ({rate:.0f}/s)", file=sys.stderr, flush=True)
        arr = np.array(stats, dtype=np.float64)
        summary = {**params, "mean_width": round(arr[:, 0].mean(), 1), "mean_height": round(arr[:, 1].mean(), 1),
                   "mean_kb": round(arr[:, 2].mean() / 1000, 1), "median_kb": round(float(np.median(arr[:, 2])) / 1000, 1),
                   "min_kb": round(arr[:, 2].min() / 1000, 1), "max_kb": round(arr[:, 2].max() / 1000, 1),
                   "total_mb": round(arr[:, 2].sum() / 1e6, 1)}
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=1) + "\n")
        root.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def describe(root: str | os.PathLike) -> dict:
    """The manifest of a generated set: parameters and size statistics."""
    return json.loads((Path(root) / MANIFEST).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=4000)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--out", default=str(DEFAULT_ROOT), help="parent folder (default: bench_data/, git-ignored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes (0: every core)")
    args = p.parse_args(argv)
    root = make_dataset(args.out, args.num_images, args.num_classes, args.seed, args.workers)
    print(root)
    print(json.dumps(describe(root), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
