"""What a run's stages say together: each stage linked to the one it is compared with, the ratios
that matter, the best measured configuration, and the Markdown printed at the end (its table and
ratio lines are parsed by tests/benchmarks/test_throughput.py)."""
from __future__ import annotations

from .table import best_rate, best_stage, describe_step, fmt, markdown_table, numbers, rate
from .targets import TARGET_BYOL_8XV100, TARGET_LINEAR_8GPU

TABLE_BEGIN = "## Throughput (img/s; one image = both views)"
RATIOS_BEGIN = "## Ratios"
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


def step_alone(stages: dict, key: str) -> str | None:
    """The model stage an end-to-end stage is compared with: the one whose step it ran (``step=best``),
    else a measured one of the same step signature (backbone, size, batch, compile mode, precision)."""
    st = stages[key]
    if st.get("step_stage") and rate(stages.get(st["step_stage"])):
        return st["step_stage"]
    return best_stage(stages, "model", lambda m: m.get("step") == st.get("step") and st.get("step") is not None)


def link_steps(stages: dict) -> None:
    """Each end-to-end BYOL stage gets ``vs_step_alone``: its img/s over its step alone's, measured
    in the same run (1.0: the loader costs the step nothing)."""
    for key, st in stages.items():
        if st.get("stage") in ("e2e-dali", "e2e-torchvision") and rate(st):
            alone = step_alone(stages, key)
            st["step_alone_stage"] = alone
            st["vs_step_alone"] = rate(st) / rate(stages[alone]) if alone else None


def link_files(stages: dict) -> None:
    """Each shards stage gets ``vs_files``: its img/s over that of the dali stage with the same loader
    signature (reader settings, batch), measured in the same run (1.0: shards read as fast as files);
    ``files_stage`` names it. None when no such dali stage was measured."""
    for st in stages.values():
        if st.get("stage") == "shards" and rate(st):
            files = best_stage(stages, "dali", lambda d: d.get("loader") == st["loader"])
            st["files_stage"] = files
            st["vs_files"] = rate(st) / rate(stages[files]) if files else None


def checkpoint_ratio(figures: dict | None) -> float | None:
    """checkpoint_pause.measure's ratio (pause with the background writer / synchronous save):
    ``pause_over_sync``, else the one numeric key that reads as a ratio."""
    figures = figures or {}
    if isinstance(figures.get("pause_over_sync"), (int, float)):
        return float(figures["pause_over_sync"])
    found = [v for k, v in figures.items() if ("ratio" in k or "_over_" in k) and isinstance(v, (int, float))]
    return float(found[0]) if len(found) == 1 else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _step_variant(stages: dict, key: str | None, **change) -> str | None:
    """The fastest model stage whose step is stage ``key``'s with ``change`` (another loss, eager)."""
    if not key:
        return None
    sig = {**stages[key]["step"], **change}
    return best_stage(stages, "model", lambda st: st.get("step") == sig)


def side_of(st: dict, run_side: int) -> int:
    """The side an entry measured: its size=, else the run's."""
    return st.get("options", {}).get("size", run_side)


def at_side(stages: dict, side: int, run_side: int) -> dict:
    """The entries measured at ``side``, of a run at ``run_side``: the ratios, the best configuration
    and step=best compare like with like when a run measures several sides."""
    return {k: st for k, st in stages.items() if side_of(st, run_side) == side}


def ratios(stages: dict) -> dict:
    """The comparisons that matter, each from the best measured variant of its stages; None where a
    figure is missing."""

    def e2e_vs_step(name):
        best = best_stage(stages, name)
        return stages[best].get("vs_step_alone") if best else None

    def rate_of(key):
        return rate(stages.get(key or ""))

    shards = best_stage(stages, "shards", lambda st: st.get("vs_files") is not None)
    pixpro = best_stage(stages, "model", lambda st: (st.get("step") or {}).get("loss") == "pixpro")
    instance = _step_variant(stages, pixpro, loss="instance")
    compiled = best_stage(stages, "model", lambda st: bool((st.get("step") or {}).get("compile")))
    eager = _step_variant(stages, compiled, compile=False)
    best_e2e = max((v for v in (best_rate(stages, "e2e-dali"), best_rate(stages, "e2e-torchvision")) if v),
                   default=None)
    return {
        "dali_vs_torchvision_loader": _div(best_rate(stages, "dali"), best_rate(stages, "torchvision")),
        "shards_vs_files_loader": stages[shards]["vs_files"] if shards else None,
        "pixpro_vs_instance_step": _div(rate_of(pixpro), rate_of(instance)) if instance else None,
        "e2e_dali_vs_model": e2e_vs_step("e2e-dali"),
        "e2e_torchvision_vs_model": e2e_vs_step("e2e-torchvision"),
        "e2e_dali_vs_e2e_torchvision": _div(best_rate(stages, "e2e-dali"), best_rate(stages, "e2e-torchvision")),
        "model_vs_8xV100_target": _div(best_rate(stages, "model"), TARGET_BYOL_8XV100),
        "e2e_dali_vs_8xV100_target": _div(best_rate(stages, "e2e-dali"), TARGET_BYOL_8XV100),
        "devices_like_this_for_8xV100_target": _div(TARGET_BYOL_8XV100, best_e2e or best_rate(stages, "model")),
        "compiled_vs_eager_step": _div(rate_of(compiled), rate_of(eager)),
        "linear_vs_8gpu_linear_target": _div(best_rate(stages, "linear"), TARGET_LINEAR_8GPU),
        "e2e_linear_vs_linear": _div(best_rate(stages, "e2e-linear"), best_rate(stages, "linear")),
        "checkpoint_pause_ratio": checkpoint_ratio(next(
            (st.get("checkpoint") for st in stages.values() if st.get("stage") == "checkpoint"), None)),
    }


def best_configuration(stages: dict) -> dict | None:
    """The best measured configuration, the one the 8x V100 comparison is made from: the fastest end
    to end BYOL stage, else (no end-to-end figure) the fastest step alone."""
    key = max((k for k in (best_stage(stages, "e2e-dali"), best_stage(stages, "e2e-torchvision")) if k),
              key=lambda k: rate(stages[k]), default=None) or best_stage(stages, "model")
    if key is None:
        return None
    st = stages[key]
    return {"stage": key, "what": "training step alone" if st["stage"] == "model" else "end to end",
            "img_per_s": rate(st), "step": st.get("step"), "description": describe_step(st.get("step")),
            "devices_for_8xV100_target": TARGET_BYOL_8XV100 / rate(st)}


def _head(result: dict) -> list[str]:
    """The settings lines above the table."""
    s, env, cfg = result["settings"], result["environment"], result["config"]
    reader = cfg["reader"]
    dev = env.get("gpu") or f"CPU ({env['cpu']}, {s['cores']} cores)"
    load = env.get("loadavg_start")
    precision = next((st["precision"] for st in result["stages"].values() if st.get("precision")), cfg["precision"])
    return [f"device: {dev} | {env['date_utc']} | torch {env['torch']}, torchvision {env['torchvision']}, "
            f"DALI {env['dali']}, CUDA {env['cuda']}" + (f" | load average before: {load[0]:.2f}" if load else ""),
            f"model: {cfg['model']['backbone']} at {cfg['data']['image_size']} px, batch {s['batch']}, precision "
            f"{precision}, channels_last {cfg['channels_last']}, "
            f"compile {cfg['compile']} | DALI decode on {reader['decode']}, {reader['num_threads']} threads "
            f"= {reader['num_threads']} DataLoader workers, prefetch {reader['prefetch']}, hardware decoder load "
            f"{reader['hw_decoder_load']} | {result['dataset']['num_images']} images (stage variants: their "
            f"key=value)"]


def _row(name: str, st: dict) -> list[str]:
    """A stage's cells in the throughput table."""
    if st.get("img_per_s") is None:
        what = "missing" if st.get("status") in (None, "failed") else st["status"]
        return [name, what, "-", "-", "-", str(st["error"])]
    r = st["img_per_s"]
    mem = f"host {st['host_peak_rss_gb']:.2f}"
    if "gpu_peak_allocated_gb" in st:
        mem = f"gpu {st['gpu_peak_allocated_gb']:.2f} (device {st['gpu_used_gb']:.2f}), " + mem
    return [name, f"{r['median']:.1f}", f"{r['min']:.1f}", f"{r['max']:.1f}", fmt(st.get("data_wait_fraction"), ".3f"),
            mem]


def _shard_lines(result: dict) -> list[str]:
    """The shard sets the shards stages packed, and how they read against the files."""
    packed = [(k, st) for k, st in result["stages"].items() if st.get("stage") == "shards"]
    if not packed:
        return []
    lines = ["", "## Shard set (the same images, packed in this run)", ""]
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
            line += (f"; read at {rate(st):.1f} img/s = {st['vs_files']:.3f} x {st['files_stage']} "
                     f"({rate(result['stages'][st['files_stage']]):.1f} img/s from the files)")
        lines.append(line)
    return lines


def _checkpoint_lines(result: dict) -> list[str]:
    ck = next((st for st in result["stages"].values() if st.get("stage") == "checkpoint"), None)
    if not ck:
        return []
    if not ck.get("checkpoint"):
        return ["", "## Checkpoint pause", "", f"- {ck.get('status')}: {ck['error']}"]
    # the per-save lists are in the JSON
    return ["", "## Checkpoint pause", "",
            f"- state {ck['state_gb']:.2f} GB, {ck['repeats']} saves: " + numbers(ck["checkpoint"], ".4g")]


def render(result: dict) -> str:
    """The results as Markdown: settings lines, the table, the shard sets, the checkpoint pause, the
    ratios and the best measured configuration."""
    rows = [_row(name, st) for name, st in result["stages"].items() if st.get("stage") != "checkpoint"]
    lines = _head(result) + ["", TABLE_BEGIN, ""]
    head = ("stage", "median", "min", "max", "data wait", "peak memory (GB)")
    lines += markdown_table(head, rows, right=(1, 2, 3, 4))
    lines += _shard_lines(result) + _checkpoint_lines(result) + ["", RATIOS_BEGIN, ""]
    for key, value in result["ratios"].items():
        if value is not None:
            lines.append(f"- {RATIO_TEXT[key]}: {value:.3f}  (`{key}`)")
    best = result.get("best")
    if best:
        lines += ["", f"Best measured configuration: {best['stage']} ({best['what']}; {best['description']}): "
                  f"{best['img_per_s']:,.1f} img/s, {best['img_per_s'] / TARGET_BYOL_8XV100:.3f} of the 8x V100 "
                  f"target (3,121 img/s): {best['devices_for_8xV100_target']:.2f} devices like this one match it."]
    return "\n".join(lines) + "\n"
