"""Images per second, stage by stage: ``python benchmarks/throughput.py [--quick] [--json PATH] [--plot PATH]``.

What it measures, in one process, side by side on the same files and the same cores:

1. ``dali``, ``torchvision``: the two-view data pipeline alone (decode once, two augmented views):
   byol_fast's DALI pipeline, and the torchvision/PIL DataLoader doing the same recipe with as many
   worker processes as DALI has threads (the way peer projects load data). Every loader is built by
   :mod:`byol_fast.loaders`, as the drivers build theirs, from the config's ``reader`` section.
   Batches are taken where each loader delivers them (the GPU for DALI with ``--decode gpu``, host
   memory for the DataLoader).
2. ``model``: the BYOL training step alone on synthetic device tensors, through
   :class:`byol_fast.learner.Learner` (the code ``byol_fast.train`` runs): both views, online
   forward/backward, target forward, LARS, EMA.
3. ``e2e-dali``, ``e2e-torchvision``: loader -> device -> training step, and the fraction of the
   time the training step waits for data.
4. ``linear``, ``e2e-linear`` (``--linear``): linear evaluation's step
   (:class:`byol_fast.classifier.LinearClassifier`: frozen encoder forward, linear layer
   forward/backward, SGD) on synthetic device tensors, and fed by linear evaluation's training
   loader (DALI: random resized crop + flip).

Method: each stage runs warm-up steps (pipeline build, worker start, cuDNN/compile warm-up), then
times ``--windows`` windows of a fixed number of steps, chosen from a calibration so a window
lasts about ``--window-seconds``; on a GPU each window ends with ``torch.cuda.synchronize()``.
A figure is the median over the windows, with their min and max. One image is one source image
(both of its views), the unit of the 8x V100 target (byol_fast/REFERENCE.md section 2).

Data wait: on a GPU, CUDA events bracket each training step on its stream; the wait fraction
is ``1 - (sum of step spans) / window time``, the share of the time the training stream had no step
to run (loading, host-to-device copy). On the CPU, where everything is synchronous, it is the
share of the time spent fetching and moving the batch.

Data: ImageNet-like JPEGs made by ``benchmarks/imagenet_like.py`` into ``bench_data/`` (ignored by
git), or ``--data`` (a folder or a byol_fast index file). Files are read through the page cache:
the figures exclude storage speed.

Any extra ``--section.key=value`` argument is a config override, as for ``byol_fast.train``
(e.g. ``--data.interp=linear``, ``--reader.prefetch=3``). A stage that fails prints its error; the
others still run and the figure is null in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from byol_fast.classifier import LinearClassifier  # noqa: E402
from byol_fast.config import (ConfigError, LinearConfig, LinearDataConfig, load_config, merge,  # noqa: E402
                              parse_overrides, to_dict)
from byol_fast.dist import DistInfo  # noqa: E402
from byol_fast.index import load_index  # noqa: E402
from byol_fast.learner import Learner  # noqa: E402
from byol_fast.loaders import eval_loader, two_view_loader  # noqa: E402
from byol_fast.model import build_encoder  # noqa: E402
from byol_fast.runtime import resolve_device, resolve_precision, to_device  # noqa: E402
from byol_fast.schedules import scaled_lr  # noqa: E402

# byol_fast/REFERENCE.md section 2: BYOL ResNet-50 224 px on 8x V100 with AMP (compute bound), and the
# linear-evaluation figure DeepSparkHub reports for its mmpretrain-based BYOL recipe on 8 GPUs.
TARGET_BYOL_8XV100 = 3121.0
TARGET_LINEAR_8GPU = 5408.0
# Other public anchors drawn beside the measured bars on a GPU (same section).
PEERS = {"BYOL 1x V100 AMP (anchor)": 450.0, "BYOL 1x A100 AMP (anchor)": 926.0,
         "BYOL 8x V100 AMP (target)": TARGET_BYOL_8XV100}

STAGES = ("dali", "torchvision", "model", "e2e-dali", "e2e-torchvision", "linear", "e2e-linear")
LINEAR_STAGES = ("linear", "e2e-linear")
LABELS = {
    "dali": "DALI two-view loader",
    "torchvision": "torchvision/PIL loader",
    "model": "training step (synthetic)",
    "e2e-dali": "end to end, DALI",
    "e2e-torchvision": "end to end, torchvision",
    "linear": "linear eval step (synthetic)",
    "e2e-linear": "linear eval end to end, DALI",
}
TABLE_BEGIN = "## Throughput (img/s; one image = both views)"
RATIOS_BEGIN = "## Ratios"


def log(msg: str) -> None:
    """Progress, on stderr, so that stdout holds the results alone."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- settings


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python benchmarks/throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a run of about a minute: fewer images, windows and seconds")
    p.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)} "
                   "(default: all but linear)")
    p.add_argument("--linear", action="store_true", help="also measure linear evaluation (synthetic and end to end)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--config", help="YAML recipe to start from (config/*.yaml); the options below override it")
    p.add_argument("--backbone", help="torchvision ResNet (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--image-size", type=int, help="side of each view (default: 224 on GPU, 64 on CPU)")
    p.add_argument("--batch", type=int, help="images per step (default: 256 on GPU, 32 on CPU)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), help="default: the config's (auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (config: compile)")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW memory format instead of channels_last")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--threads", type=int, help="DALI threads = DataLoader workers (config: reader.num_threads; "
                   "default: every core)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads on the CPU (default: every core)")
    p.add_argument("--prefetch", type=int, help="batches DALI prepares ahead (config: reader.prefetch)")
    p.add_argument("--hw-decoder-load", type=float, help="share of JPEGs for the hardware decoder "
                   "(config: reader.hw_decoder_load)")
    p.add_argument("--decode", choices=("cpu", "gpu"), help="where DALI decodes and augments (config: reader.decode; "
                   "default: gpu on CUDA)")
    p.add_argument("--data", help="a folder of images (ImageFolder tree or flat) or a byol_fast index file, "
                   "instead of generated images")
    p.add_argument("--num-images", type=int, help="generated images (default: 4000 on GPU, 1000 on CPU)")
    p.add_argument("--bench-data", default=str(ROOT / "bench_data"), help="where generated images go")
    p.add_argument("--windows", type=int, help="timed windows per stage (default 5; 3 with --quick)")
    p.add_argument("--window-seconds", type=float, help="target length of a window (default 3; 1 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps per stage (default 3; 10 with --compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure and setting here")
    p.add_argument("--plot", help="write a PNG bar chart here")
    return p.parse_known_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    """Every setting the run uses, defaults filled in by device type."""
    cuda = resolve_device(args.device).type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] or [s for s in STAGES if s not in LINEAR_STAGES]
    if args.linear:
        stages += [s for s in LINEAR_STAGES if s not in stages]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage {unknown[0]!r} (choose from {', '.join(STAGES)})")
    quick = args.quick
    return {
        "device": "cuda" if cuda else "cpu",
        "stages": stages,
        "backbone": args.backbone or ("resnet50" if cuda else "resnet18"),
        "image_size": args.image_size or (224 if cuda else 64),
        "batch": args.batch or (256 if cuda else 32),
        "decode": args.decode or ("gpu" if cuda else "cpu"),
        "threads": args.threads or cores,
        "torch_threads": args.torch_threads or cores,
        "cores": cores,
        "num_images": args.num_images or ((1000 if quick else 4000) if cuda else (256 if quick else 1000)),
        "windows": args.windows or (3 if quick else 5),
        "window_seconds": args.window_seconds or (1.0 if quick else 3.0),
        "warmup": args.warmup if args.warmup is not None else (10 if args.compile else 3),
        "cudnn_benchmark": args.cudnn_benchmark,
        "quick": quick,
        "seed": args.seed,
    }


def blur_kernel_for(size: int) -> int:
    """The paper's blur window is 10% of the view side (23 at 224), made odd."""
    return 23 if size == 224 else max(3, round(size / 10) | 1)


def build_config(args: argparse.Namespace, s: dict, extra: list[str]):
    """The byol_fast Config every stage runs: recipe <- benchmark settings <- extra overrides. How
    images are read (threads, decode, prefetch, hardware decoder) lives in its ``reader`` section,
    which every loader, the linear one included, takes whole."""
    reader = {"num_threads": s["threads"], "decode": s["decode"], "prefetch": args.prefetch,
              "hw_decoder_load": args.hw_decoder_load}
    over: dict = {"device": s["device"], "seed": s["seed"],
                  "model": {"backbone": s["backbone"]},
                  "optim": {"batch_size": s["batch"]},
                  "data": {"image_size": s["image_size"]},
                  "reader": {k: v for k, v in reader.items() if v is not None}}
    if not args.config:  # the recipe's views as they are; else scale the blur window with the view
        k = blur_kernel_for(s["image_size"])
        over["data"].update(view1={"blur_kernel": k}, view2={"blur_kernel": k})
    if args.precision:
        over["precision"] = args.precision
    if args.compile:
        over["compile"] = True
    if args.no_channels_last:
        over["channels_last"] = False
    return load_config(args.config, merge(over, parse_overrides(extra)))


def environment(device: torch.device) -> dict:
    """Device name and software versions."""
    import PIL
    import torchvision
    from PIL import features

    env = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "pillow": PIL.__version__,
           "pillow_libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
           "cpu": _cpu_name(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError as e:
        env["dali"] = f"not importable: {e}"
    try:
        from byol_fast.checkpoint import git_revision

        env["git"] = git_revision()
    except Exception:  # noqa: BLE001  the revision is a label, never a reason to stop
        env["git"] = "unknown"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}")
    return env


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------- memory


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (DataLoader workers); shared pages count once per process."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


class HostPeak:
    """Peak resident memory of this process tree while the ``with`` block runs, sampled every 0.1 s."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._ok = Path(f"/proc/{os.getpid()}/statm").exists()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._ok:
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            if self._stop.wait(0.1):
                break

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if not self._ok:  # no /proc: the process's lifetime peak (ru_maxrss, KiB on Linux, bytes on macOS)
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = rss if sys.platform == "darwin" else rss * 1024
        return False


# ---------------------------------------------------------------------------- timing


def summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "windows": rates}


def measure(step, images_per_step: int, sync, s: dict, label: str, on_window=None, rounds: int = 1) -> dict:
    """Warm up, calibrate a window's step count, then time ``s['windows']`` windows of ``step()``.

    ``on_window(seconds)`` (optional) is called after each window's sync and returns extra
    per-window figures (the data wait); they come back as lists under their own keys.

    ``rounds``: a DataLoader with N workers delivers batches in bursts of N (each worker builds
    a whole batch), so warm-up and calibration take a whole round of N steps and every window
    a whole number of rounds; otherwise a window would time batches prefetched before it began.
    """
    warmup = s["warmup"] + (rounds if rounds > 1 else 0)
    log(f"  warm-up: {warmup} steps")
    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    calib = max(2, rounds)
    for _ in range(calib):
        step()
    sync()
    per_step = (time.perf_counter() - t) / calib
    steps = max(3, math.ceil(s["window_seconds"] / max(per_step, 1e-6)))
    steps = rounds * math.ceil(steps / rounds)
    log(f"  {per_step * 1e3:.1f} ms/step after warm-up: {s['windows']} windows of {steps} steps")
    rates, extras = [], {}
    if on_window:
        on_window(None)  # reset the counters the calibration steps filled
    for w in range(s["windows"]):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()  # host sync: the window's work is finished before the clock stops
        dt = time.perf_counter() - t0
        rates.append(steps * images_per_step / dt)
        more = on_window(dt) if on_window else {}
        for k, v in more.items():
            extras.setdefault(k, []).append(v)
        note = "".join(f", {k} {v:.3f}" for k, v in more.items())
        log(f"  [{label}] window {w + 1}/{s['windows']}: {rates[-1]:.1f} img/s{note}")
    out = {"img_per_s": summary(rates), "steps_per_window": steps, "warmup_steps": s["warmup"],
           "step_ms": 1e3 * images_per_step / statistics.median(rates)}
    for k, v in extras.items():
        out[k] = statistics.median(v)
        out[k + "_windows"] = v
    return out


def endless(loader):
    """Batches from epoch after epoch of a loader."""
    while True:
        yield from loader


class DataWait:
    """Share of a window the training step waited for its data (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self):
        self.events, self.host_wait = [], 0.0

    def fetched(self, seconds: float) -> None:
        self.host_wait += seconds

    def bracket(self):
        """A (start, end) pair of CUDA events to record around one step; None on the CPU."""
        if not self.cuda:
            return None
        pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self.events.append(pair)
        return pair

    def window(self, seconds: float | None) -> dict:
        if seconds is None:
            self.reset()
            return {}
        if self.cuda:  # the events are complete: the window ended with a synchronize
            busy = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
            wait = 1.0 - busy / seconds
        else:
            wait = self.host_wait / seconds
        self.reset()
        return {"data_wait_fraction": min(1.0, max(0.0, wait))}


# ---------------------------------------------------------------------------- stages


def device_sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def reader_for(kind: str, cfg):
    """The config's reader section with ``loader`` set to the stage's kind (dali | torchvision)."""
    return dataclasses.replace(cfg.reader, loader=kind)


def pretrain_loader(kind: str, data, cfg, device: torch.device):
    """The two-view loader byol_fast.train builds (byol_fast.loaders), for a world of one."""
    return two_view_loader(data["index"], cfg.data, reader_for(kind, cfg), cfg.optim.batch_size, DistInfo(), device,
                           cfg.seed)


def worker_rounds(kind: str, cfg) -> int:
    """Steps in one round of the torchvision DataLoader's workers (1 for DALI, which streams)."""
    return max(1, cfg.reader.num_threads) if kind == "torchvision" else 1


def measure_fed(loader, move, train, cfg, device, s, label: str, rounds: int = 1) -> dict:
    """An end-to-end stage: each step takes the loader's next batch, moves it (``move``; host time, the
    data wait on the CPU) and runs ``train(batch)``, bracketed by CUDA events on a GPU."""
    stream, wait = endless(loader), DataWait(device)

    def step():
        t = time.perf_counter()
        batch = move(next(stream))
        wait.fetched(time.perf_counter() - t)
        events = wait.bracket()
        if events:
            events[0].record()
        train(batch)
        if events:
            events[1].record()

    try:
        return measure(step, cfg.optim.batch_size, device_sync(device), s, label, on_window=wait.window, rounds=rounds)
    finally:
        stream.close()


def stage_loader(kind: str, data, cfg, device, s) -> dict:
    stream = endless(pretrain_loader(kind, data, cfg, device))
    try:
        out = measure(lambda: next(stream), cfg.optim.batch_size, device_sync(device), s, kind,
                      rounds=worker_rounds(kind, cfg))
    finally:
        stream.close()
    where = f"DALI on {cfg.reader.decode}" if kind == "dali" else f"{cfg.reader.num_threads} DataLoader workers"
    return {**out, "where": where}


def synthetic_views(cfg, device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(cfg.seed)
    return tuple(to_device(torch.randn(batch, 3, size, size, generator=g), device, cfg.channels_last) for _ in range(2))


def new_learner(cfg, device):
    torch.manual_seed(cfg.seed)
    learner = Learner(cfg, device, DistInfo())
    learner.model.train()
    # The peak learning rate and the first tau: the step's cost does not depend on their values.
    return learner, scaled_lr(cfg.optim.lr, cfg.optim.batch_size), cfg.ema.tau_base


def stage_model(data, cfg, device, s) -> dict:
    learner, lr, tau = new_learner(cfg, device)
    view1, view2 = synthetic_views(cfg, device, cfg.optim.batch_size)
    out = measure(lambda: learner.step([(view1, view2)], lr, tau), cfg.optim.batch_size, device_sync(device), s, "model")
    return {**out, "precision": str(learner.amp_dtype).replace("torch.", "")}


def stage_e2e(kind: str, data, cfg, device, s) -> dict:
    learner, lr, tau = new_learner(cfg, device)
    return measure_fed(pretrain_loader(kind, data, cfg, device),
                       lambda views: tuple(to_device(v, device, cfg.channels_last) for v in views),
                       lambda views: learner.step([views], lr, tau), cfg, device, s, f"e2e-{kind}",
                       rounds=worker_rounds(kind, cfg))


def new_classifier(cfg, device, num_classes: int):
    """Linear evaluation's classifier (byol_fast.classifier) on a fresh encoder of the config's backbone,
    and linear evaluation's peak learning rate for this batch (the cost does not depend on it)."""
    torch.manual_seed(cfg.seed)
    encoder, width = build_encoder(cfg.model.backbone)
    clf = LinearClassifier(encoder, width, num_classes, device, DistInfo(), resolve_precision(cfg.precision, device),
                           cfg.channels_last)
    return clf, scaled_lr(LinearConfig.lr, cfg.optim.batch_size)


def stage_linear(data, cfg, device, s) -> dict:
    clf, lr = new_classifier(cfg, device, 1000)
    images, _ = synthetic_views(cfg, device, cfg.optim.batch_size)
    images = to_device(images, device, clf.memory_format == torch.channels_last)  # once, not in every step
    labels = torch.randint(0, 1000, (cfg.optim.batch_size,), device=device)
    return measure(lambda: clf.step(clf.encode(images), labels, lr), cfg.optim.batch_size, device_sync(device), s,
                   "linear")


def stage_e2e_linear(data, cfg, device, s) -> dict:
    """Linear evaluation's training loader (byol_fast.loaders.eval_loader, DALI: random resized crop + flip),
    with the config's reader section, -> the classifier's step."""
    index = data["index"]
    if not index.labelled:  # a flat folder: labels do not change the cost
        index = dataclasses.replace(index, labels=[0] * len(index.files), classes=["all"])
    clf, lr = new_classifier(cfg, device, index.num_classes)
    loader = eval_loader(index, True, LinearDataConfig(image_size=cfg.data.image_size), reader_for("dali", cfg),
                         cfg.optim.batch_size, DistInfo(), device, cfg.seed)
    channels_last = clf.memory_format == torch.channels_last
    return measure_fed(loader, lambda b: (to_device(b[0], device, channels_last), b[1].to(device, non_blocking=True)),
                       lambda b: clf.step(clf.encode(b[0]), b[1], lr), cfg, device, s, "e2e-linear")


def run_stage(name: str, data: dict, cfg, device, s) -> dict:
    """One stage with its peak memory; an error is recorded, printed and does not stop the run."""
    log(f"\n== stage {name}: {LABELS[name]}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fn = {"dali": lambda: stage_loader("dali", data, cfg, device, s),
          "torchvision": lambda: stage_loader("torchvision", data, cfg, device, s),
          "model": lambda: stage_model(data, cfg, device, s),
          "e2e-dali": lambda: stage_e2e("dali", data, cfg, device, s),
          "e2e-torchvision": lambda: stage_e2e("torchvision", data, cfg, device, s),
          "linear": lambda: stage_linear(data, cfg, device, s),
          "e2e-linear": lambda: stage_e2e_linear(data, cfg, device, s)}[name]
    t = time.perf_counter()
    with HostPeak() as host:
        try:
            out = fn()
            error = None
        except Exception as e:  # noqa: BLE001  one failing stage (a missing loader, OOM) must not lose the others
            traceback.print_exc(file=sys.stderr)
            log(f"  stage {name} FAILED: {type(e).__name__}: {e}")
            out, error = {"img_per_s": None}, f"{type(e).__name__}: {e}"
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            out["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            out["gpu_used_gb"] = (total - free) / 2**30  # device-wide: torch's cache plus DALI's pools
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"label": LABELS[name], **out, "host_peak_rss_gb": host.peak / 2**30, "seconds": time.perf_counter() - t,
            "error": error}


# ---------------------------------------------------------------------------- data


def benchmark_data(args, s: dict, cfg) -> tuple[object, dict]:
    """The checked index (byol_fast.index) of the files every loader reads, and a description of them."""
    if args.data:
        index = load_index(args.data, workers=cfg.reader.index_workers)
        return index, {"source": str(Path(args.data).absolute()), "num_images": len(index.files)}
    import imagenet_like

    log(f"ImageNet-like JPEGs: {s['num_images']} under {args.bench_data}")
    root = imagenet_like.make_dataset(args.bench_data, s["num_images"], seed=s["seed"])
    index = load_index(root / "train", workers=cfg.reader.index_workers)
    return index, {"source": str(root), **imagenet_like.describe(root), "num_images": len(index.files)}


# ---------------------------------------------------------------------------- report


def ratios(stages: dict) -> dict:
    """The comparisons that matter; None where a figure is missing."""

    def med(name):
        st = stages.get(name)
        return st["img_per_s"]["median"] if st and st.get("img_per_s") else None

    def div(a, b):
        return a / b if a is not None and b else None

    best_e2e = max((v for v in (med("e2e-dali"), med("e2e-torchvision")) if v), default=None)
    return {
        "dali_vs_torchvision_loader": div(med("dali"), med("torchvision")),
        "e2e_dali_vs_model": div(med("e2e-dali"), med("model")),
        "e2e_torchvision_vs_model": div(med("e2e-torchvision"), med("model")),
        "e2e_dali_vs_e2e_torchvision": div(med("e2e-dali"), med("e2e-torchvision")),
        "model_vs_8xV100_target": div(med("model"), TARGET_BYOL_8XV100),
        "e2e_dali_vs_8xV100_target": div(med("e2e-dali"), TARGET_BYOL_8XV100),
        "devices_like_this_for_8xV100_target": div(TARGET_BYOL_8XV100, best_e2e or med("model")),
        "linear_vs_8gpu_linear_target": div(med("linear"), TARGET_LINEAR_8GPU),
    }


RATIO_TEXT = {
    "dali_vs_torchvision_loader": "DALI loader / torchvision loader",
    "e2e_dali_vs_model": "end to end DALI / training step alone",
    "e2e_torchvision_vs_model": "end to end torchvision / training step alone",
    "e2e_dali_vs_e2e_torchvision": "end to end DALI / end to end torchvision",
    "model_vs_8xV100_target": "training step: this device / 8x V100 target (3,121 img/s)",
    "e2e_dali_vs_8xV100_target": "end to end DALI: this device / 8x V100 target (3,121 img/s)",
    "devices_like_this_for_8xV100_target": "devices like this one to match 8x V100 (best end to end)",
    "linear_vs_8gpu_linear_target": "linear eval: this device / 8-GPU linear target (5,408 img/s)",
}


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(result: dict) -> str:
    """The results as Markdown: settings line, the table, the ratios (parsed by tests/test_throughput.py)."""
    s, env, cfg = result["settings"], result["environment"], result["config"]
    reader = cfg["reader"]
    dev = env.get("gpu") or f"CPU ({env['cpu']}, {s['cores']} cores)"
    load = env.get("loadavg_start")
    lines = [f"device: {dev} | {env['date_utc']} | torch {env['torch']}, torchvision {env['torchvision']}, "
             f"DALI {env['dali']}, CUDA {env['cuda']}" + (f" | load average before: {load[0]:.2f}" if load else ""),
             f"model: {cfg['model']['backbone']} at {cfg['data']['image_size']} px, batch {s['batch']}, precision "
             f"{result['stages'].get('model', {}).get('precision', cfg['precision'])}, channels_last {cfg['channels_last']}, "
             f"compile {cfg['compile']} | DALI decode on {reader['decode']}, {reader['num_threads']} threads "
             f"= {reader['num_threads']} DataLoader workers, prefetch {reader['prefetch']} | "
             f"{result['dataset']['num_images']} images",
             "", TABLE_BEGIN, "",
             "| stage | median | min | max | data wait | peak memory (GB) |",
             "|---|---:|---:|---:|---:|---|"]
    for name, st in result["stages"].items():
        if st.get("img_per_s") is None:
            lines.append(f"| {name} | missing | - | - | - | {st['error']} |")
            continue
        r = st["img_per_s"]
        mem = f"host {st['host_peak_rss_gb']:.2f}"
        if "gpu_peak_allocated_gb" in st:
            mem = f"gpu {st['gpu_peak_allocated_gb']:.2f} (device {st['gpu_used_gb']:.2f}), " + mem
        wait = _fmt(st.get("data_wait_fraction"), 3)
        lines.append(f"| {name} | {r['median']:.1f} | {r['min']:.1f} | {r['max']:.1f} | {wait} | {mem} |")
    lines += ["", RATIOS_BEGIN, ""]
    for key, value in result["ratios"].items():
        if value is not None:
            lines.append(f"- {RATIO_TEXT[key]}: {value:.3f}  (`{key}`)")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Horizontal bars: median img/s per stage with min-max whiskers; public anchors in grey on a GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"dali": "#1f77b4", "torchvision": "#9ecae1", "model": "#ff7f0e", "e2e-dali": "#2ca02c",
               "e2e-torchvision": "#98df8a", "linear": "#9467bd", "e2e-linear": "#c5b0d5"}
    names, med, lo, hi, cols = [], [], [], [], []
    for name, st in result["stages"].items():
        r = st.get("img_per_s")
        names.append(LABELS[name] + ("" if r else " (failed)"))
        med.append(r["median"] if r else 0.0)
        lo.append(r["median"] - r["min"] if r else 0.0)
        hi.append(r["max"] - r["median"] if r else 0.0)
        cols.append(colours.get(name, "#7f7f7f"))
    if result["settings"]["device"] == "cuda":
        for label, value in PEERS.items():
            names.append(label)
            med.append(value), lo.append(0.0), hi.append(0.0), cols.append("#bbbbbb")
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.6))
    y = list(range(len(names)))[::-1]
    ax.barh(y, med, xerr=[lo, hi], color=cols, capsize=3)
    for yi, m, h in zip(y, med, hi):
        ax.text(m + h, yi, f"  {m:,.0f}", va="center", fontsize=9)
    ax.set_yticks(y, names)
    ax.set_xlabel("images / s (median of timed windows; whiskers: min-max)")
    env, cfg = result["environment"], result["config"]
    ax.set_title(f"{env.get('gpu') or 'CPU, ' + str(result['settings']['cores']) + ' cores'}: "
                 f"{cfg['model']['backbone']} {cfg['data']['image_size']}px, batch {result['settings']['batch']}",
                 fontsize=10)
    ax.set_xlim(0, max(med + [1.0]) * 1.18)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    try:
        s = resolve(args)
        cfg = build_config(args, s, extra)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(s["device"])
    if device.type == "cpu":
        torch.set_num_threads(s["torch_threads"])
    torch.backends.cudnn.benchmark = s["cudnn_benchmark"]
    env = environment(device)
    env["loadavg_start"] = _loadavg()
    log(f"byol_fast throughput | {env.get('gpu') or 'CPU'} | stages {', '.join(s['stages'])}")
    if env["loadavg_start"] and env["loadavg_start"][0] > 0.5 * s["cores"]:
        log(f"warning: the machine is busy before the run (load average {env['loadavg_start'][0]:.1f} on "
            f"{s['cores']} cores): CPU-side figures will be low and noisy")
    index, dataset = benchmark_data(args, s, cfg)
    if len(index.files) < cfg.optim.batch_size:
        print(f"error: {len(index.files)} images cannot fill one batch of {cfg.optim.batch_size}", file=sys.stderr)
        return 2
    stages = {name: run_stage(name, {"index": index}, cfg, device, s) for name in s["stages"]}
    env["loadavg_end"] = _loadavg()
    result = {"settings": s, "environment": env, "config": to_dict(cfg), "dataset": dataset,
              "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
              "stages": stages, "ratios": ratios(stages),
              "targets": {"byol_8xV100": TARGET_BYOL_8XV100, "linear_8gpu": TARGET_LINEAR_8GPU}}
    text = render(result)
    print("\n" + text, flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {args.json}")
    if args.plot:
        try:
            plot(result, args.plot)
            log(f"wrote {args.plot}")
        except Exception as e:  # noqa: BLE001  a plotting problem must not lose the measured figures
            log(f"plot failed: {type(e).__name__}: {e}")
    return 0 if all(st["error"] is None for st in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
