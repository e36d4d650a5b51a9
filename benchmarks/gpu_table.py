"""The GPU suite's closing table: ``python benchmarks/gpu_table.py OUT``.

Reads what ``benchmarks/gpu_checks.sh`` left in OUT (``suite.jsonl``: one line per shell stage with
its exit status, seconds and time box; ``pytest-gpu.txt``; ``throughput.json``, which
``benchmarks/throughput.py`` rewrites after every stage, so it holds the stages measured before an
outer timeout too), prints one short Markdown table with the suite's targets beside the figures,
and writes it as ``OUT/table.md`` and every figure it shows as ``OUT/summary.json``.

Standard library only, so that it runs whatever the state of the machine (no torch import): the
stage records are read with the helpers the benchmark's own report uses (``bench.table``).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package beside this file

from bench.table import best_rate, best_stage, describe_step, fmt, markdown_table, numbers, rate  # noqa: E402
from bench.targets import TARGET_BYOL_8XV100  # noqa: E402

# The suite's targets for one GPU (H100/H200 class), printed beside the measured figures.
TARGET_E2E = 2000.0  # img/s, BYOL ResNet-50 224 px end to end
TARGET_E2E_VS_STEP = 0.97  # end to end / the same step alone: the loader costs the step < 3%
TARGET_DATA_WAIT = 0.03  # share of step time waiting for data
MEASUREMENT_OPTIONS = ("timeout", "windows", "window_seconds", "warmup")  # how, not what: left out of names


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def shell_note(rec: dict | None) -> str:
    """A shell stage's outcome in words: timeout(1) exits 124 (137 when it had to kill -9)."""
    if rec is None:
        return "not run"
    if rec["rc"] in (124, 137):
        return f"timed out after {rec['limit_s']} s"
    return f"exit status {rec['rc']}" if rec["rc"] else "ok"


def pytest_summary(path: Path) -> str | None:
    """pytest's last line: '4 passed, 149 deselected in 18.35s'."""
    if not path.is_file():
        return None
    lines = [ln.strip("= ").strip() for ln in path.read_text().splitlines()
             if re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b", ln)]
    return lines[-1] if lines else None


def name_of(key: str) -> str:
    """'model:batch=384:timeout=45' -> 'model:batch=384' (the measurement options are not the setting)."""
    stage, *opts = key.split(":")
    return ":".join([stage] + [o for o in opts if o.split("=")[0] not in MEASUREMENT_OPTIONS])


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 0) -> str:
    return fmt(x, f",.{digits}f")


def verdict(ok: bool | None) -> str:
    return "" if ok is None else (" (met)" if ok else " (missed)")


def setting(st: dict, result: dict) -> str:
    """What the stage ran, in a few words."""
    cfg, opts, s = result["config"], st.get("options") or {}, result["settings"]
    name = st.get("stage")
    batch = opts.get("batch", s["batch"])
    threads = opts.get("threads", cfg["reader"]["num_threads"])
    if name in ("model", "e2e-dali", "e2e-torchvision"):
        where = f"step of {name_of(st['step_stage'])}: " if st.get("step_stage") and name != "model" else ""
        if st.get("step"):
            return where + describe_step(st["step"])
        # not measured (timed out, OOM, skipped): what it was to run
        mode = opts.get("compile", cfg.get("compile_mode", "default") if cfg.get("compile") else False)
        return (where + f"{cfg['model']['backbone']} {cfg['data']['image_size']} px, batch {batch}, "
                f"{'compile ' + mode if mode else 'eager'}")
    if name in ("dali", "shards"):
        what = f"hw decoder load {opts.get('hw', cfg['reader']['hw_decoder_load'])}, {threads} threads, batch {batch}"
        if name == "shards" and st.get("shards"):
            what += f", {st['shards']} shards of <= {st['shard_bytes'] / 1e6:,.1f} MB"
        return what
    if name == "torchvision":
        return f"{threads} DataLoader workers, batch {batch}"
    if name in ("linear", "e2e-linear"):
        return f"{cfg['model']['backbone']} frozen + linear, batch {batch}"
    if name == "checkpoint" and st.get("state_gb") is not None:
        return f"{cfg['model']['backbone']} learner state {st['state_gb']:.2f} GB, {st.get('repeats')} saves"
    return ", ".join(f"{k} {v}" for k, v in opts.items() if k not in MEASUREMENT_OPTIONS)


def memory(st: dict) -> str:
    if st.get("gpu_peak_allocated_gb") is not None:
        return f"peak GPU {st['gpu_peak_allocated_gb']:.1f} GB"
    return f"peak host {st['host_peak_rss_gb']:.1f} GB" if st.get("host_peak_rss_gb") else ""


def model_note(st: dict, result: dict) -> list[str]:
    """A compiled step against the eager one of the same signature, its compile time; skipped steps."""
    parts = []
    if st["step"]["compile"]:
        eager = best_stage(result["stages"], "model", lambda o: o.get("step") == {**st["step"], "compile": False})
        if eager:
            parts.append(f"{rate(st) / rate(result['stages'][eager]):.2f}x eager")
        parts.append(f"warm-up (compile) {st['warmup_seconds']:.0f} s")
    if st.get("skipped_steps"):
        parts.append(f"{st['skipped_steps']} non-finite steps skipped")
    return parts


def fed_note(st: dict, result: dict) -> list[str]:
    """An end-to-end stage against its step alone (for e2e-linear, the fastest linear stage), and its data wait."""
    if st["stage"] == "e2e-linear":
        step = best_rate(result["stages"], "linear")
        alone = rate(st) / step if step else None
    else:
        alone = st.get("vs_step_alone")
    parts = [] if alone is None else [f"e2e/step alone {alone:.3f}"]
    if st.get("data_wait_fraction") is not None:
        parts.append(f"data wait {pct(st['data_wait_fraction'])}")
    return parts


def torchvision_note(st: dict, result: dict) -> list[str]:
    dali = best_rate(result["stages"], "dali")
    return [f"DALI / this: {dali / rate(st):.1f}x"] if dali else []


def dali_note(st: dict, result: dict) -> list[str]:
    step = best_rate(result["stages"], "model")
    return [f"{rate(st) / step:.1f}x the fastest step"] if step else []


def shards_note(st: dict, result: dict) -> list[str]:
    """Shards against the files of the same reader settings, and the packing."""
    parts = []
    if st.get("vs_files") is not None:
        parts.append(f"shards / files ({name_of(st['files_stage'])}) {st['vs_files']:.3f}")
    if st.get("packed_here") and st.get("pack_mb_per_s") is not None:
        parts.append(f"packed {st['packed_bytes'] / 1e6:,.0f} MB at {st['pack_mb_per_s']:,.0f} MB/s")
    return parts


def checkpoint_note(st: dict, result: dict) -> list[str]:
    """The checkpoint stage's figures: the two pauses and their ratio, else every number as it came."""
    f, ratio = st.get("checkpoint") or {}, result["ratios"].get("checkpoint_pause_ratio")
    if not all(isinstance(f.get(k), (int, float)) for k in ("pause_s", "sync_s")):
        return [numbers(f, ".3g")]  # another set of keys than checkpoint_pause.measure's
    parts = [f"training pauses {f['pause_s']:.3f} s (background writer) vs {f['sync_s']:.3f} s "
             f"(synchronous save): ratio {num(ratio, 3)}"]
    if isinstance(f.get("write_s"), (int, float)):
        parts.append(f"background write {f['write_s']:.2f} s")
    return parts


# What the note column says of each stage besides its time box and memory.
STAGE_NOTES = {"model": model_note, "e2e-dali": fed_note, "e2e-torchvision": fed_note, "e2e-linear": fed_note,
               "torchvision": torchvision_note, "dali": dali_note, "shards": shards_note,
               "checkpoint": checkpoint_note}


def note(key: str, st: dict, result: dict) -> str:
    """The ratio or note column of one throughput stage."""
    if st.get("status", "ok") != "ok":
        extra = f"; {memory(st)}" if st.get("status") == "out of memory" and memory(st) else ""
        return (st.get("error") or st.get("status")) + extra
    stage_note = STAGE_NOTES.get(st.get("stage"))
    parts = stage_note(st, result) if stage_note else []
    if st.get("windows_cut_short"):
        parts.append(f"{len(st['img_per_s']['windows'])} windows (time box)")
    if memory(st):
        parts.append(memory(st))
    return "; ".join(p for p in parts if p)


def build(out: Path) -> tuple[str, dict]:
    shell = {r["stage"]: r for r in read_jsonl(out / "suite.jsonl")}
    rows: list[tuple[str, str, str, str]] = []
    summary: dict = {"shell_stages": shell}

    py = pytest_summary(out / "pytest-gpu.txt")
    rec = shell.get("pytest")
    rows.append(("pytest -m gpu", "the GPU-marked tests", "-",
                 (py or "no summary line") + ("" if rec is None or rec["rc"] == 0 else f"; {shell_note(rec)}")))
    summary["pytest"] = {"summary": py, "rc": rec["rc"] if rec else None}

    path = out / "throughput.json"
    result = json.loads(path.read_text()) if path.is_file() else None
    rec = shell.get("throughput")
    head = "GPU suite"
    if result is None:
        rows.append(("throughput.py", "-", "-", f"no figures ({shell_note(rec)}; see {out}/throughput.err)"))
    else:
        env, stages = result["environment"], result["stages"]
        head = (f"GPU suite: {env.get('gpu') or 'CPU (' + str(result['settings']['cores']) + ' cores)'} | "
                f"{env['date_utc']} | torch {env['torch']}, DALI {env['dali']} | "
                f"{result['dataset']['num_images']} ImageNet-like JPEGs")
        for key, st in stages.items():
            rows.append((name_of(key), setting(st, result), num(rate(st)), note(key, st, result)))
        if not result.get("complete"):  # killed from outside: the planned stages it never reached
            why = f"not reached: throughput.py {shell_note(rec)}" if rec else "not reached"
            for key in result["settings"]["stages"]:
                if key not in stages:
                    rows.append((name_of(key), "-", "-", why))
        summary["throughput"] = {"complete": result.get("complete"), "ratios": result["ratios"],
                                 "best": result.get("best"),
                                 "stages": {k: {"img_per_s": rate(st), "status": st.get("status"),
                                                "error": st.get("error"), "setting": setting(st, result),
                                                "note": note(k, st, result)} for k, st in stages.items()}}

    lines = [f"## {head}", ""]
    lines += markdown_table(("stage", "setting", "img/s (median)", "ratio / note"), rows, right=(2,))

    if result is not None:
        stages = result["stages"]
        target = result.get("targets", {}).get("byol_8xV100", TARGET_BYOL_8XV100)
        e2e = [st for st in stages.values() if st.get("stage") == "e2e-dali" and rate(st)]
        best_e2e = max(e2e, key=rate, default=None)
        vs = best_e2e.get("vs_step_alone") if best_e2e else None
        wait = best_e2e.get("data_wait_fraction") if best_e2e else None
        ck = result["ratios"].get("checkpoint_pause_ratio")
        shards = result["ratios"].get("shards_vs_files_loader")
        checks = {
            "e2e_img_per_s": {"value": rate(best_e2e), "target": f">= {TARGET_E2E:,.0f}",
                              "met": None if best_e2e is None else rate(best_e2e) >= TARGET_E2E},
            "e2e_vs_step_alone": {"value": vs, "target": f">= {TARGET_E2E_VS_STEP}",
                                  "met": None if vs is None else vs >= TARGET_E2E_VS_STEP},
            "data_wait_fraction": {"value": wait, "target": f"< {TARGET_DATA_WAIT}",
                                   "met": None if wait is None else wait < TARGET_DATA_WAIT},
        }
        summary["targets"] = checks
        lines += ["", "Targets (end to end DALI, its best measured variant):",
                  f"- e2e img/s >= {TARGET_E2E:,.0f}: {num(rate(best_e2e))}{verdict(checks['e2e_img_per_s']['met'])}",
                  f"- e2e / step alone >= {TARGET_E2E_VS_STEP}: {num(vs, 3)}{verdict(checks['e2e_vs_step_alone']['met'])}",
                  f"- data wait < {pct(TARGET_DATA_WAIT)}: {pct(wait)}{verdict(checks['data_wait_fraction']['met'])}",
                  f"- checkpoint pause ratio (background writer / synchronous save): {num(ck, 3)}",
                  f"- DALI loader, shard set / the same files: {num(shards, 3)}"]
        best = result.get("best")
        if best:
            lines.append(f"- 8x V100 target ({target:,.0f} img/s), from the best measured configuration "
                         f"{name_of(best['stage'])} ({best['what']}; {best['description']}): "
                         f"{best['img_per_s']:,.0f} img/s = {best['img_per_s'] / target:.3f} of it; "
                         f"{best['devices_for_8xV100_target']:.2f} GPUs like this one match it")
        else:
            lines.append(f"- 8x V100 target ({target:,.0f} img/s): no BYOL figure measured")
    times = ", ".join(f"{k} {r['seconds']} s" + (" (timed out)" if r["rc"] in (124, 137) else "")
                      for k, r in shell.items())
    if times:
        total = sum(r["seconds"] for r in shell.values())
        lines += ["", f"Wall time {total // 60} min {total % 60} s: {times}. Figures: {out}/*.json"]
        summary["wall_seconds"] = total
    return "\n".join(lines) + "\n", summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "benchmarks/out")
    text, summary = build(out)
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
