"""Run the two-view DALI graph (2 threads, batches of 32) for a while, to be profiled from outside:

    python benchmarks/results/2026-12-03_cpu/steady_graph.py 22 64 &
    sleep 5; perf record -e cpu-clock -F 999 -p $! -o perf.data -- sleep 12
    perf report -i perf.data --no-children --sort dso,symbol

(arguments: seconds to run, view size). The profile is in benchmarks/RESULTS.md, "CPU, 2026-12-03".
"""
import glob
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from byol_fast.config import load_config  # noqa: E402
from pipelines.pretrain import build_pretrain_pipeline  # noqa: E402

seconds, size = float(sys.argv[1]), int(sys.argv[2])
kernel = 23 if size == 224 else max(3, round(size / 10) | 1)
files = sorted(glob.glob(str(ROOT / "bench_data/imagenet_like_n1000_s0_v1/train/*/*.JPEG")))
cfg = load_config(None, {"device": "cpu", "reader": {"num_threads": 2},
                         "data": {"image_size": size, "view1": {"blur_kernel": kernel}, "view2": {"blur_kernel": kernel}}})
pipe = build_pretrain_pipeline(files, cfg.data, cfg.reader, 32, "cpu", None, 0)
start = time.time()
while time.time() - start < seconds:
    pipe.run()
