"""Memory a BYOL step needs per image, worked out from the networks' shapes (no GPU, no compute).

For each encoder, the BYOL network (online encoder + projector + predictor, target encoder +
projector) is built on the CPU and a batch of one view is run through the online network under
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps for the backward
pass. Their storages, each counted once (an in-place ReLU's output is the batch norm's, and the next
convolution's input), are the activations a training step holds per image and view; in float32 here,
halved for the bfloat16 activations of mixed precision (batch-norm statistics, kept in float32, are a
negligible part). The target network's forward keeps none. The fixed part is the
online network's fp32 weights, gradients and LARS momentum, and the target's fp32 weights.

From those, the largest batch per GPU at a given memory: (memory x usable - fixed - reserve) /
(2 views x activations per image). ``usable`` (0.9) and ``reserve`` (3 GB: the CUDA context, cuDNN
workspaces) are assumptions stated in the output, not measurements: a GPU run measures the real
figure (benchmarks/gpu_checks.sh).

    python benchmarks/encoder_memory.py                       # every backbone, 224 px
    python benchmarks/encoder_memory.py --backbones resnet50 resnet50x2 --image-size 160 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from byol_fast.config import BACKBONES, ModelConfig  # noqa: E402
from byol_fast.models.byol import BYOL  # noqa: E402

GB = 1024 ** 3
USABLE, RESERVE_GB = 0.9, 3.0  # of the card's memory the allocator can use; CUDA context and workspaces
GPUS = {"V100 32GB": 32, "A100 80GB": 80, "H100 80GB": 80, "H200 141GB": 141}


def activation_bytes(model: BYOL, image_size: int, batch: int = 2) -> int:
    """Bytes autograd saves for one view of one image through the online network, as bfloat16."""
    storages = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.rand(batch, 3, image_size, image_size)  # batch norm needs two samples
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.predictor(model.online.projector(model.online.encoder(x)))
    return sum(storages.values()) // (2 * batch)  # float32 -> bfloat16, per image


def estimate(backbone: str, image_size: int) -> dict:
    torch.manual_seed(0)
    model = BYOL(ModelConfig(backbone=backbone)).train()
    online = sum(p.numel() for p in [*model.online.parameters(), *model.predictor.parameters()])
    target = sum(p.numel() for p in model.target.parameters())
    encoder = sum(p.numel() for p in model.online.encoder.parameters())
    per_view = activation_bytes(model, image_size)
    fixed = 4 * (3 * online + target)  # fp32 weights, gradients, momentum; the target's weights
    largest = {gpu: max(0, int((mem * USABLE - RESERVE_GB) * GB - fixed) // (2 * per_view))
               for gpu, mem in GPUS.items()}
    return {"backbone": backbone, "image_size": image_size, "encoder_params_M": round(encoder / 1e6, 2),
            "fixed_GB": round(fixed / GB, 2), "activations_per_image_GB": round(2 * per_view / GB, 4),
            "largest_batch_per_gpu": largest}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=[b for b in BACKBONES if b != "tiny_resnet"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    rows = [estimate(b, args.image_size) for b in args.backbones]
    print(f"BYOL step, {args.image_size} px, two views, bf16 activations, fp32 weights + gradients + LARS "
          f"momentum; largest batch per GPU assumes {USABLE:.0%} of the card usable and {RESERVE_GB:g} GB reserved")
    print("| encoder | encoder params (M) | fixed (GB) | activations per image (GB) | "
          + " | ".join(f"largest batch, {g}" for g in GPUS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(GPUS))
    for r in rows:
        print(f"| {r['backbone']} | {r['encoder_params_M']} | {r['fixed_GB']} | {r['activations_per_image_GB']} | "
              + " | ".join(str(r["largest_batch_per_gpu"][g]) for g in GPUS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
