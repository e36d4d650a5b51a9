"""Dataset index, file validation and the demo dataset.

Command line::

    python -m byol_fast.data index DATA [--workers N] [--max-pixels N] [--no-cache]
    python -m byol_fast.data demo OUT [--seed S] [--size PX] ...

``index`` scans and checks an image folder (an ImageFolder class tree or a flat folder), writes its
index and a report of the files left out, and prints a summary. ``demo`` writes the synthetic demo
dataset (an ImageFolder of JPEGs with train/ and val/) unless it is already there. Mistakes exit 2
with a one-line error.

The code lives in the modules; import from them, not from here:

- byol_fast.index: DatasetError, Index, build_index, load_index, checked_index (the dataset index,
  its layouts and cache; byol_fast.index_file: the saved index file and its report).
- byol_fast.image_check: check_image (one file) and check_all (many, in parallel).
- byol_fast.demo_data: make_demo_dataset, ensure_demo_dataset, demo_image.
"""
from __future__ import annotations

import argparse
import sys

from .demo_data import DEMO_DEFAULTS, ensure_demo_dataset
from .image_check import MAX_PIXELS
from .index import DatasetError, build_index


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index", help="scan and check an image folder; write its index and report")
    idx.add_argument("data", help="ImageFolder tree (class folders) or flat folder of images")
    idx.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    idx.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="skip larger images")
    idx.add_argument("--no-cache", action="store_true", help="decode everything; write nothing")
    demo = sub.add_parser("demo", help="write the synthetic demo dataset (ImageFolder of JPEGs)")
    demo.add_argument("out", help="folder to create (train/ and val/ inside)")
    for name, default in DEMO_DEFAULTS.items():
        demo.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a user mistake, with a one-line error)."""
    args = _parse_args(argv)
    try:
        (_index_command if args.command == "index" else _demo_command)(args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _index_command(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise DatasetError(f"--workers must be >= 0, got {args.workers}")
    if args.max_pixels <= 0:
        raise DatasetError(f"--max-pixels must be > 0, got {args.max_pixels}")
    index = build_index(args.data, workers=args.workers, cache=not args.no_cache, max_pixels=args.max_pixels)
    print(index.summary())


def _demo_command(args: argparse.Namespace) -> None:
    params = {k: getattr(args, k) for k in DEMO_DEFAULTS}
    root = ensure_demo_dataset(args.out, **params)
    print(f"demo dataset ready: {root} (train/ and val/, {params['num_classes']} classes)")


if __name__ == "__main__":
    sys.exit(main())
