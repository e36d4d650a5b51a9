"""The wall time of a pretraining run projected with and without a resolution ramp, from measured
end-to-end throughput at each side:

    python benchmarks/throughput.py --stages e2e-dali --image-size 160,192,224 --json sides.json
    python benchmarks/ramp_projection.py sides.json --epochs 300 --start 160

Each epoch's side is the one training uses (``DataConfig.size_at``: linear from ``--start`` at
``--ramp-start`` to the largest measured side at ``--ramp-end``, in steps of 32 px); an epoch at a
side takes ``--images`` / (img/s measured at that side). By default the ramp keeps the start side
for the first 65/88 of the epochs and ends at 76/88 of them, the proportions of FFCV's 88-epoch
ResNet-50 recipe (160 -> 192 px over epochs 65-76). Every side the ramp visits must have been
measured; a missing one is named. Only throughput is projected: what a ramp does to accuracy is
measured separately (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import at_side, side_of  # noqa: E402
from bench.table import best_rate  # noqa: E402
from byol_fast.config import DataConfig  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def measured_sides(result: dict, stage: str) -> dict[int, float]:
    """side -> the best median img/s of ``stage`` measured at that side."""
    stages, run_side = result["stages"], result["settings"]["image_size"]
    sides = {side_of(st, run_side) for st in stages.values()}
    best = {side: best_rate(at_side(stages, side, run_side), stage) for side in sides}
    return {side: r for side, r in best.items() if r}


def project(per_side: dict[int, float], data: DataConfig, epochs: int, images: int) -> dict:
    """Hours per side and in all for ``epochs`` epochs of ``images`` under ``data``'s ramp."""
    sizes = data.sizes(epochs)
    missing = sorted(set(sizes) - set(per_side))
    if missing:
        raise ValueError(f"no measured throughput at {', '.join(f'{m} px' for m in missing)}")
    rows = {side: {"epochs": sizes.count(side), "img_per_s": per_side[side],
                   "hours": sizes.count(side) * images / per_side[side] / 3600} for side in sorted(set(sizes))}
    return {"sides": rows, "hours": sum(r["hours"] for r in rows.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/ramp_projection.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="a benchmarks/throughput.py --json file measured at every side of the ramp")
    p.add_argument("--stage", default="e2e-dali", help="whose img/s to use (default e2e-dali: end to end)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--images", type=int, default=IMAGENET_TRAIN, help="images per epoch (default: ImageNet's)")
    p.add_argument("--start", type=int, default=160, help="the ramp's first side (data.start_image_size)")
    p.add_argument("--end", type=int, help="the final side (data.image_size; default: the largest measured)")
    p.add_argument("--ramp-start", type=int, help="data.ramp_start_epoch (default: 65/88 of the epochs)")
    p.add_argument("--ramp-end", type=int, help="data.ramp_end_epoch (default: 76/88 of the epochs)")
    p.add_argument("--json", help="write the projection here")
    args = p.parse_args(argv)
    try:
        result = json.loads(Path(args.result).read_text())
        per_side = measured_sides(result, args.stage)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {args.result}: not a benchmarks/throughput.py result ({e})", file=sys.stderr)
        return 2
    if not per_side:
        print(f"error: {args.result} has no measured {args.stage} stage", file=sys.stderr)
        return 2
    end = args.end or max(per_side)
    first = args.ramp_start if args.ramp_start is not None else round(args.epochs * 65 / 88)
    last = args.ramp_end if args.ramp_end is not None else round(args.epochs * 76 / 88)
    ramp = DataConfig(image_size=end, start_image_size=args.start, ramp_start_epoch=first, ramp_end_epoch=last)
    try:
        fixed, ramped = project(per_side, DataConfig(image_size=end), args.epochs, args.images), \
            project(per_side, ramp, args.epochs, args.images)
    except ValueError as e:
        print(f"error: {args.result}: {e}; measure it with benchmarks/throughput.py --image-size", file=sys.stderr)
        return 2
    print(f"{args.epochs} epochs of {args.images:,} images, {args.stage} img/s from {args.result}")
    print("| schedule | side (px) | epochs | img/s | hours |\n|---|---:|---:|---:|---:|")
    for name, proj in ((f"fixed {end} px", fixed), (f"ramp {args.start} -> {end} px, epochs {first}-{last}", ramped)):
        for side, row in proj["sides"].items():
            print(f"| {name} | {side} | {row['epochs']} | {row['img_per_s']:,.1f} | {row['hours']:,.2f} |")
        print(f"| {name} | all | {args.epochs} | | {proj['hours']:,.2f} |")
    print(f"ramp / fixed wall time: {ramped['hours'] / fixed['hours']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"fixed": fixed, "ramp": ramped, "ramp_start_epoch": first,
                                               "ramp_end_epoch": last, "start": args.start, "end": end,
                                               "epochs": args.epochs, "images": args.images,
                                               "ratio": ramped["hours"] / fixed["hours"]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
