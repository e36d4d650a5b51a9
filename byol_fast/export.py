"""Export the pretrained encoder to where encoders run: torchvision, ONNX, torch.export, safetensors.

``python -m byol_fast.export --checkpoint runs/x/last.pt --out encoder.pt [--onnx] [--torch-export]
[--safetensors] [--torchscript] [--which target]``

Always written, ``encoder.pt``: the online encoder (the network the paper evaluates) under
torchvision's own parameter names, batch-norm running statistics included, and nothing else, so that::

    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(torch.load("encoder.pt"), strict=False)
    # missing == ["fc.weight", "fc.bias"], unexpected == []

gives the pretrained network with a fresh classifier; it expects ImageNet-normalised input. Beside it:

- ``--safetensors``: ``encoder.safetensors``, the same tensors in the safetensors format (no pickle);
- ``--onnx``: ``encoder.onnx`` (opset ``--opset``, 18 by default; batch, height and width dynamic),
  checked against PyTorch with ONNX Runtime, on another batch and image size, before it is kept;
- ``--torch-export``: ``encoder.pt2``, a ``torch.export`` program (dynamic batch and size), loaded with
  ``torch.export.load(path).module()``;
- ``--torchscript``: ``encoder.torchscript.pt`` (TorchScript is deprecated in the pinned torch; kept as
  an option for runtimes that still want it), loaded with ``torch.jit.load``; also takes uint8.

The three programs (ONNX, torch.export, TorchScript) normalise their input themselves: RGB images
float32 (N, 3, H, W) in [0, 1] -> pooled features (N, width). None needs byol_fast to run. The demo's
``tiny_resnet`` is not a torchvision model: its state_dict (torchvision's names) loads through
``byol_fast.weights.encoder_file.load_encoder``; its programs run anywhere.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

from byol_fast.config import TORCHVISION_BACKBONES
from byol_fast.errors import CheckpointError
from byol_fast.models.feature_extractor import FeatureExtractor
from byol_fast.runtime.cli import run_cli
from byol_fast.weights.checkpoint import save_encoder, save_encoder_safetensors
from byol_fast.weights.encoder_file import EncoderWeights, build_frozen_encoder, read_encoder_weights

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torch_export": ".pt2", "torchscript": ".torchscript.pt"}
CHECK_TOLERANCE = 1e-3  # largest |ONNX Runtime - PyTorch| feature difference, relative to the largest feature


def artifact_path(out: str | Path, fmt: str) -> Path:
    """``encoder.pt`` -> ``encoder.onnx`` (``.pt2``, ``.safetensors``, ``.torchscript.pt``), beside it."""
    out = Path(out)
    return out.with_name(out.stem + FORMATS[fmt])


def export_encoder(weights: EncoderWeights, source: str | Path, out: str | Path, formats=(),
                   opset: int = 18, sample_size: int = 64) -> list[Path]:
    """Write the encoder ``weights`` (read by byol_fast.weights.encoder_file.read_encoder_weights from ``source``)
    to ``out`` and to each of ``formats`` (keys of FORMATS); return the paths written.

    The state_dict passes through the encoder network first (strict load: torchvision's own ResNet
    for a torchvision backbone), so a file that would not load back is never written. Programs are
    traced on a (2, 3, sample_size, sample_size) batch; any other batch size and image size runs.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)} (choose from {', '.join(FORMATS)})")
    if any(artifact_path(out, fmt) == Path(out) for fmt in formats):
        raise CheckpointError(f"--out {out}: the state_dict and an export would share the name; use encoder.pt")
    encoder, width = build_frozen_encoder(weights, source)
    save_encoder(encoder.state_dict(), out, weights.mean, weights.std, weights.padding)
    written = [Path(out)]
    module = FeatureExtractor(encoder, width, weights.mean, weights.std)
    sample = torch.rand(2, 3, sample_size, sample_size)
    out = Path(out)
    for fmt in formats:
        path = artifact_path(out, fmt)
        tmp = path.with_name(f".{out.stem}.{os.getpid()}.tmp{FORMATS[fmt]}")  # torch.export wants its suffix
        if fmt == "safetensors":
            save_encoder_safetensors(encoder.state_dict(), path, weights.mean, weights.std, weights.padding)
            written.append(path)
            continue
        try:
            {"onnx": _onnx, "torch_export": _torch_export, "torchscript": _torchscript}[fmt](module, sample, tmp, opset)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # nothing half-written stays behind
        written.append(path)
    return written


def _batch_dim():
    """Batch, height and width all dynamic: a program takes any number of images of any size."""
    auto = torch.export.Dim.AUTO
    return ({0: auto, 2: auto, 3: auto},)


def _onnx(module, sample, path: Path, opset: int) -> None:
    """ONNX through torch.onnx's exporter, then run by ONNX Runtime on another batch size and compared."""
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (sample,), str(path), dynamo=True, input_names=["images"],
                          output_names=["features"], dynamic_shapes=_batch_dim(), opset_version=opset,
                          verbose=False, external_data=False)
    check = torch.rand(3, 3, sample.shape[2] + 17, sample.shape[3] + 9)  # another batch and another size
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
    want = module(check)
    if (got - want).abs().max() > CHECK_TOLERANCE * want.abs().max():
        raise CheckpointError(f"ONNX Runtime's features differ from PyTorch's by {(got - want).abs().max():.3g}: "
                              f"not written (try another --opset)")


def _torch_export(module, sample, path: Path, opset: int) -> None:
    program = torch.export.export(module, (sample,), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(path))


def _torchscript(module, sample, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of torch.export
        torch.jit.script(module).save(str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byol_fast.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="runs/x/last.pt, a linear-eval checkpoint or a state_dict")
    parser.add_argument("--out", required=True, help="where to write the torchvision state_dict (e.g. encoder.pt)")
    parser.add_argument("--which", default="online", choices=("online", "target"),
                        help="which tower of a pretraining checkpoint (default: online, as the paper)")
    parser.add_argument("--safetensors", action="store_true", help="also write OUT's stem + .safetensors")
    parser.add_argument("--onnx", action="store_true", help="also write OUT's stem + .onnx (checked with ONNX Runtime)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--torch-export", action="store_true", help="also write OUT's stem + .pt2 (torch.export)")
    parser.add_argument("--torchscript", action="store_true", help="also write OUT's stem + .torchscript.pt")
    args = parser.parse_args(argv)
    return run_cli(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    weights = read_encoder_weights(args.checkpoint, args.which)
    formats = [f for f in FORMATS if getattr(args, f)]
    written = export_encoder(weights, args.checkpoint, args.out, formats, args.opset)
    norm = f"normalised with mean {list(weights.mean)} and std {list(weights.std)}"
    if weights.padding == "same":
        print(f"wrote {written[0]}: {weights.backbone} state_dict of a SAME-padding network (converted from "
              f"TensorFlow/Haiku): torchvision.models.{weights.backbone}() would load it but pad otherwise; "
              f"load it with byol_fast.weights.encoder_file.load_encoder, or use the exported programs; input {norm}")
    elif weights.backbone in TORCHVISION_BACKBONES:
        print(f"wrote {written[0]}: torchvision.models.{weights.backbone}() state_dict without fc.* "
              f"(load with strict=False; input {norm})")
    else:
        print(f"wrote {written[0]}: {weights.backbone} state_dict with torchvision's module names (torchvision "
              f"has no such model: load it with byol_fast.weights.encoder_file.load_encoder, or use the exported "
              f"programs; input {norm})")
    what = {"safetensors": "the same state_dict as safetensors", "onnx": "ONNX, checked with ONNX Runtime",
            "torch_export": "torch.export program", "torchscript": "TorchScript"}
    for fmt, path in zip(formats, written[1:]):
        tail = "" if fmt == "safetensors" else ": RGB float (N, 3, H, W) in [0, 1] -> features"
        tail += " (uint8 0..255 too)" if fmt == "torchscript" else ""
        print(f"wrote {path}: {what[fmt]}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
