"""Classify images with a linear-evaluation checkpoint: class names and scores per image.

``python -m byol_fast.predict --checkpoint RUN/linear/last.pt IMAGE... [--topk 5] [--json] [--device cpu]``

Each image goes through the evaluation's validation preprocessing (shorter side resized, center crop,
the encoder's normalisation), the frozen encoder and the linear head; the scores are softmax
probabilities. In Python, the same::

    from byol_fast.evaluation.classifier import ImageClassifier
    clf = ImageClassifier.from_checkpoint("runs/demo/linear/last.pt")
    clf.predict(["a.jpg", "b.jpg"], topk=3)   # [{"pred_class": ..., "pred_score": ..., "topk": [...]}, ...]
"""
from __future__ import annotations

import argparse
import json
import sys

from byol_fast.datasets.image_check import check_image
from byol_fast.errors import DatasetError
from byol_fast.evaluation.classifier import ImageClassifier
from byol_fast.runtime.cli import run_cli
from byol_fast.runtime.device import resolve_device

BATCH = 64  # images per forward pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a linear-evaluation checkpoint (RUN/linear/last.pt)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--topk", type=_positive, default=5, help="classes listed per image (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout instead of lines")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    args = parser.parse_args(argv)
    return run_cli(lambda: _predict(args))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _predict(args: argparse.Namespace) -> int:
    for path in args.images:  # every file checked first: one line naming a bad one, before any work
        ok, why = check_image(path)
        if not ok:
            raise DatasetError(f"{path}: {why}")
    clf = ImageClassifier.from_checkpoint(args.checkpoint, resolve_device(args.device))
    results = []
    for start in range(0, len(args.images), BATCH):
        chunk = args.images[start:start + BATCH]
        results += [{"image": path, **r} for path, r in zip(chunk, clf.predict(chunk, args.topk))]
    if args.json:
        for r in results:
            r["topk"] = [{"class": name, "score": score} for name, score in r["topk"]]
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['image']}: " + ", ".join(f"{name} {score:.3f}" for name, score in r["topk"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
