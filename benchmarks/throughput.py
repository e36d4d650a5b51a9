"""Images per second, stage by stage: ``python benchmarks/throughput.py [--quick] [--json PATH] [--plot PATH]``.
The GPU suite (``bash benchmarks/gpu_checks.sh``) runs it once with every variant it measures.

What it measures, in one process, side by side on the same files and the same cores:

1. ``dali``, ``torchvision``: the two-view data pipeline alone (decode once, two augmented views):
   byol_fast's DALI pipeline, and the torchvision/PIL DataLoader doing the same recipe with as many
   worker processes as DALI has threads (the way peer projects load data). Every loader is built by
   :mod:`byol_fast.datasets.loaders`, as the drivers build theirs, from the config's ``reader`` section.
   Batches are taken where each loader delivers them (the GPU for DALI with ``--decode gpu``, host
   memory for the DataLoader).
2. ``shards``: the same images read as a shard set through the same DALI two-view pipeline, so that
   files and shards are compared side by side (``vs_files``: its img/s over the ``dali`` stage's with
   the same reader settings and batch, measured in the same run). The benchmark's index is packed by
   :func:`byol_fast.datasets.shard_pack.pack` into ``<bench-data>/scratch`` once per run (a later variant of the
   same ``shard_size`` reads it again; removed at the end) and opened by
   :func:`byol_fast.datasets.shard_set.open_shard_set`; the stage records the packing speed (``pack_mb_per_s``,
   the source files read from the page cache, each shard fsynced), the shards and their sizes; its
   peak memory leaves the packing out (``pack_host_peak_rss_gb``). Shard size:
   ``shard_size=`` (e.g. ``shards:shard_size=64MB``), by default the data in about 8 shards.
3. ``model``: the BYOL training step alone on synthetic device tensors, through
   :class:`byol_fast.pretrain.learner.Learner` (the code ``byol_fast.train`` runs): both views, online
   forward/backward, target forward, LARS, EMA.
4. ``e2e-dali``, ``e2e-torchvision``: loader -> device -> training step, and the fraction of the
   time the training step waits for data.
5. ``linear``, ``e2e-linear`` (``--linear``): linear evaluation's step
   (:class:`byol_fast.evaluation.classifier.LinearClassifier`: frozen encoder forward, linear layer
   forward/backward, SGD) on synthetic device tensors, and fed by linear evaluation's training
   loader (DALI: random resized crop + flip).
6. ``checkpoint``: the training-loop pause of a checkpoint on the BYOL learner's state, measured by
   ``benchmarks/checkpoint_pause.py``'s ``measure(state, directory, repeats)`` (imported only when the
   stage runs; if it is missing or fails, the stage records why and the others go on).

Method: each stage runs warm-up steps (pipeline build, worker start, cuDNN/compile warm-up), then
times ``--windows`` windows of a fixed number of steps, chosen from a calibration so a window
lasts about ``--window-seconds``; on a GPU each window ends with ``torch.cuda.synchronize()``.
A figure is the median over the windows, with their min and max. One image is one source image
(both of its views), the unit of the 8x V100 target (docs/reference.md section 2).

Data wait (``data_wait_fraction`` of each end-to-end stage): on a GPU, CUDA events bracket each
training step on its stream; the wait fraction is ``1 - (sum of step spans) / window time``, the
share of the time the training stream had no step to run (loading, host-to-device copy; with it
``host_fetch_fraction``, the host's share of the window inside the loader). On the CPU, where
everything is synchronous, it is the share of the time spent fetching and moving the batch.

Data: ImageNet-like JPEGs made by ``benchmarks/imagenet_like.py`` into ``bench_data/`` (ignored by
git), or ``--data`` (a folder or a byol_fast index file). Files are read through the page cache:
the figures exclude storage speed.

Stage variants: ``--stages`` takes ``NAME[:key=value...]`` entries, so one process can measure
settings side by side (``model,model:batch=512,model:compile=default,dali:hw=1.0,e2e-dali:step=best``):
``batch=N``, ``compile=off|MODE`` (a ``compile_mode`` of the config), ``hw=F`` (hardware-decoder load),
``threads=N``, ``prefetch=N``, ``shard_size=SIZE`` (the ``shards`` stage), ``loss=instance|pixpro|
instance+pixpro`` (the ``model`` stage: PixPro's step on synthetic views and crop windows), ``windows=N``,
``window_seconds=S``, ``warmup=N``, ``timeout=S|rest`` (the stage's time box) and, for an end-to-end
stage, ``step=best``: the training step of the fastest ``model`` variant measured before it (its batch
and compile mode; the very same compiled learner when it is still warm). ``--time-budget S`` bounds
the whole run: each stage's box is cut so that the stages after it keep a share; a stage with no time
left is skipped and says so.

Any extra ``--section.key=value`` argument is a config override, as for ``byol_fast.train``
(e.g. ``--data.interp=linear``, ``--reader.prefetch=3``). A stage that fails, runs out of GPU
memory or out of time prints why; the others still run and the figure is null in the JSON, which
is rewritten after every stage (so a run killed from outside keeps what it measured).
"""
from __future__ import annotations

import time

# The process's start, before torch's import: --time-budget counts from here, as the outer timeout
# of benchmarks/gpu_checks.sh does, so that the stages' own time boxes always end first.
T_START = time.monotonic()

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from byol_fast.evaluation.classifier import LinearClassifier  # noqa: E402
from byol_fast.errors import ConfigError
from byol_fast.config import LinearConfig, LinearDataConfig, load_config, merge, parse_overrides, to_dict
from byol_fast.runtime.dist import DistInfo  # noqa: E402
from byol_fast.datasets.index import load_index  # noqa: E402
from byol_fast.pretrain.learner import Learner  # noqa: E402
from byol_fast.datasets.loaders import eval_loader, two_view_loader  # noqa: E402
from byol_fast.models.resnet import build_encoder  # noqa: E402
from byol_fast.runtime.device import resolve_device, resolve_precision, to_device  # noqa: E402
from byol_fast.optim.schedules import scaled_lr  # noqa: E402
from byol_fast.datasets.shard_set import open_shard_set  # noqa: E402
from byol_fast.datasets.shard_pack import pack, parse_size  # noqa: E402

# docs/reference.md section 2: BYOL ResNet-50 224 px on 8x V100 with AMP (compute bound), and the
# linear-evaluation figure DeepSparkHub reports for its mmpretrain-based BYOL recipe on 8 GPUs.
TARGET_BYOL_8XV100 = 3121.0
TARGET_LINEAR_8GPU = 5408.0
# Other public anchors drawn beside the measured bars on a GPU (same section).
PEERS = {"BYOL 1x V100 AMP (anchor)": 450.0, "BYOL 1x A100 AMP (anchor)": 926.0,
         "BYOL 8x V100 AMP (target)": TARGET_BYOL_8XV100}

STAGES = ("dali", "shards", "torchvision", "model", "e2e-dali", "e2e-torchvision", "linear", "e2e-linear", "checkpoint")
LINEAR_STAGES = ("linear", "e2e-linear")
OPT_IN_STAGES = LINEAR_STAGES + ("checkpoint",)  # not in the default list
LABELS = {
    "dali": "DALI two-view loader",
    "shards": "DALI two-view loader, shard set",
    "torchvision": "torchvision/PIL loader",
    "model": "training step (synthetic)",
    "e2e-dali": "end to end, DALI",
    "e2e-torchvision": "end to end, torchvision",
    "linear": "linear eval step (synthetic)",
    "e2e-linear": "linear eval end to end, DALI",
    "checkpoint": "checkpoint pause (BYOL learner state)",
}
BYOL_STEP_STAGES = ("model", "e2e-dali", "e2e-torchvision")  # the stages that run Learner.step
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
    p.add_argument("--stages", default="", help=f"comma-separated NAME[:key=value...] entries, NAME one of "
                   f"{','.join(STAGES)} (default: all but linear and checkpoint; variants: see above)")
    p.add_argument("--linear", action="store_true", help="also measure linear evaluation (synthetic and end to end)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--config", help="YAML recipe to start from (config/*.yaml); the options below override it")
    p.add_argument("--backbone", help="torchvision ResNet (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--image-size", type=int, help="side of each view (default: 224 on GPU, 64 on CPU)")
    p.add_argument("--batch", type=int, help="images per step (default: 256 on GPU, 32 on CPU)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), help="default: the config's (auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (config: compile)")
    p.add_argument("--compile-mode", help="torch.compile mode (config: compile_mode: default | reduce-overhead | "
                   "max-autotune | max-autotune-no-cudagraphs); implies --compile")
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
    p.add_argument("--time-budget", type=float, help="seconds for the whole run: every stage is time-boxed "
                   "within it (default: no limit)")
    p.add_argument("--stage-timeout", type=float, help="time box of a stage without its own timeout= (default: none)")
    p.add_argument("--stage-reserve", type=float, default=20.0, help="with --time-budget: seconds kept for each "
                   "later stage while one runs (default 20)")
    p.add_argument("--checkpoint-repeats", type=int, default=3, help="saves timed by the checkpoint stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure and setting here")
    p.add_argument("--plot", help="write a PNG bar chart here")
    return p.parse_known_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    """Every setting the run uses, defaults filled in by device type."""
    cuda = resolve_device(args.device).type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] or [s for s in STAGES if s not in OPT_IN_STAGES]
    if args.linear:
        stages += [s for s in LINEAR_STAGES if s not in stages]
    for key in stages:
        parse_stage(key)  # every entry checked before any work
    if len(set(stages)) < len(stages):
        raise ConfigError(f"--stages: {next(k for k in stages if stages.count(k) > 1)!r} is given twice")
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
        "warmup": args.warmup if args.warmup is not None else (10 if args.compile or args.compile_mode else 3),
        "warmup_given": args.warmup is not None,  # else a compiled stage variant warms up for 10 steps
        "time_budget": args.time_budget,
        "stage_timeout": args.stage_timeout,
        "stage_reserve": args.stage_reserve,
        "checkpoint_repeats": args.checkpoint_repeats,
        "cudnn_benchmark": args.cudnn_benchmark,
        "quick": quick,
        "seed": args.seed,
    }


# ---------------------------------------------------------------------------- stage variants


def _int(lo: int):
    def conv(v: str) -> int:
        n = int(v)
        if n < lo:
            raise ValueError(f"must be >= {lo}")
        return n
    return conv


def _float_in(lo: float, hi: float, open_lo: bool = False):
    def conv(v: str) -> float:
        x = float(v)
        if not (lo < x if open_lo else lo <= x) or x > hi:
            raise ValueError(f"must be in {'(' if open_lo else '['}{lo}, {hi}]")
        return x
    return conv


def _timeout(v: str):
    return "rest" if v == "rest" else _float_in(0.0, 1e9, open_lo=True)(v)


def _compile(v: str):
    return False if v in ("off", "false", "eager") else v  # a mode name, checked by the config


def _size(v: str) -> int:
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError("not a size (e.g. 64MB, 256MiB, 1GB)") from None


def _loss(v: str) -> str:
    if v not in ("instance", "pixpro", "instance+pixpro"):
        raise ValueError("instance, pixpro or instance+pixpro")
    return v


def _step(v: str):
    if v != "best":
        raise ValueError("only 'best' (the fastest model variant measured before this stage)")
    return v


LOADER_STAGES = ("dali", "shards", "torchvision", "e2e-dali", "e2e-torchvision", "e2e-linear")
DALI_STAGES = ("dali", "shards", "e2e-dali", "e2e-linear")
# key -> (converter, stages it applies to): an option a stage would ignore is refused, not silently dropped.
STAGE_OPTIONS = {
    "batch": (_int(1), STAGES),
    "compile": (_compile, BYOL_STEP_STAGES),
    "step": (_step, ("e2e-dali", "e2e-torchvision")),
    "hw": (_float_in(0.0, 1.0), DALI_STAGES),
    "threads": (_int(1), LOADER_STAGES),
    "prefetch": (_int(1), DALI_STAGES),
    "shard_size": (_size, ("shards",)),
    "loss": (_loss, ("model",)),
    "windows": (_int(1), STAGES),
    "window_seconds": (_float_in(0.0, 1e6, open_lo=True), STAGES),
    "warmup": (_int(0), STAGES),
    "timeout": (_timeout, STAGES),
}


def parse_stage(key: str) -> tuple[str, dict]:
    """``'model:batch=384:compile=default'`` -> ``('model', {'batch': 384, 'compile': 'default'})``."""
    name, *pairs = key.split(":")
    if name not in STAGES:
        raise ConfigError(f"--stages: unknown stage {name!r} (choose from {', '.join(STAGES)})")
    opts: dict = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or k not in STAGE_OPTIONS:
            raise ConfigError(f"--stages: {key!r}: {pair!r} is not key=value with a key of {', '.join(STAGE_OPTIONS)}")
        conv, applies = STAGE_OPTIONS[k]
        if name not in applies:
            raise ConfigError(f"--stages: {key!r}: {k}= does not apply to the {name} stage")
        try:
            opts[k] = conv(v)
        except ValueError as e:
            raise ConfigError(f"--stages: {key!r}: {k}={v!r}: {e}") from None
    return name, opts


def stage_overrides(opts: dict) -> dict:
    """The config overrides of a stage's options (the rest are measurement settings)."""
    over: dict = {}
    if "batch" in opts:
        over["optim"] = {"batch_size": opts["batch"]}
    if "compile" in opts:
        over["compile"] = opts["compile"] is not False
        if opts["compile"]:
            over["compile_mode"] = opts["compile"]
    reader = {dst: opts[src] for src, dst in (("hw", "hw_decoder_load"), ("threads", "num_threads"),
                                               ("prefetch", "prefetch")) if src in opts}
    if reader:
        over["reader"] = reader
    if "loss" in opts:
        over["model"] = {"loss": opts["loss"]}
    return over


def blur_kernel_for(size: int) -> int:
    """The paper's blur window is 10% of the view side (23 at 224), made odd."""
    return 23 if size == 224 else max(3, round(size / 10) | 1)


def build_config(args: argparse.Namespace, s: dict, extra: list[str], stage: dict | None = None):
    """The byol_fast Config a stage runs: recipe <- benchmark settings <- extra overrides <- the stage
    variant's overrides (``stage``, from :func:`stage_overrides`), checked by the config's own rules.
    How images are read (threads, decode, prefetch, hardware decoder) lives in its ``reader``
    section, which every loader, the linear one included, takes whole."""
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
    if args.compile or args.compile_mode:
        over["compile"] = True
    if args.compile_mode:
        over["compile_mode"] = args.compile_mode
    if args.no_channels_last:
        over["channels_last"] = False
    return load_config(args.config, merge(merge(over, parse_overrides(extra)), stage or {}))


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
        from byol_fast.runtime.process import git_revision

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
        self.peak, self._stop, self._lock, self._round = 0, threading.Event(), threading.Lock(), 0
        self._ok = Path(f"/proc/{os.getpid()}/statm").exists()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._ok:
            started, rss = self._round, _tree_rss(os.getpid())
            with self._lock:
                if started == self._round:  # not a sample taken before a restart
                    self.peak = max(self.peak, rss)
            if self._stop.wait(0.1):
                break

    def restart(self) -> int:
        """The peak so far; from here on the peak starts again from the present resident memory, so
        that a stage's set-up (the packing of the shards stage) stays out of its figure."""
        now = _tree_rss(os.getpid()) if self._ok else 0
        with self._lock:
            peak, self.peak, self._round = max(self.peak, now), now, self._round + 1
        return peak

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

    ``s['deadline']`` (time.monotonic(), optional): the stage's time box. Windows are shortened so
    that all of them fit before it, and a window that would end after it is not started once one
    has been timed (``windows_cut_short``): a figure from fewer windows beats no figure.
    """
    warmup = s["warmup"] + (rounds if rounds > 1 else 0)
    log(f"  warm-up: {warmup} steps")
    t = time.perf_counter()
    first = None
    for i in range(warmup):
        step()
        if i == 0:  # the first step builds what is lazy (cuDNN plans, torch.compile's graphs): its own figure
            sync()
            first = time.perf_counter() - t
    sync()
    warmup_seconds = time.perf_counter() - t
    if on_window:
        on_window(None)  # reset the counters the warm-up filled
    t = time.perf_counter()
    calib = max(2, rounds)
    for _ in range(calib):
        step()
    sync()
    calib_seconds = time.perf_counter() - t
    per_step = calib_seconds / calib
    windows, window_seconds = s["windows"], s["window_seconds"]
    deadline = s.get("deadline")
    steps = max(3, math.ceil(window_seconds / max(per_step, 1e-6)))
    steps = rounds * math.ceil(steps / rounds)
    rates, extras, cut = [], {}, False
    if deadline:  # shrink the windows (not their number) to what is left of the box, with a margin
        left = 0.9 * (deadline - time.monotonic()) - 1.0
        window_seconds = max(min(window_seconds, left / windows), 0.0)
        steps = rounds * math.ceil(max(3, math.ceil(window_seconds / max(per_step, 1e-6))) / rounds)
        if steps * per_step > left:
            # Not even one window fits: the calibration steps, timed like a window, are the figure
            # (one short window, flagged) rather than a stage that times out with none.
            log(f"  [{label}] no time left for a window: the {calib} calibration steps are the figure")
            rates.append(calib * images_per_step / calib_seconds)
            more = on_window(calib_seconds) if on_window else {}
            for k, v in more.items():
                extras.setdefault(k, []).append(v)
            windows, steps, cut = 0, calib, True
    log(f"  {per_step * 1e3:.1f} ms/step after warm-up ({warmup_seconds:.1f} s): {windows} windows of {steps} steps")
    if on_window and windows:
        on_window(None)  # reset the counters the calibration steps filled
    for w in range(windows):
        if deadline and rates and time.monotonic() + steps * per_step > deadline:
            log(f"  [{label}] {len(rates)} of {windows} windows: the stage's time box ends before another")
            cut = True
            break
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()  # host sync: the window's work is finished before the clock stops
        dt = time.perf_counter() - t0
        per_step = dt / steps
        rates.append(steps * images_per_step / dt)
        more = on_window(dt) if on_window else {}
        for k, v in more.items():
            extras.setdefault(k, []).append(v)
        note = "".join(f", {k} {v:.3f}" for k, v in more.items())
        log(f"  [{label}] window {w + 1}/{windows}: {rates[-1]:.1f} img/s{note}")
    out = {"img_per_s": summary(rates), "steps_per_window": steps, "warmup_steps": warmup,
           "warmup_seconds": warmup_seconds, "first_step_seconds": first,
           "step_ms": 1e3 * images_per_step / statistics.median(rates), "windows_cut_short": cut}
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
        clamp = lambda x: min(1.0, max(0.0, x))  # noqa: E731
        out = {}
        if self.cuda:  # the events are complete: the window ended with a synchronize
            busy = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
            wait = 1.0 - busy / seconds
            # The host's view beside the GPU's: the share of the window spent in next(loader) and the
            # copy. Not itself a wait of the GPU: the host queues steps ahead of it (Learner.step has
            # no host sync), so this time overlaps GPU work until the queue runs dry.
            out["host_fetch_fraction"] = clamp(self.host_wait / seconds)
        else:
            wait = self.host_wait / seconds
        self.reset()
        return {"data_wait_fraction": clamp(wait), **out}


# ---------------------------------------------------------------------------- stages


def device_sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def reader_for(kind: str, cfg):
    """The config's reader section with ``loader`` set to the stage's kind (dali | torchvision)."""
    return dataclasses.replace(cfg.reader, loader=kind)


def pretrain_loader(kind: str, dataset, cfg, device: torch.device):
    """The two-view loader byol_fast.train builds (byol_fast.datasets.loaders), for a world of one, over
    ``dataset``: the benchmark's index (its files) or a shard set."""
    return two_view_loader(dataset, cfg.data, reader_for(kind, cfg), cfg.optim.batch_size, DistInfo(), device,
                           cfg.seed)


def loader_signature(kind: str, cfg) -> dict:
    """What makes two loader stages the same pipeline (reader settings, batch): a shards figure is
    compared with the files figure of the same signature (dali stage), never with another setting."""
    return {"reader": dataclasses.asdict(reader_for(kind, cfg)), "batch": cfg.optim.batch_size}


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


def stage_loader(kind: str, dataset, cfg, device, s, label: str | None = None) -> dict:
    """A loader alone (``kind``: dali | torchvision) over ``dataset`` (files or a shard set)."""
    stream = endless(pretrain_loader(kind, dataset, cfg, device))
    try:
        out = measure(lambda: next(stream), cfg.optim.batch_size, device_sync(device), s, label or kind,
                      rounds=worker_rounds(kind, cfg))
    finally:
        stream.close()
    where = f"DALI on {cfg.reader.decode}" if kind == "dali" else f"{cfg.reader.num_threads} DataLoader workers"
    return {**out, "where": where, "loader": loader_signature(kind, cfg)}


DEFAULT_SHARDS = 8  # without shard_size=: the benchmark's images in about this many shards


def default_shard_bytes(index) -> int:
    """An eighth of the index's bytes (at least 1 MB, at most the CLI's 1 GB), so that even a small
    benchmark set reads from several shards."""
    total = sum(os.path.getsize(f) for f in index.files)
    return min(10**9, max(10**6, math.ceil(total / DEFAULT_SHARDS)))


def packed_shards(data: dict, cfg, s: dict, shard_bytes: int) -> tuple[object, dict]:
    """The benchmark's index as a shard set of ``shard_bytes`` shards (byol_fast.datasets.shard_pack.pack), packed
    once per run in a new folder under the scratch folder and opened (and checked) by
    byol_fast.datasets.shard_set; a later stage asking for the same size gets the same set. Returns the set and
    what packing it measured (``packed_here``: False for a later stage reading a set packed before)."""
    sets = data.setdefault("shard_sets", {})
    fresh = shard_bytes not in sets
    if fresh:
        scratch = Path(data["scratch"])
        scratch.mkdir(parents=True, exist_ok=True)
        # On the benchmark's disk (bench_data/, as a real shard set would be), not /tmp, which may be RAM.
        folder = Path(tempfile.mkdtemp(prefix="shards_", dir=scratch))
        sets[shard_bytes] = (folder, None, None)  # removed at the end of the run even if packing fails
        workers = cfg.reader.index_workers or s["cores"]
        log(f"  packing {len(data['index'].files)} images into shards of at most {shard_bytes / 1e6:.1f} MB "
            f"({workers} threads) under {folder}")
        t = time.perf_counter()
        manifest = pack(data["index"], folder, shard_bytes, s["seed"], workers, progress=False)
        pack_seconds = time.perf_counter() - t
        host = s.get("host_peak")
        pack_peak = host.restart() if host else None  # the packing's buffers: not the reader's memory
        t = time.perf_counter()
        shard_set = open_shard_set(str(folder))
        sizes = [sh["bytes"] for sh in manifest["shards"]]
        record = {"pack_mb_per_s": manifest["packed_mb_per_s"], "pack_seconds": pack_seconds,
                  "pack_host_peak_rss_gb": None if pack_peak is None else pack_peak / 2**30,
                  "open_seconds": time.perf_counter() - t, "shard_bytes": shard_bytes, "shards": len(sizes),
                  "shard_sizes_bytes": sizes, "packed_bytes": sum(sizes), "packed_samples": manifest["num_samples"],
                  "num_samples": len(shard_set), "shard_set": str(folder)}
        log(f"  {record['packed_samples']} images, {sum(sizes) / 1e6:.1f} MB in {len(sizes)} shards, packed at "
            f"{record['pack_mb_per_s']:.1f} MB/s ({pack_seconds:.1f} s)")
        sets[shard_bytes] = (folder, shard_set, record)
    folder, shard_set, record = sets[shard_bytes]
    if shard_set is None:
        raise StageUnavailable(f"packing {folder} failed in an earlier stage")
    return shard_set, {**record, "packed_here": fresh}


def remove_shard_sets(data: dict) -> None:
    """The shard sets packed in this run: removed once every stage has run."""
    for folder, _, _ in data.pop("shard_sets", {}).values():
        shutil.rmtree(folder, ignore_errors=True)


def stage_shards(data, cfg, device, s, shard_bytes: int | None) -> dict:
    """The ``dali`` stage's loader and measurement over the same images packed as a shard set."""
    shard_set, record = packed_shards(data, cfg, s, shard_bytes or default_shard_bytes(data["index"]))
    out = stage_loader("dali", shard_set, cfg, device, s, "shards")
    return {**out, **record, "where": f"DALI on {cfg.reader.decode}, {record['shards']} shards"}


def synthetic_views(cfg, device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(cfg.seed)
    return tuple(to_device(torch.randn(batch, 3, size, size, generator=g), device, cfg.channels_last) for _ in range(2))


def synthetic_windows(cfg, device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop windows (x0, y0, x1, y1, flip) of a 500 x 400 image for the two views, overlapping by
    half, no flips: what a PixPro step needs besides its views (its cost does not depend on them)."""
    first = torch.tensor([0.0, 0.0, 300.0, 300.0, 0.0]).repeat(batch, 1)
    second = torch.tensor([150.0, 100.0, 450.0, 400.0, 0.0]).repeat(batch, 1)
    return first.to(device), second.to(device)


def new_learner(cfg, device):
    torch.manual_seed(cfg.seed)
    learner = Learner(cfg, device, DistInfo())
    learner.model.train()
    # The peak learning rate and the first tau: the step's cost does not depend on their values.
    return learner, scaled_lr(cfg.optim.lr, cfg.optim.batch_size), cfg.ema.tau_base


def step_signature(cfg, precision: str) -> dict:
    """What makes two BYOL steps the same step: an end-to-end figure is compared with the step alone
    of the same signature (model stage), never with another batch or compile mode."""
    return {"backbone": cfg.model.backbone, "loss": cfg.model.loss, "image_size": cfg.data.image_size,
            "batch": cfg.optim.batch_size,
            "compile": getattr(cfg, "compile_mode", "default") if cfg.compile else False, "precision": precision}


def _precision(learner) -> str:
    return str(learner.amp_dtype).replace("torch.", "")


def fresh_compile(data: dict) -> None:
    """Before a compiled learner is built: forget torch.compile's graphs, so that its warm-up time is
    its own compile time and earlier stages' graphs do not fill dynamo's recompile limit (past it,
    dynamo runs the model eagerly without failing, and the 'compiled' figure would be eager's).
    A kept compiled learner would have to compile again: it is let go."""
    torch._dynamo.reset()
    _dynamo_counters().clear()
    if data.get("kept") and data["kept"][1].cfg.compile:
        data["kept"] = None


def _dynamo_counters():
    from torch._dynamo.utils import counters  # internal but stable since torch 2.0; figures for the record only

    return counters


def dynamo_figures(cfg) -> dict:
    """Graph breaks and graphs of a compiled stage (a break or an unexpected recompile costs speed)."""
    if not cfg.compile:
        return {}
    try:
        c = _dynamo_counters()
        return {"dynamo_graph_breaks": sum(c["graph_break"].values()),
                "dynamo_unique_graphs": c["stats"].get("unique_graphs", 0)}
    except Exception:  # noqa: BLE001  a label, never a reason to lose the stage
        return {}


def keep_if_fastest(data: dict, key: str, learner, rate: float) -> None:
    """Keep the fastest model stage's learner warm for ``step=best`` end-to-end stages: with
    torch.compile they then time the very same compiled step, without compiling it again. One
    learner at most (its weights and LARS state, about 0.4 GB for ResNet-50), so that the memory
    figures and OOM probes of later stages are not distorted by a collection of them."""
    kept = data.get("kept")
    if kept is None or rate > kept[2]:
        data["kept"] = (key, learner, rate)


def stage_model(data, cfg, device, s, key) -> dict:
    if cfg.compile:
        fresh_compile(data)
    learner, lr, tau = new_learner(cfg, device)
    inputs = synthetic_views(cfg, device, cfg.optim.batch_size)
    if learner.byol.pixels:  # PixPro pairs pixels by the views' crop windows: two overlapping ones
        inputs += synthetic_windows(cfg, device, cfg.optim.batch_size)
    out = measure(lambda: learner.step([inputs], lr, tau), cfg.optim.batch_size, device_sync(device), s, key)
    keep_if_fastest(data, key, learner, out["img_per_s"]["median"])
    # skipped_steps: a step whose loss is not finite skips LARS and EMA and is cheaper; on synthetic
    # views this should stay 0, else the figure flatters the step.
    return {**out, "precision": _precision(learner), "step": step_signature(cfg, _precision(learner)),
            "skipped_steps": learner.skipped_total, **dynamo_figures(cfg)}


def stage_e2e(kind: str, data, cfg, device, s, key, best: str | None = None) -> dict:
    """Loader -> device -> BYOL step. ``best``: the model stage whose step this one runs (``step=best``);
    its learner is reused when it is the one kept warm."""
    kept = data.get("kept")
    if best and kept and kept[0] == best:
        learner, reused = kept[1], True
        lr, tau = scaled_lr(cfg.optim.lr, cfg.optim.batch_size), cfg.ema.tau_base
    else:
        if cfg.compile:
            fresh_compile(data)
        (learner, lr, tau), reused = new_learner(cfg, device), False
    out = measure_fed(pretrain_loader(kind, data["index"], cfg, device),
                      lambda views: tuple(to_device(v, device, cfg.channels_last) for v in views),
                      lambda views: learner.step([views], lr, tau), cfg, device, s, key,
                      rounds=worker_rounds(kind, cfg))
    return {**out, "precision": _precision(learner), "step": step_signature(cfg, _precision(learner)),
            "step_stage": best, "step_learner_reused": reused,
            "skipped_steps": learner.skipped_total,  # a reused learner's: since it was built
            **dynamo_figures(cfg)}


def new_classifier(cfg, device, num_classes: int):
    """Linear evaluation's classifier (byol_fast.evaluation.classifier) on a fresh encoder of the config's backbone,
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
    """Linear evaluation's training loader (byol_fast.datasets.loaders.eval_loader, DALI: random resized crop + flip),
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


def _json_safe(x):
    """A measurement's return value as JSON: numbers, strings, lists and dicts; tensors as numbers."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def stage_checkpoint(data, cfg, device, s) -> dict:
    """The pause a checkpoint costs the training loop, on the BYOL learner's state (byol_fast.pretrain.learner:
    online and target networks, predictor, LARS, scaler) at the config's backbone, measured by
    ``benchmarks/checkpoint_pause.py`` (``measure(state, directory, repeats) -> dict``; its keys are
    recorded as they come). Imported here, not at the top: the other stages must run without it."""
    try:
        import checkpoint_pause
    except ImportError as e:
        raise StageUnavailable(f"benchmarks/checkpoint_pause.py is not importable ({e})") from None
    cfg = dataclasses.replace(cfg, compile=False)  # the state's size matters here, not the step's speed
    learner, lr, tau = new_learner(cfg, device)
    # One step first: LARS's momentum buffers exist only after it, and every real checkpoint holds them.
    learner.step([synthetic_views(cfg, device, min(cfg.optim.batch_size, 32))], lr, tau)
    device_sync(device)()
    state = learner.state_dict()
    scratch = Path(data["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    # On the benchmark's disk (bench_data/, as a run's out_dir would be), not /tmp, which may be RAM.
    directory = Path(tempfile.mkdtemp(prefix="checkpoint_pause_", dir=scratch))
    t = time.perf_counter()
    try:
        figures = checkpoint_pause.measure(state, directory, s["checkpoint_repeats"])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    log(f"  [checkpoint] {figures}")
    return {"img_per_s": None, "checkpoint": _json_safe(figures), "repeats": s["checkpoint_repeats"],
            "state_gb": _state_bytes(state) / 2**30, "measure_seconds": time.perf_counter() - t}


# ---------------------------------------------------------------------------- time boxes


class StageUnavailable(RuntimeError):
    """A stage that cannot run here, for a reason its message says in full (no traceback printed)."""


class StageTimeout(BaseException):
    """Raised in the main thread when a stage's time box ends. A BaseException, as KeyboardInterrupt
    is, so that library code catching Exception (torch.compile wraps its backends' errors) lets it
    through; where it is wrapped all the same, the box's ``fired`` flag still tells."""


@contextmanager
def alarm(seconds: float | None, box: dict):
    """Raise StageTimeout in the main thread after ``seconds`` (SIGALRM). Between Python bytecodes,
    so it ends a stage stuck in Python (a long torch.compile, a loader loop), not one inside a single
    C call that never returns: gpu_checks.sh's outer ``timeout`` is there for that."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield box
        return

    def ring(signum, frame):
        box["fired"] = True
        # Again in a second, and every second after: the signal may land in a weakref callback or a
        # __del__, where Python prints the exception and carries on ("Exception ignored in ...").
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        raise StageTimeout(seconds)

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield box
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


MIN_STAGE_SECONDS = 5.0  # less than this left: the stage is skipped rather than started


def time_box(run: dict, key: str) -> float | None:
    """Seconds stage ``key`` may run: its ``timeout=`` (else ``--stage-timeout``), cut, when the run
    has a ``--time-budget``, to what the budget leaves after reserving ``--stage-reserve`` seconds
    (or their own box, if smaller) for each stage after it; ``timeout=rest`` takes all that is left
    and reserves nothing. None: no limit."""
    s = run["settings"]
    own = lambda k: parse_stage(k)[1].get("timeout", s["stage_timeout"])  # noqa: E731
    mine = own(key)
    if s["time_budget"] is None:
        return None if mine in (None, "rest") else mine
    later = s["stages"][s["stages"].index(key) + 1:]
    reserve = sum(0.0 if own(k) == "rest" else min(s["stage_reserve"], own(k) or s["stage_reserve"]) for k in later)
    left = run["budget_end"] - time.monotonic() - reserve
    return left if mine in (None, "rest") else min(mine, left)


def _is_oom(e: BaseException) -> bool:
    """A CUDA out-of-memory error, also when torch.compile or a loader wrapped it."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


# ---------------------------------------------------------------------------- one stage


def run_stage(key: str, run: dict, device) -> dict:
    """One stage, time-boxed, with its peak memory. Whatever happens (an error, CUDA out of memory,
    the time box) is recorded as the stage's status and error and printed; the next stage runs."""
    name, opts = parse_stage(key)
    s = run["settings"]
    log(f"\n== stage {key}: {LABELS[name]}")
    best = None
    if opts.get("step") == "best":  # the fastest model variant so far: its batch and compile mode
        best = best_stage(run["stages"], "model", lambda m: (m.get("step") or {}).get("loss", "instance") == "instance")
        if best:
            opts = {**{k: v for k, v in parse_stage(best)[1].items() if k in ("batch", "compile")}, **opts}
            log(f"  the step of {best}, the fastest model stage measured")
        else:
            log("  no model stage measured: the config's step")
    base = {"label": LABELS[name], "stage": name, "options": {k: v for k, v in opts.items()}, "step_stage": best}
    limit = time_box(run, key)
    own = opts.get("timeout", s["stage_timeout"])
    floor = min(MIN_STAGE_SECONDS, own) if isinstance(own, (int, float)) else MIN_STAGE_SECONDS
    if limit is not None and limit < floor:  # the budget, not the stage's own box, left it too little
        why = f"not run: {max(limit, 0.0):.0f} s of the time budget left for it"
        log(f"  {why}")
        return {**base, "img_per_s": None, "status": "skipped", "error": why, "time_box_s": limit, "seconds": 0.0}
    cfg = run["config"](stage_overrides(opts))
    st = {**s, "windows": opts.get("windows", s["windows"]), "window_seconds": opts.get("window_seconds", s["window_seconds"]),
          "warmup": opts.get("warmup", s["warmup"] if s["warmup_given"] else (10 if cfg.compile else 3)),
          "deadline": time.monotonic() + limit if limit is not None else None}
    if limit is not None:
        log(f"  time box {limit:.0f} s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data = run["shared"]
    fn = {"dali": lambda: stage_loader("dali", data["index"], cfg, device, st),
          "shards": lambda: stage_shards(data, cfg, device, st, opts.get("shard_size")),
          "torchvision": lambda: stage_loader("torchvision", data["index"], cfg, device, st),
          "model": lambda: stage_model(data, cfg, device, st, key),
          "e2e-dali": lambda: stage_e2e("dali", data, cfg, device, st, key, best),
          "e2e-torchvision": lambda: stage_e2e("torchvision", data, cfg, device, st, key, best),
          "linear": lambda: stage_linear(data, cfg, device, st),
          "e2e-linear": lambda: stage_e2e_linear(data, cfg, device, st),
          "checkpoint": lambda: stage_checkpoint(data, cfg, device, st)}[name]
    t = time.perf_counter()
    box = {"fired": False}
    with HostPeak() as host:
        st["host_peak"] = host  # for HostPeak.restart: the shards stage leaves its packing out of its peak
        try:
            with alarm(limit, box):
                out = fn()
            status, error = "ok", None
        except (Exception, StageTimeout) as e:  # noqa: BLE001  one failing stage must not lose the others
            out = {"img_per_s": None}
            if box["fired"]:
                status, error = "timed out", f"timed out after {limit:.0f} s" if limit >= 10 else \
                    f"timed out after {limit:.1f} s"
            elif _is_oom(e):  # expected when probing the largest batch: one line, no traceback
                status, error = "out of memory", f"CUDA out of memory at batch {cfg.optim.batch_size}"
                out["error_detail"] = str(e).splitlines()[0][:300]
            else:
                if not isinstance(e, StageUnavailable):
                    traceback.print_exc(file=sys.stderr)
                status, error = "failed", f"{type(e).__name__}: {e}"
            log(f"  stage {key} {status.upper()}: {error}")
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            out["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            out["gpu_used_gb"] = (total - free) / 2**30  # device-wide: torch's cache plus DALI's pools
    if status != "ok" and cfg.compile:
        torch._dynamo.reset()  # a compile cut short leaves half-built graphs behind
    # The failed stage's frames went with its exception: collect them, then give their memory back
    # to the device so that the next stage (the next batch size after an OOM) starts from a clean slate.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**base, **out, "status": status, "host_peak_rss_gb": host.peak / 2**30,
            "seconds": time.perf_counter() - t, "time_box_s": limit, "error": error}


# ---------------------------------------------------------------------------- data


def benchmark_data(args, s: dict, cfg) -> tuple[object, dict]:
    """The checked index (byol_fast.datasets.index) of the files every loader reads, and a description of them."""
    if args.data:
        index = load_index(args.data, workers=cfg.reader.index_workers)
        return index, {"source": str(Path(args.data).absolute()), "num_images": len(index.files)}
    import imagenet_like

    log(f"ImageNet-like JPEGs: {s['num_images']} under {args.bench_data}")
    root = imagenet_like.make_dataset(args.bench_data, s["num_images"], seed=s["seed"])
    index = load_index(root / "train", workers=cfg.reader.index_workers)
    return index, {"source": str(root), **imagenet_like.describe(root), "num_images": len(index.files)}


# ---------------------------------------------------------------------------- report


def _rate(st: dict | None) -> float | None:
    return st["img_per_s"]["median"] if st and st.get("img_per_s") else None


def best_stage(stages: dict, name: str, where=lambda st: True) -> str | None:
    """The key of the fastest measured variant of stage ``name`` (``model``, ``model:batch=512``, ...)."""
    keys = [k for k, st in stages.items() if st.get("stage", k.split(":")[0]) == name and _rate(st) and where(st)]
    return max(keys, key=lambda k: _rate(stages[k]), default=None)


def step_alone(stages: dict, key: str) -> str | None:
    """The model stage an end-to-end stage is compared with: the one whose step it ran (``step=best``),
    else a measured one of the same step signature (backbone, size, batch, compile mode, precision)."""
    st = stages[key]
    if st.get("step_stage") and _rate(stages.get(st["step_stage"])):
        return st["step_stage"]
    return best_stage(stages, "model", lambda m: m.get("step") == st.get("step") and st.get("step") is not None)


def link_steps(stages: dict) -> None:
    """Each end-to-end BYOL stage gets ``vs_step_alone``: its img/s over its step alone's, measured
    in the same run (1.0: the loader costs the step nothing)."""
    for key, st in stages.items():
        if st.get("stage") in ("e2e-dali", "e2e-torchvision") and _rate(st):
            alone = step_alone(stages, key)
            st["step_alone_stage"] = alone
            st["vs_step_alone"] = _rate(st) / _rate(stages[alone]) if alone else None


def link_files(stages: dict) -> None:
    """Each shards stage gets ``vs_files``: its img/s over that of the dali stage with the same loader
    signature (reader settings, batch), measured in the same run (1.0: shards read as fast as files);
    ``files_stage`` names it. None when no such dali stage was measured."""
    for st in stages.values():
        if st.get("stage") == "shards" and _rate(st):
            files = best_stage(stages, "dali", lambda d: d.get("loader") == st["loader"])
            st["files_stage"] = files
            st["vs_files"] = _rate(st) / _rate(stages[files]) if files else None


def checkpoint_ratio(figures: dict | None) -> float | None:
    """checkpoint_pause.measure's ratio (pause with the background writer / synchronous save):
    ``pause_over_sync``, else the one numeric key that reads as a ratio."""
    figures = figures or {}
    if isinstance(figures.get("pause_over_sync"), (int, float)):
        return float(figures["pause_over_sync"])
    found = [v for k, v in figures.items() if ("ratio" in k or "_over_" in k) and isinstance(v, (int, float))]
    return float(found[0]) if len(found) == 1 else None


def ratios(stages: dict) -> dict:
    """The comparisons that matter, each from the best measured variant of its stages; None where a
    figure is missing."""

    def med(name, where=lambda st: True):
        return _rate(stages.get(best_stage(stages, name, where) or ""))

    def div(a, b):
        return a / b if a is not None and b else None

    def e2e_vs_step(name):
        best = best_stage(stages, name)
        return stages[best].get("vs_step_alone") if best else None

    shards = best_stage(stages, "shards", lambda st: st.get("vs_files") is not None)
    pixpro = best_stage(stages, "model", lambda st: (st.get("step") or {}).get("loss") == "pixpro")
    instance = pixpro and best_stage(stages, "model", lambda st: st.get("step") == {**stages[pixpro]["step"],
                                                                                      "loss": "instance"})

    best_e2e = max((v for v in (med("e2e-dali"), med("e2e-torchvision")) if v), default=None)
    compiled = best_stage(stages, "model", lambda st: bool((st.get("step") or {}).get("compile")))
    eager = None
    if compiled:
        sig = {**stages[compiled]["step"], "compile": False}
        eager = best_stage(stages, "model", lambda st: st.get("step") == sig)
    return {
        "dali_vs_torchvision_loader": div(med("dali"), med("torchvision")),
        "shards_vs_files_loader": stages[shards]["vs_files"] if shards else None,
        "pixpro_vs_instance_step": div(_rate(stages[pixpro]), _rate(stages[instance])) if instance else None,
        "e2e_dali_vs_model": e2e_vs_step("e2e-dali"),
        "e2e_torchvision_vs_model": e2e_vs_step("e2e-torchvision"),
        "e2e_dali_vs_e2e_torchvision": div(med("e2e-dali"), med("e2e-torchvision")),
        "model_vs_8xV100_target": div(med("model"), TARGET_BYOL_8XV100),
        "e2e_dali_vs_8xV100_target": div(med("e2e-dali"), TARGET_BYOL_8XV100),
        "devices_like_this_for_8xV100_target": div(TARGET_BYOL_8XV100, best_e2e or med("model")),
        "compiled_vs_eager_step": div(_rate(stages.get(compiled or "")), _rate(stages.get(eager or ""))),
        "linear_vs_8gpu_linear_target": div(med("linear"), TARGET_LINEAR_8GPU),
        "e2e_linear_vs_linear": div(med("e2e-linear"), med("linear")),
        "checkpoint_pause_ratio": checkpoint_ratio(next(
            (st.get("checkpoint") for st in stages.values() if st.get("stage") == "checkpoint"), None)),
    }


RATIO_TEXT = {
    "dali_vs_torchvision_loader": "DALI loader / torchvision loader",
    "shards_vs_files_loader": "DALI loader: shard set / the same images as files (same reader settings)",
    "e2e_dali_vs_model": "end to end DALI / training step alone (the same step)",
    "e2e_torchvision_vs_model": "end to end torchvision / training step alone (the same step)",
    "e2e_dali_vs_e2e_torchvision": "end to end DALI / end to end torchvision",
    "model_vs_8xV100_target": "training step: this device / 8x V100 target (3,121 img/s)",
    "e2e_dali_vs_8xV100_target": "end to end DALI: this device / 8x V100 target (3,121 img/s)",
    "devices_like_this_for_8xV100_target": "devices like this one to match 8x V100 (best end to end)",
    "compiled_vs_eager_step": "training step: compiled / eager, same batch",
    "pixpro_vs_instance_step": "training step: PixPro / BYOL instance loss, same batch",
    "linear_vs_8gpu_linear_target": "linear eval: this device / 8-GPU linear target (5,408 img/s)",
    "e2e_linear_vs_linear": "linear eval: end to end / step alone",
    "checkpoint_pause_ratio": "checkpoint: pause with the background writer / synchronous save",
}


def describe_step(step: dict | None) -> str:
    if not step:
        return ""
    return (f"{step['backbone']} {step['image_size']} px, batch {step['batch']}, "
            f"{'compile ' + step['compile'] if step['compile'] else 'eager'}, {step['precision']}")


def best_configuration(stages: dict) -> dict | None:
    """The best measured configuration, the one the 8x V100 comparison is made from: the fastest end
    to end BYOL stage, else (no end-to-end figure) the fastest step alone."""
    key = max((k for k in (best_stage(stages, "e2e-dali"), best_stage(stages, "e2e-torchvision")) if k),
              key=lambda k: _rate(stages[k]), default=None) or best_stage(stages, "model")
    if key is None:
        return None
    st = stages[key]
    return {"stage": key, "what": "training step alone" if st["stage"] == "model" else "end to end",
            "img_per_s": _rate(st), "step": st.get("step"), "description": describe_step(st.get("step")),
            "devices_for_8xV100_target": TARGET_BYOL_8XV100 / _rate(st)}


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(result: dict) -> str:
    """The results as Markdown: settings line, the table, the ratios (parsed by tests/test_throughput.py)."""
    s, env, cfg = result["settings"], result["environment"], result["config"]
    reader = cfg["reader"]
    dev = env.get("gpu") or f"CPU ({env['cpu']}, {s['cores']} cores)"
    load = env.get("loadavg_start")
    precision = next((st["precision"] for st in result["stages"].values() if st.get("precision")), cfg["precision"])
    lines = [f"device: {dev} | {env['date_utc']} | torch {env['torch']}, torchvision {env['torchvision']}, "
             f"DALI {env['dali']}, CUDA {env['cuda']}" + (f" | load average before: {load[0]:.2f}" if load else ""),
             f"model: {cfg['model']['backbone']} at {cfg['data']['image_size']} px, batch {s['batch']}, precision "
             f"{precision}, channels_last {cfg['channels_last']}, "
             f"compile {cfg['compile']} | DALI decode on {reader['decode']}, {reader['num_threads']} threads "
             f"= {reader['num_threads']} DataLoader workers, prefetch {reader['prefetch']}, hardware decoder load "
             f"{reader['hw_decoder_load']} | {result['dataset']['num_images']} images (stage variants: their "
             f"key=value)",
             "", TABLE_BEGIN, "",
             "| stage | median | min | max | data wait | peak memory (GB) |",
             "|---|---:|---:|---:|---:|---|"]
    for name, st in result["stages"].items():
        if st.get("stage") == "checkpoint":
            continue  # not images per second: its own section below
        if st.get("img_per_s") is None:
            what = "missing" if st.get("status") in (None, "failed") else st["status"]
            lines.append(f"| {name} | {what} | - | - | - | {st['error']} |")
            continue
        r = st["img_per_s"]
        mem = f"host {st['host_peak_rss_gb']:.2f}"
        if "gpu_peak_allocated_gb" in st:
            mem = f"gpu {st['gpu_peak_allocated_gb']:.2f} (device {st['gpu_used_gb']:.2f}), " + mem
        wait = _fmt(st.get("data_wait_fraction"), 3)
        lines.append(f"| {name} | {r['median']:.1f} | {r['min']:.1f} | {r['max']:.1f} | {wait} | {mem} |")
    packed = [(k, st) for k, st in result["stages"].items() if st.get("stage") == "shards"]
    if packed:
        lines += ["", "## Shard set (the same images, packed in this run)", ""]
        for key, st in packed:
            if st.get("packed_samples") is None:
                lines.append(f"- {key}: {st.get('status')}: {st['error']}")
                continue
            sizes = st["shard_sizes_bytes"]
            line = (f"- {key}: {st['packed_samples']} images, {st['packed_bytes'] / 1e6:.1f} MB in {st['shards']} "
                    f"shards ({min(sizes) / 1e6:.1f}-{max(sizes) / 1e6:.1f} MB, limit {st['shard_bytes'] / 1e6:.1f} "
                    f"MB), " + (f"packed at {st['pack_mb_per_s']:.1f} MB/s ({st['pack_seconds']:.1f} s)"
                                if st["packed_here"] else "packed by an earlier stage"))
            if st.get("vs_files") is not None:
                line += (f"; read at {_rate(st):.1f} img/s = {st['vs_files']:.3f} x {st['files_stage']} "
                         f"({_rate(result['stages'][st['files_stage']]):.1f} img/s from the files)")
            lines.append(line)
    ck = next((st for st in result["stages"].values() if st.get("stage") == "checkpoint"), None)
    if ck:
        lines += ["", "## Checkpoint pause", ""]
        if ck.get("checkpoint"):
            lines.append(f"- state {ck['state_gb']:.2f} GB, {ck['repeats']} saves: " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in ck["checkpoint"].items()
                if isinstance(v, (int, float))))  # the per-save lists are in the JSON
        else:
            lines.append(f"- {ck.get('status')}: {ck['error']}")
    lines += ["", RATIOS_BEGIN, ""]
    for key, value in result["ratios"].items():
        if value is not None:
            lines.append(f"- {RATIO_TEXT[key]}: {value:.3f}  (`{key}`)")
    best = result.get("best")
    if best:
        lines += ["", f"Best measured configuration: {best['stage']} ({best['what']}; {best['description']}): "
                  f"{best['img_per_s']:,.1f} img/s, {best['img_per_s'] / TARGET_BYOL_8XV100:.3f} of the 8x V100 "
                  f"target (3,121 img/s): {best['devices_for_8xV100_target']:.2f} devices like this one match it."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Horizontal bars: median img/s per stage with min-max whiskers; public anchors in grey on a GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"dali": "#1f77b4", "shards": "#17becf", "torchvision": "#9ecae1", "model": "#ff7f0e",
               "e2e-dali": "#2ca02c", "e2e-torchvision": "#98df8a", "linear": "#9467bd", "e2e-linear": "#c5b0d5"}
    names, med, lo, hi, cols = [], [], [], [], []
    for key, st in result["stages"].items():
        name = st.get("stage", key)
        if name == "checkpoint":
            continue
        r = st.get("img_per_s")
        variant = key.partition(":")[2].replace(":", ", ")
        names.append(LABELS[name] + (f" ({variant})" if variant else "") + ("" if r else f" ({st.get('status', 'failed')})"))
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
    started = T_START if argv is None else time.monotonic()  # called from Python: from the call
    args, extra = parse_args(argv)
    try:
        s = resolve(args)
        cfg = build_config(args, s, extra)
        for key in s["stages"]:  # every variant's config is checked (compile mode, batch) before any work
            build_config(args, s, extra, stage_overrides(parse_stage(key)[1]))
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
    stages: dict[str, dict] = {}
    run = {"settings": s, "stages": stages, "config": lambda over: build_config(args, s, extra, over),
           "shared": {"index": index, "kept": None, "scratch": Path(args.bench_data) / "scratch"},
           "budget_end": started + s["time_budget"] if s["time_budget"] is not None else None}

    def assemble(complete: bool) -> dict:
        link_steps(stages)
        link_files(stages)
        return {"settings": s, "environment": env, "config": to_dict(cfg), "dataset": dataset,
                "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
                "complete": complete, "stages": stages, "ratios": ratios(stages), "best": best_configuration(stages),
                "targets": {"byol_8xV100": TARGET_BYOL_8XV100, "linear_8gpu": TARGET_LINEAR_8GPU}}

    def write(result: dict) -> None:
        if args.json:  # through a temporary file: a run killed mid-write leaves the previous stage's JSON
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, path)

    try:
        for key in s["stages"]:
            stages[key] = run_stage(key, run, device)
            write(assemble(complete=False))  # what is measured survives an outer timeout
    finally:
        remove_shard_sets(run["shared"])
    run["shared"]["kept"] = None
    env["loadavg_end"] = _loadavg()
    result = assemble(complete=True)
    text = render(result)
    print("\n" + text, flush=True)
    write(result)
    if args.json:
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
