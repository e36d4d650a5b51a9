"""Convert a BYOL checkpoint another project released into a torchvision ResNet state_dict.

``python -m byol_fast.convert SRC --out encoder.pt [--format auto|mmpretrain|solo-learn|lightly|byol-pytorch|lucidrains|passl|deepmind|vissl|torchvision]``

Reads SRC without running code from it (``byol_fast.weights.safe_load``: torch files and pickles of
numpy arrays through an unpickler that admits nothing else), detects its layout
(``byol_fast.weights.importers``), maps the online backbone onto torchvision's names, reports what it
mapped and what it dropped, and refuses, naming the keys, when anything of the backbone is missing or
left over. The output is an exported encoder like ``python -m byol_fast.export`` writes;
``linear_eval``, ``finetune``, ``export``, ``dense_probe`` and the feature API
(``byol_fast.weights.encoder_file``) also take SRC directly.
"""
from __future__ import annotations

import argparse
import sys

from byol_fast.runtime.cli import run_cli
from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights import importers
from byol_fast.weights.backbone_match import infer_backbone
from byol_fast.weights.encoder_file import EncoderWeights, build_frozen_encoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the released checkpoint (.pth, .ckpt, .pt, .pdparams, .pkl)")
    parser.add_argument("--out", required=True, help="where to write the torchvision state_dict")
    parser.add_argument("--format", default="auto", help=f"auto (detect) or one of {', '.join(importers.LAYOUTS)}")
    args = parser.parse_args(argv)
    return run_cli(lambda: _convert(args))


def _convert(args: argparse.Namespace) -> int:
    converted = importers.convert(ckpt.load(args.src), args.src, args.format)
    weights = EncoderWeights(converted.state, infer_backbone(converted.state, args.src), converted.mean,
                             converted.std, converted.padding)
    encoder, _ = build_frozen_encoder(weights, args.src)  # strict: every key, every shape
    ckpt.save_encoder(encoder.state_dict(), args.out, weights.mean, weights.std, weights.padding)
    print(converted.report())
    print(f"wrote {args.out}: {weights.backbone} state_dict under torchvision's names"
          + (" (SAME padding: load it through byol_fast.weights.encoder_file)" if weights.padding == "same" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
