"""How far the DALI two-view loader can outrun the PIL one on this machine: the cost of what both
must do alike (decode each JPEG once, two antialiased bicubic random resized crops) against the
whole graph, both loaders' way, interleaved in one process (benchmarks/RESULTS.md, "CPU, 2026-12-03").

    python benchmarks/results/2026-12-03_cpu/floor.py [--size 64] [--threads 2]
    python benchmarks/results/2026-12-03_cpu/floor.py --profile 22 &   # the whole graph, for a profiler:
    sleep 5; perf record -e cpu-clock -F 999 -p $! -o perf.data -- sleep 12
    perf report -i perf.data --no-children --sort dso,symbol

DALI: pipelines with 2 threads (prefetch 2, as the benchmark's loader), batches of 32: decode only,
decode + the two crops, and the whole graph (pipelines.pretrain.two_view_graph). PIL: one process,
one image at a time: decode, decode + the two crops (torchvision's RandomResizedCrop on the PIL
image), and the whole recipe (pipelines.reference.TwoViewTransform), so PIL's figures are per core;
the DataLoader's 2 workers can at best double them.
"""
import argparse
import glob
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from nvidia.dali import fn, pipeline_def  # noqa: E402
from PIL import Image  # noqa: E402

from byol_fast.config import load_config  # noqa: E402
from pipelines import pretrain  # noqa: E402
from pipelines.decode import INTERP, decode, read  # noqa: E402
from pipelines.reference import TwoViewTransform, view_transform  # noqa: E402
from throughput import blur_kernel_for  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--size", type=int, default=64)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--profile", type=float, metavar="SECONDS", help="only run the whole graph this long")
args = p.parse_args()
kernel = blur_kernel_for(args.size)  # the benchmark's blur window for this view size
files = sorted(glob.glob(str(ROOT / "bench_data/imagenet_like_n1000_s0_v1/train/*/*.JPEG")))
if not files:
    sys.exit("no bench_data: run python benchmarks/throughput.py once to make it")
cfg = load_config(None, {"device": "cpu", "data": {"image_size": args.size, "view1": {"blur_kernel": kernel},
                                                    "view2": {"blur_kernel": kernel}}})
data, reader = cfg.data, cfg.reader
torch.set_num_threads(1)


def crop(img, view):
    anchor, shape = pretrain.crop_window(img, view)
    return fn.resize(img, roi_start=anchor, roi_end=anchor + shape, size=(args.size, args.size),
                     interp_type=INTERP[data.interp], antialias=True)


graphs = {
    "decode": lambda j: decode(j, reader, "cpu"),
    "decode + 2 crops": lambda j: (lambda img: (crop(img, data.view1), crop(img, data.view2)))(decode(j, reader, "cpu")),
    "whole graph": lambda j: pretrain.two_view_graph(j, data, reader, "cpu"),
}
if args.profile:  # the whole graph alone, steadily, for a profiler attached from outside
    graphs = {"whole graph": graphs["whole graph"]}
pipes = {}
for name, graph in graphs.items():
    @pipeline_def(enable_conditionals=True)
    def pipe(graph=graph):
        return graph(read(files))
    pipes[name] = pipe(batch_size=32, num_threads=args.threads, device_id=None, seed=0, prefetch_queue_depth=2)
    pipes[name].build()
    for _ in range(3):
        pipes[name].run()
if args.profile:
    start = time.time()
    while time.time() - start < args.profile:
        pipes["whole graph"].run()
    sys.exit()

sample = files[:64]
c1 = view_transform(data.view1, data).transforms[0]
c2 = view_transform(data.view2, data).transforms[0]
both = TwoViewTransform(data)


def pil_decode(f):
    with Image.open(f) as im:
        return im.convert("RGB")


pil = {
    "decode": lambda f: pil_decode(f),
    "decode + 2 crops": lambda f: (lambda im: (c1(im), c2(im)))(pil_decode(f)),
    "whole graph": lambda f: both(pil_decode(f)),
}
dali_rates = {k: [] for k in pipes}
pil_rates = {k: [] for k in pil}
for _ in range(args.rounds):
    for name, pipe in pipes.items():
        t = time.perf_counter()
        for _ in range(10):
            pipe.run()
        dali_rates[name].append(320 / (time.perf_counter() - t))
    for name, work in pil.items():
        t = time.perf_counter()
        for f in sample:
            work(f)
        pil_rates[name].append(len(sample) / (time.perf_counter() - t))
print(f"{args.size} px views, DALI {args.threads} threads (batches of 32) | PIL one core; medians of {args.rounds} rounds")
print("| work | DALI img/s | PIL img/s (one core) |")
print("|---|---:|---:|")
for name in graphs:
    print(f"| {name} | {statistics.median(dali_rates[name]):.0f} | {statistics.median(pil_rates[name]):.0f} |")
