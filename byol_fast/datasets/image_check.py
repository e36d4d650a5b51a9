"""Checking image files before DALI sees them: one file (check_image), many in parallel (check_all).

DALI cannot skip a sample: one corrupt or truncated file stops a pipeline with a critical error
(docs/reference.md section 3). So the data path never hands DALI a file it has not seen
decode: every file is decoded here on the CPU, and a file that fails gets a reason instead of a kind.

What a file *is* comes from its content, not its name: ImageNet holds a PNG named ``.JPEG``, CMYK
and grayscale JPEGs (docs/reference.md section 3), all of which DALI decodes, so they pass and
their kind is recorded (``"PNG:RGB"``, ``"JPEG:CMYK"``). A reason starts with its category (see
check_image), which reason_category extracts.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import warnings

from PIL import Image

from byol_fast.runtime.progress import Progress

# Container formats (as PIL names them) that DALI's image decoder reads. MPO is a JPEG with extra
# frames appended (camera files); decoders read its first JPEG frame. GIF is not in DALI's list.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "PPM", "TIFF", "WEBP", "JPEG2000"})

# The budget of one image is what its decode allocates, judged from the header before any pixel is
# decoded (a 300 KB PNG may say 10,000 x 10,000: 300 MB decoded, per image of a batch). DALI's
# decoder writes height x width x 3 bytes (RGB, uint8), and goes through as many channels as the
# file has when that is more (CMYK, RGBA: 4).
DECODED_CHANNELS = 3
# 64 MP of RGB: above ImageNet's largest images (about 6000 x 6000 = 36 MP, 108 MB decoded) with
# room to spare, and below PIL's own decompression-bomb error (2 x Image.MAX_IMAGE_PIXELS = 179 MP).
MAX_DECODED_BYTES = 192_000_000
# The same budget counted in RGB pixels: what ``max_pixels`` (and ``--max-pixels``) set; an image
# may take max_pixels x DECODED_CHANNELS bytes decoded.
MAX_PIXELS = MAX_DECODED_BYTES // DECODED_CHANNELS

# Below this many files to decode, process start-up costs more than it saves.
POOL_MIN_FILES = 64


# ------------------------------------------------------------------------------ checking one file


def check_image(path: str, max_pixels: int = MAX_PIXELS) -> tuple[bool, str]:
    """Decode one file fully; return ``(True, kind)`` or ``(False, reason)``. Never raises.

    kind is ``"<FORMAT>:<MODE>"`` with ``":progressive"`` for progressive JPEGs, e.g. ``"JPEG:RGB"``,
    ``"JPEG:CMYK"``, ``"JPEG:L:progressive"``, ``"PNG:RGBA"``. reason starts with a category
    (``empty file``, ``unreadable``, ``missing``, ``not an image``, ``unsupported format``,
    ``too large``, ``truncated``, ``corrupt``), then ``": "`` and details. ``too large``: the
    decoded bytes (:func:`decoded_bytes`, from the header) are over ``max_pixels x DECODED_CHANNELS``;
    such a file is never decoded.
    """
    try:
        if os.path.getsize(path) == 0:
            return False, "empty file: 0 bytes"
        # Very large images make PIL warn; the size is judged below against max_pixels instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return _decode_opened(img, max_pixels)
    except Image.DecompressionBombError as e:
        return False, f"too large: {e}"
    except PermissionError:
        return False, "unreadable: permission denied"
    except FileNotFoundError:
        return False, "missing: file or link target not found"
    except Image.UnidentifiedImageError:
        return False, "not an image: no known image format in the content"
    except OSError as e:
        if "truncated" in str(e).lower():
            return False, f"truncated: {e}"
        return False, f"corrupt: OSError: {e}"
    except Exception as e:  # noqa: BLE001  PIL plugins raise many types on bad data; none may stop the scan
        return False, f"corrupt: {type(e).__name__}: {e}"


def _decode_opened(img: Image.Image, max_pixels: int) -> tuple[bool, str]:
    """Check format and size from the header, then decode every byte of the pixel data."""
    fmt, (width, height) = img.format, img.size
    if fmt not in DALI_FORMATS:
        return False, f"unsupported format: {fmt} (DALI cannot decode it)"
    need, budget = decoded_bytes(width, height, img.mode), max_pixels * DECODED_CHANNELS
    if need > budget:
        return False, (f"too large: {width}x{height} {img.mode} decodes to {need:,} bytes, over the budget of "
                       f"{budget:,} (max_pixels {max_pixels:,} x {DECODED_CHANNELS} channels)")
    kind = f"{fmt}:{img.mode}" + (":progressive" if img.info.get("progressive") else "")
    # JPEG only: decode at 1/8 scale. Every entropy-coded byte is still decoded (so truncation and
    # broken scans are still caught); only the inverse DCT shrinks, which is most of the cost.
    img.draft(None, (max(1, width // 8), max(1, height // 8)))
    img.load()
    img.convert("RGB")  # the pipeline wants 3 channels; CMYK, palette and 16-bit must convert
    return True, kind


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Bytes the decoder allocates for one image of this size and PIL mode: DECODED_CHANNELS bytes a
    pixel, or one a channel when the file has more channels than that."""
    try:
        channels = Image.getmodebands(mode)
    except (KeyError, ValueError):  # a mode PIL cannot name the bands of: count the most there are
        channels = 4
    return width * height * max(DECODED_CHANNELS, channels)


def reason_category(reason: str) -> str:
    """The part of a skip reason before the first colon: what the summary counts by."""
    return reason.split(":", 1)[0]


# ------------------------------------------------------------------------------ decoding in parallel


def _cpu_count() -> int:
    """Cores this process may use (respects taskset/SLURM affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_all(paths: list[str], max_pixels: int, workers: int,
              progress: Progress) -> list[tuple[bool, str]]:
    """check_image over ``paths``, in order; in worker processes when that pays off."""
    workers = workers or _cpu_count()
    check = functools.partial(check_image, max_pixels=max_pixels)
    results: list[tuple[bool, str]] = []
    if workers == 1 or len(paths) < POOL_MIN_FILES:
        for path in paths:
            results.append(check(path))
            progress.update(len(results))
    else:
        # spawn, not fork: the caller may already run DALI or CUDA threads, which fork breaks.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(256, len(paths) // (workers * 16)))
        with ctx.Pool(min(workers, len(paths))) as pool:
            for result in pool.imap(check, paths, chunksize=chunk):
                results.append(result)
                progress.update(len(results))
    progress.update(len(results), final=True)
    return results
