"""Export the pretrained encoder as a plain torchvision ResNet state_dict.

``python -m byol_fast.export --checkpoint runs/x/last.pt --out encoder.pt [--torchscript] [--which target]``

``encoder.pt`` holds the online encoder (the network the paper evaluates) under torchvision's own
parameter names, batch-norm running statistics included, and nothing else, so that::

    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(torch.load("encoder.pt"), strict=False)
    # missing == ["fc.weight", "fc.bias"], unexpected == []

gives the pretrained network with a fresh classifier. It expects ImageNet-normalised input.
``--torchscript`` also writes ``encoder.torchscript.pt``: a self-contained TorchScript module that
normalises RGB images in [0, 1] (or uint8) itself and returns pooled features (N, width); load it
with ``torch.jit.load`` without byol_fast installed. The demo's ``tiny_resnet`` is not a torchvision
model: its state_dict (torchvision's names) loads through ``byol_fast.features.load_encoder``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from .checkpoint import save_encoder
from .features import EncoderWeights, FeatureExtractor, build_frozen_encoder, read_encoder_weights
from .config import TORCHVISION_BACKBONES
from .runtime import run_cli


def torchscript_path(out: str | Path) -> Path:
    """``encoder.pt`` -> ``encoder.torchscript.pt``, beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".torchscript" + (out.suffix or ".pt"))


def export_encoder(weights: EncoderWeights, source: str | Path, out: str | Path,
                   torchscript: bool = False) -> list[Path]:
    """Write the encoder ``weights`` (read by byol_fast.features.read_encoder_weights from ``source``)
    to ``out``; return the paths written.

    The state_dict passes through the encoder network first (strict load: torchvision's own ResNet
    for a torchvision backbone), so a file that would not load back is never written.
    """
    encoder, width = build_frozen_encoder(weights, source)
    save_encoder(encoder.state_dict(), out)
    written = [Path(out)]
    if torchscript:
        module = FeatureExtractor(encoder, width, weights.mean, weights.std)
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but it is still the one format
            # that loads with plain torch.jit.load and no Python source.
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(module)
        path = torchscript_path(out)
        scripted.save(str(path))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="runs/x/last.pt, a linear-eval checkpoint or a state_dict")
    parser.add_argument("--out", required=True, help="where to write the torchvision state_dict")
    parser.add_argument("--which", default="online", choices=("online", "target"),
                        help="which tower of a pretraining checkpoint (default: online, as the paper)")
    parser.add_argument("--torchscript", action="store_true", help="also write OUT's stem + .torchscript.pt")
    args = parser.parse_args(argv)
    return run_cli(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    weights = read_encoder_weights(args.checkpoint, args.which)
    written = export_encoder(weights, args.checkpoint, args.out, torchscript=args.torchscript)
    if weights.backbone in TORCHVISION_BACKBONES:
        print(f"wrote {written[0]}: torchvision.models.{weights.backbone}() state_dict without fc.* "
              f"(load with strict=False; expects ImageNet-normalised input)")
    else:
        print(f"wrote {written[0]}: {weights.backbone} state_dict (torchvision has no such model: load it "
              f"with byol_fast.features.load_encoder; expects ImageNet-normalised input)")
    for path in written[1:]:
        print(f"wrote {path}: TorchScript, RGB in [0, 1] or uint8 -> features")
    return 0


if __name__ == "__main__":
    sys.exit(main())
