"""The dense probe of an encoder: per-pixel linear classification of the frozen last feature map, mIoU.

``python -m byol_fast.dense_probe --checkpoint RUN/last.pt --data data/demo_seg [--image-size 48]
[--epochs 30] [--json OUT.json]``, or ``--init random --backbone tiny_resnet`` for the baseline.

``--data`` is a dense demo dataset (``python -m byol_fast.data demo-seg OUT``: train/ and val/ with
images/ and masks/). Images are resized to ``--image-size`` and normalised the way the checkpoint's
encoder was trained; the probe (byol_fast.evaluation.dense) trains on train/ and reports mean IoU, pixel
accuracy and per-class IoU on val/, at the masks' resolution.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from byol_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from byol_fast.datasets.demo_segmentation import read_split
from byol_fast.errors import ConfigError
from byol_fast.evaluation.dense import encode, evaluate, train_probe
from byol_fast.models.feature_extractor import freeze
from byol_fast.models.resnet import build_encoder
from byol_fast.runtime.cli import run_cli
from byol_fast.weights.encoder_file import build_frozen_encoder, read_encoder_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.dense_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="any encoder file byol_fast reads (pretraining, linear, exported, released)")
    parser.add_argument("--init", default="checkpoint", choices=("checkpoint", "random"))
    parser.add_argument("--backbone", default="", help="with --init random: the architecture (e.g. tiny_resnet)")
    parser.add_argument("--data", required=True, help="a dense demo dataset (python -m byol_fast.data demo-seg)")
    parser.add_argument("--image-size", type=int, default=48, help="side the images are resized to (default 48)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    return run_cli(lambda: _probe(args))


def _encoder(args):
    if args.init == "random":
        if not args.backbone:
            raise ConfigError("--backbone: --init random needs the architecture (e.g. --backbone tiny_resnet)")
        torch.manual_seed(args.seed)
        return freeze(build_encoder(args.backbone)[0]), IMAGENET_MEAN, IMAGENET_STD, f"random {args.backbone}"
    if not args.checkpoint:
        raise ConfigError("--checkpoint: give an encoder file (or --init random --backbone NAME)")
    weights = read_encoder_weights(args.checkpoint, backbone=args.backbone or None)
    return build_frozen_encoder(weights, args.checkpoint)[0], weights.mean, weights.std, args.checkpoint


def _probe(args) -> int:
    if args.image_size < 8 or args.epochs < 1:
        raise ConfigError("--image-size must be at least 8 and --epochs at least 1")
    encoder, mean, std, source = _encoder(args)
    train_images, train_masks, classes = read_split(args.data, "train")
    val_images, val_masks, _ = read_split(args.data, "val")
    train_maps = encode(encoder, train_images, args.image_size, mean, std)
    val_maps = encode(encoder, val_images, args.image_size, mean, std)
    print(f"dense probe of {source}: {len(train_images)} train / {len(val_images)} val images, "
          f"{len(classes)} classes, feature map {tuple(train_maps.shape[1:])} at {args.image_size} px", flush=True)
    probe = train_probe(train_maps, torch.from_numpy(train_masks), len(classes), args.epochs, args.lr,
                        seed=args.seed, log=lambda m: print(m, flush=True))
    result = evaluate(probe, val_maps, torch.from_numpy(val_masks), len(classes))
    result.update(source=source, classes=classes, image_size=args.image_size, epochs=args.epochs)
    print(f"val mIoU {result['miou']:.1f}%  pixel accuracy {result['pixel_acc']:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
