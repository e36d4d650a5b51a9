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

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):  # byol_fast, and the bench package and scripts beside this file
    if p not in sys.path:
        sys.path.insert(0, p)

from bench.entries import STAGES  # noqa: E402
from bench.runner import run  # noqa: E402
from bench.settings import from_args  # noqa: E402
# Scripts under benchmarks/results import the benchmark's blur window from here.
from bench.settings import blur_kernel_for  # noqa: E402, F401
from byol_fast.errors import ConfigError  # noqa: E402


def sides(text: str) -> tuple[int, ...]:
    """``--image-size``: one side or a comma-separated list, each at least 8 px."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a side or a comma-separated list of sides") from None
    if not values or min(values) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: each side must be at least 8 px")
    return values


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The options below, and the extra ``--section.key=value`` arguments (config overrides)."""
    p = argparse.ArgumentParser(prog="python benchmarks/throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a run of about a minute: fewer images, windows and seconds")
    p.add_argument("--stages", default="", help=f"comma-separated NAME[:key=value...] entries, NAME one of "
                   f"{','.join(STAGES)} (default: all but linear and checkpoint; variants: see above)")
    p.add_argument("--linear", action="store_true", help="also measure linear evaluation (synthetic and end to end)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--config", help="YAML recipe to start from (config/*.yaml); the options below override it")
    p.add_argument("--backbone", help="encoder, any of byol_fast.config.BACKBONES (e.g. resnet50x2, resnet200x2); "
                                        "default: resnet50 on GPU, resnet18 on CPU")
    p.add_argument("--image-size", type=sides, help="side of each view (default: 224 on GPU, 64 on CPU); a list "
                   "(160,192,224) measures each stage that makes images at each side, and takes the ratios at the largest")
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


def main(argv: list[str] | None = None) -> int:
    """The command: parse, check every setting and stage entry before any work (exit status 2 on a
    mistake), then run."""
    started = T_START if argv is None else time.monotonic()  # called from Python: from the call
    args, extra = parse_args(argv)
    try:
        options = from_args(args, extra)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv
    return run(options, started, command)


if __name__ == "__main__":
    sys.exit(main())
