"""Dataset commands: index and check an image folder, pack and verify tar shards, write the demo datasets.

Command line::

    python -m byol_fast.data index DATA [--workers N] [--max-pixels N] [--no-cache] [--labels FILE]
    python -m byol_fast.data demo OUT [--seed S] [--size PX] ...
    python -m byol_fast.data shards SRC OUT [--shard-size 1GB] [--workers N] [--seed S]
    python -m byol_fast.data verify SHARDS
    python -m byol_fast.data demo-seg OUT [--seed S] ...

``index`` scans and checks an image folder (an ImageFolder class tree or a flat folder), writes its
index and a report of the files left out, and prints a summary; a flat folder takes its labels from
a label file beside it (ImageNet's devkit, Kaggle's CSV, an mmpretrain list) or named by
``--labels`` (byol_fast.datasets.label_files), mapped to the classes of the ``train/`` beside it.
``demo`` writes the synthetic demo dataset (an ImageFolder of JPEGs with train/ and val/) unless
it is already there. ``shards`` packs an image folder (indexed first, or its index reused) or an
index file into tar shards (byol_fast.datasets.shard_pack); a root holding train/ and val/ becomes
OUT/train and OUT/val.
``verify`` reads every byte of a shard set (a folder or ``s3://bucket/prefix``; both splits of a
root holding train/ and val/) against its manifest (byol_fast.datasets.shard_set.verify).
``demo-seg`` writes the dense demo (texture regions and their masks,
byol_fast.datasets.demo_segmentation) for ``python -m byol_fast.dense_probe``. Mistakes exit 2
with a one-line error.

The code lives in the modules; import from them, not from here:

- byol_fast.datasets.index: build_index, load_index, checked_index (the dataset index, its layouts
  and cache); byol_fast.datasets.samples: Index; byol_fast.datasets.index_file: the saved index file
  and its report; byol_fast.datasets.label_files: the label files of a flat folder;
  byol_fast.errors: DatasetError.
- byol_fast.datasets.image_check: check_image (one file) and check_all (many, in parallel).
- byol_fast.datasets.demo: make_demo_dataset, ensure_demo_dataset, demo_image.
- byol_fast.datasets.shard_pack: pack (an index into tar shards with DALI's index files and a manifest).
- byol_fast.datasets.shard_set: open_shard_set (opened and checked for reading), verify.
- byol_fast.datasets.demo_segmentation: make_segmentation_demo, read_split (the dense demo).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from byol_fast.datasets import object_store as store
from byol_fast.datasets.demo import DEMO_DEFAULTS, ensure_demo_dataset
from byol_fast.datasets.demo_segmentation import SEG_DEFAULTS, make_segmentation_demo
from byol_fast.datasets.image_check import MAX_PIXELS
from byol_fast.datasets.index import build_index, load_index
from byol_fast.datasets.shard_pack import pack, parse_size
from byol_fast.datasets.shard_set import is_shard_set, verify
from byol_fast.errors import DatasetError

SPLITS = ("train", "val")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index", help="scan and check an image folder; write its index and report")
    idx.add_argument("data", help="ImageFolder tree (class folders) or flat folder of images")
    idx.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    idx.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                     help="RGB pixels an image may decode to (its budget: this x 3 bytes); larger ones are reported")
    idx.add_argument("--no-cache", action="store_true", help="decode everything; write nothing")
    idx.add_argument("--labels", metavar="FILE", help="labels of a flat folder: the devkit's ground truth (or its "
                     "folder), Kaggle's LOC_val_solution.csv, or a 'path label' list (default: found beside DATA)")
    demo = sub.add_parser("demo", help="write the synthetic demo dataset (ImageFolder of JPEGs)")
    demo.add_argument("out", help="folder to create (train/ and val/ inside)")
    _int_options(demo, DEMO_DEFAULTS)
    shards = sub.add_parser("shards", help="pack an image folder or index file into tar shards (WebDataset layout)")
    shards.add_argument("src", help="ImageFolder tree, flat folder, a root holding train/ and val/, or an index file")
    shards.add_argument("out", help="new or empty folder for the shards (OUT/train and OUT/val for a split root)")
    shards.add_argument("--shard-size", default="1GB", help="largest shard (default 1GB; e.g. 500MB, 256MiB)")
    shards.add_argument("--workers", type=int, default=0, help="processes for indexing, threads for packing (0 = all cores)")
    shards.add_argument("--seed", type=int, default=0, help="the seeded order that mixes the classes")
    seg = sub.add_parser("demo-seg", help="write the dense demo: texture regions and their masks")
    seg.add_argument("out", help="new or empty folder (train/ and val/ inside)")
    _int_options(seg, SEG_DEFAULTS)
    check = sub.add_parser("verify", help="read every byte of a shard set and check it against its manifest")
    check.add_argument("shards", help="a shard set (folder or s3://bucket/prefix), or a root holding train/ and val/")
    return parser.parse_args(argv)


def _int_options(parser: argparse.ArgumentParser, defaults: dict[str, int]) -> None:
    """``--some-name N`` for each ``some_name`` of a generator's parameters, defaulting as it does."""
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a user mistake, with a one-line error)."""
    args = _parse_args(argv)
    try:
        {"index": _index_command, "demo": _demo_command, "shards": _shards_command,
         "verify": _verify_command, "demo-seg": _demo_seg_command}[args.command](args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _index_command(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise DatasetError(f"--workers must be >= 0, got {args.workers}")
    if args.max_pixels <= 0:
        raise DatasetError(f"--max-pixels must be > 0, got {args.max_pixels}")
    index = build_index(args.data, workers=args.workers, cache=not args.no_cache, max_pixels=args.max_pixels,
                        labels=args.labels)
    print(index.summary())


def _demo_command(args: argparse.Namespace) -> None:
    params = {k: getattr(args, k) for k in DEMO_DEFAULTS}
    root = ensure_demo_dataset(args.out, **params)
    print(f"demo dataset ready: {root} (train/ and val/, {params['num_classes']} classes)")


def _shards_command(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise DatasetError(f"--workers must be >= 0, got {args.workers}")
    shard_bytes, workers = parse_size(args.shard_size), args.workers or os.cpu_count() or 1
    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise DatasetError(f"{src}: no such file or folder")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise DatasetError(f"{out}: inside {src}; put the shards elsewhere (a later index of {src} would "
                           "take their folder for a class)")
    split_root = src.is_dir() and all((src / s).is_dir() for s in SPLITS)
    for source, dest in ([(src / s, out / s) for s in SPLITS] if split_root else [(src, out)]):
        index = load_index(source, workers=workers)
        manifest = pack(index, dest, shard_bytes, args.seed, workers)
        total = sum(s["bytes"] for s in manifest["shards"])
        print(f"{dest}: {manifest['num_samples']} images in {len(manifest['shards'])} shards, "
              f"{total / 1e6:.1f} MB at {manifest['packed_mb_per_s']} MB/s")


def _demo_seg_command(args: argparse.Namespace) -> None:
    root = make_segmentation_demo(args.out, **{k: getattr(args, k) for k in SEG_DEFAULTS})
    print(f"dense demo ready: {root} ({args.train_images} train / {args.val_images} val images with masks)")


def _verify_command(args: argparse.Namespace) -> None:
    root = args.shards
    sets = [root] if is_shard_set(root) else [store.join(root, s) for s in SPLITS if is_shard_set(store.join(root, s))]
    if not sets:
        raise DatasetError(f"{root}: not a shard set (no manifest.json), nor a root holding train/ and val/ shard sets")
    for path in sets:
        n = verify(path, progress=lambda tar, done: print(f"verify: {tar} ok, {done} samples", file=sys.stderr))
        print(f"{path}: {n} samples match the manifest")


if __name__ == "__main__":
    sys.exit(main())
