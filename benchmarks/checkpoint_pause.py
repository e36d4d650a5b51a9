"""How long a checkpoint stops training: BackgroundWriter.save against a synchronous checkpoint.save.

    python benchmarks/checkpoint_pause.py [--repeats 5] [--dir DIR] [--json PATH]

The state is the real one of a BYOL ResNet-50 pretraining run, built by byol_fast.pretrain.learner.Learner
(online and target ResNet-50 with their 2048-4096-256 projectors, the 256-4096-256 predictor, a LARS
momentum buffer per trainable parameter, after one step on a tiny batch) plus what
byol_fast.train saves beside it (step, RNG states, config): about 410 MB of float32 in ~830 tensors.

Per repetition, in one process and interleaved so that both see the same machine load:

- ``sync_s``: ``checkpoint.save`` (serialise, write the temporary file, fsync, rename): the whole
  time is a pause of the training loop;
- ``pause_s``: what ``BackgroundWriter.save`` returns: the time the caller is stopped (the copy of
  every tensor into the writer's buffers, plus starting its thread), with the previous write done;
- ``write_s``: from the call of ``BackgroundWriter.save`` until its file is renamed into place
  (``wait()`` returning; the main thread waits idle meanwhile), so saves closer together than this
  would wait for each other.

The first background save allocates the writer's buffers (and faults their pages in): reported
apart as ``first_pause_s``; the medians are over the later, steady-state ones. The files go to a
temporary folder inside ``--dir`` (default: the system's temporary folder), removed at the end: point
it at the disk runs write their checkpoints to, since the synchronous time is mostly that disk's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from byol_fast.weights import checkpoint as ckpt  # noqa: E402
from byol_fast.weights.checkpoint_writer import BackgroundWriter  # noqa: E402
from byol_fast.runtime.process import git_revision  # noqa: E402


def byol_resnet50_state() -> dict:
    """A pretraining checkpoint's state for BYOL ResNet-50 on the CPU, as byol_fast.train builds it."""
    from byol_fast.runtime import dist
    from byol_fast.config import Config, to_dict
    from byol_fast.pretrain.learner import Learner

    cfg = Config(device="cpu")
    learner = Learner(cfg, torch.device("cpu"), dist.DistInfo())
    views = torch.randn(2, 3, 64, 64)
    learner.step([(views, views.flip(3))], lr=0.1, tau=0.99)  # creates the momentum buffers
    return {"step": 1, **learner.state_dict(), "rng": ckpt.rng_state(), "loader": [{"epoch": 0, "step": 1}],
            "config": to_dict(cfg), "git": git_revision(), "world_size": 1}


def state_bytes(obj) -> tuple[int, int]:
    """(bytes, count) of the tensors in a nested state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size(), 1
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    sizes = [state_bytes(v) for v in items]
    return sum(s[0] for s in sizes), sum(s[1] for s in sizes)


def measure(state: dict, directory: str | Path, repeats: int = 5) -> dict:
    """Seconds of synchronous saves, background pauses and background writes of ``state`` into
    ``directory``, ``repeats`` of each interleaved after one warm-up of each: medians and every value."""
    directory = Path(directory)
    sync_path, bg_path = directory / "sync.pt", directory / "background.pt"
    writer = BackgroundWriter()
    try:
        ckpt.save(state, sync_path, ckpt.PRETRAIN)  # warm-up: the file exists, as in a run
        start = time.perf_counter()
        first_pause = writer.save(state, bg_path, ckpt.PRETRAIN)
        writer.wait()
        first_write = time.perf_counter() - start
        sync, pause, write = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            ckpt.save(state, sync_path, ckpt.PRETRAIN)
            sync.append(time.perf_counter() - start)
            start = time.perf_counter()
            pause.append(writer.save(state, bg_path, ckpt.PRETRAIN))
            writer.wait()
            write.append(time.perf_counter() - start)
    finally:
        writer.close()
    size, count = state_bytes(state)
    result = {"state_mb": size / 1e6, "tensors": count, "repeats": repeats,
              "sync_s": statistics.median(sync), "pause_s": statistics.median(pause),
              "write_s": statistics.median(write), "first_pause_s": first_pause, "first_write_s": first_write,
              "sync_all_s": sync, "pause_all_s": pause, "write_all_s": write,
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    result["pause_over_sync"] = result["pause_s"] / result["sync_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="", help="folder for the files (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)
    state = byol_resnet50_state()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as directory:
        result = measure(state, directory, args.repeats)
    print(f"state: {result['state_mb']:.0f} MB in {result['tensors']} tensors, {result['repeats']} repeats, "
          f"{result['torch_threads']} torch threads on {result['cpus']} CPUs")
    print(f"synchronous checkpoint.save:   median {result['sync_s']:.3f} s")
    print(f"BackgroundWriter.save pause:   median {result['pause_s']:.3f} s "
          f"(first, allocating its buffers: {result['first_pause_s']:.3f} s)")
    print(f"background write, save->renamed: median {result['write_s']:.3f} s")
    print(f"pause / synchronous: {result['pause_over_sync']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
