"""The run: each stage in turn, time-boxed, with its peak memory and whatever ended it recorded as
its status, the JSON rewritten after every stage (so a run killed from outside keeps what it
measured), and the report printed at the end."""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

import imagenet_like  # benchmarks/imagenet_like.py: benchmarks/ is on sys.path, as throughput.py sets it
from byol_fast.config import to_dict
from byol_fast.datasets.index import load_index

from .entries import LABELS, parse_stage, stage_overrides
from .machine import HostPeak, environment, loadavg
from .plot import plot
from .progress import log
from .report import at_side, best_configuration, link_files, link_steps, ratios, render
from .settings import Options, Recipe, Settings
from .stages import RUNNERS
from .stages.context import Shared, StageContext, StageUnavailable
from .stages.shards import remove_shard_sets
from .table import best_stage
from .targets import TARGET_BYOL_8XV100, TARGET_LINEAR_8GPU
from .timebox import MIN_STAGE_SECONDS, Alarm, StageTimeout, is_oom, time_box
from .timing import Plan


@dataclasses.dataclass
class RunState:
    """A run in progress: its settings, how each stage's config is made, what the stages share, the
    end of the time budget (time.monotonic(); None: no budget) and the records measured so far, by
    entry in the order they ran."""

    settings: Settings
    recipe: Recipe
    shared: Shared
    budget_end: float | None = None
    stages: dict[str, dict] = dataclasses.field(default_factory=dict)


def _with_best_step(run: RunState, opts: dict) -> tuple[dict, str | None]:
    """``step=best``: the options with the batch and compile mode of the fastest BYOL-instance model
    stage measured so far at the entry's side, and its key (None when there is none, or no step=best)."""
    if opts.get("step") != "best":
        return opts, None
    side = opts.get("size", run.settings.image_size)
    best = best_stage(at_side(run.stages, side, run.settings.image_size), "model",
                      lambda m: (m.get("step") or {}).get("loss", "instance") == "instance")
    if not best:
        log("  no model stage measured: the config's step")
        return opts, None
    log(f"  the step of {best}, the fastest model stage measured")
    return {**{k: v for k, v in parse_stage(best).options.items() if k in ("batch", "compile")}, **opts}, best


def _failure(e: BaseException, alarm: Alarm, cfg) -> tuple[dict, str, str]:
    """A stage's record, status and error after exception ``e``: its time box, CUDA out of memory
    (expected when probing the largest batch: one line, no traceback) or another failure."""
    out: dict = {"img_per_s": None}
    limit = alarm.seconds
    if alarm.fired:
        return out, "timed out", f"timed out after {limit:.0f} s" if limit >= 10 else f"timed out after {limit:.1f} s"
    if is_oom(e):
        out["error_detail"] = str(e).splitlines()[0][:300]
        return out, "out of memory", f"CUDA out of memory at batch {cfg.optim.batch_size}"
    if not isinstance(e, StageUnavailable):
        traceback.print_exception(e, file=sys.stderr)
    return out, "failed", f"{type(e).__name__}: {e}"


def run_stage(key: str, run: RunState, device: torch.device) -> dict:
    """One stage, time-boxed, with its peak memory. Whatever happens (an error, CUDA out of memory,
    the time box) is recorded as the stage's status and error and printed; the next stage runs."""
    name, opts = parse_stage(key)
    s = run.settings
    log(f"\n== stage {key}: {LABELS[name]}")
    opts, best = _with_best_step(run, opts)
    base = {"label": LABELS[name], "stage": name, "options": dict(opts), "step_stage": best}
    limit = time_box(s, key, run.budget_end)
    own = opts.get("timeout", s.stage_timeout)
    floor = min(MIN_STAGE_SECONDS, own) if isinstance(own, (int, float)) else MIN_STAGE_SECONDS
    if limit is not None and limit < floor:  # the budget, not the stage's own box, left it too little
        why = f"not run: {max(limit, 0.0):.0f} s of the time budget left for it"
        log(f"  {why}")
        return {**base, "img_per_s": None, "status": "skipped", "error": why, "time_box_s": limit, "seconds": 0.0}
    cfg = run.recipe.config(stage_overrides(opts))
    plan = Plan(warmup=opts.get("warmup", s.warmup if s.warmup_given else (10 if cfg.compile else 3)),
                windows=opts.get("windows", s.windows), window_seconds=opts.get("window_seconds", s.window_seconds),
                deadline=time.monotonic() + limit if limit is not None else None)
    if limit is not None:
        log(f"  time box {limit:.0f} s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    with HostPeak() as host:  # handed to the stage: the shards stage leaves its packing out of its peak
        ctx = StageContext(key, name, opts, cfg, device, plan, s, run.shared, host, best)
        alarm = Alarm(limit)
        try:
            with alarm:
                out = RUNNERS[name](ctx)
            status, error = "ok", None
        except (Exception, StageTimeout) as e:  # noqa: BLE001  one failing stage must not lose the others
            out, status, error = _failure(e, alarm, cfg)
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


def benchmark_data(options: Options, cfg) -> tuple[object, dict]:
    """The checked index (byol_fast.datasets.index) of the files every loader reads, and a description of them."""
    if options.data:
        index = load_index(options.data, workers=cfg.reader.index_workers)
        return index, {"source": str(Path(options.data).absolute()), "num_images": len(index.files)}
    log(f"ImageNet-like JPEGs: {options.settings.num_images} under {options.bench_data}")
    root = imagenet_like.make_dataset(options.bench_data, options.settings.num_images, seed=options.settings.seed)
    index = load_index(root / "train", workers=cfg.reader.index_workers)
    return index, {"source": str(root), **imagenet_like.describe(root), "num_images": len(index.files)}


def write_json(path: str | None, result: dict) -> None:
    """The result as JSON at ``path`` (None: nowhere), through a temporary file: a run killed
    mid-write leaves the previous stage's JSON."""
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)


def run(options: Options, started: float, command: str | list[str]) -> int:
    """Every stage of ``options``, the report on stdout, the JSON and the chart; ``started``
    (time.monotonic()) is where ``--time-budget`` counts from, ``command`` what the JSON records as the
    command. Returns the exit status: 0 when every stage measured, 1 when one did not, 2 when the
    images cannot fill a batch."""
    s, cfg = options.settings, options.recipe.config()
    device = torch.device(s.device)
    if device.type == "cpu":
        torch.set_num_threads(s.torch_threads)
    torch.backends.cudnn.benchmark = s.cudnn_benchmark
    env = environment(device)
    env["loadavg_start"] = loadavg()
    log(f"byol_fast throughput | {env.get('gpu') or 'CPU'} | stages {', '.join(s.stages)}")
    if env["loadavg_start"] and env["loadavg_start"][0] > 0.5 * s.cores:
        log(f"warning: the machine is busy before the run (load average {env['loadavg_start'][0]:.1f} on "
            f"{s.cores} cores): CPU-side figures will be low and noisy")
    index, dataset = benchmark_data(options, cfg)
    if len(index.files) < cfg.optim.batch_size:
        print(f"error: {len(index.files)} images cannot fill one batch of {cfg.optim.batch_size}", file=sys.stderr)
        return 2
    state = RunState(s, options.recipe, Shared(index, Path(options.bench_data) / "scratch"),
                     budget_end=started + s.time_budget if s.time_budget is not None else None)

    def assemble(complete: bool) -> dict:
        link_steps(state.stages)
        link_files(state.stages)
        return {"settings": s.record(), "environment": env, "config": to_dict(cfg), "dataset": dataset,
                "command": command, "complete": complete, "stages": state.stages,
                "ratios": ratios(at_side(state.stages, s.image_size, s.image_size)),
                "best": best_configuration(at_side(state.stages, s.image_size, s.image_size)),
                "targets": {"byol_8xV100": TARGET_BYOL_8XV100, "linear_8gpu": TARGET_LINEAR_8GPU}}

    try:
        for key in s.stages:
            state.stages[key] = run_stage(key, state, device)
            write_json(options.json, assemble(complete=False))  # what is measured survives an outer timeout
    finally:
        remove_shard_sets(state.shared)
    state.shared.kept = None
    env["loadavg_end"] = loadavg()
    result = assemble(complete=True)
    print("\n" + render(result), flush=True)
    write_json(options.json, result)
    if options.json:
        log(f"wrote {options.json}")
    if options.plot:
        try:
            plot(result, options.plot)
            log(f"wrote {options.plot}")
        except Exception as e:  # noqa: BLE001  a plotting problem must not lose the measured figures
            log(f"plot failed: {type(e).__name__}: {e}")
    return 0 if all(st["error"] is None for st in state.stages.values()) else 1
