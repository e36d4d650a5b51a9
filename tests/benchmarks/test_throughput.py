"""benchmarks/throughput.py end to end on the CPU: every stage runs, every figure is there, and the
printed table says what the JSON says; the GPU suite's pieces (stage variants, time boxes, OOM
records, the closing table of benchmarks/gpu_table.py) without a GPU.

One subprocess run of ``--quick`` on tiny settings (resnet18 at 32 px, batch 8, a few dozen
generated JPEGs), so the test exercises the very command a user runs; the time boxes and the OOM
record in-process, on stand-in stages that take no time.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from byol_fast.datasets.index import load_index

SCRIPT = ROOT / "benchmarks" / "throughput.py"
BASE_STAGES = ["dali", "shards", "torchvision", "model", "e2e-dali", "e2e-torchvision", "linear", "e2e-linear"]
# the suite's kinds of entry; shards:shard_size=1MB asks for the set the plain shards stage packed
VARIANTS = ["model:batch=4", "model:loss=pixpro", "e2e-dali:step=best", "shards:shard_size=1MB", "checkpoint"]
ALL_STAGES = BASE_STAGES + VARIANTS
E2E_STAGES = ["e2e-dali", "e2e-torchvision", "e2e-linear", "e2e-dali:step=best"]
# Ratios that need a stage this run does not have (a compiled step).
NOT_MEASURED_HERE = {"compiled_vs_eager_step"}

pytest.importorskip("nvidia.dali")

sys.path.insert(0, str(ROOT / "benchmarks"))  # the bench package, as benchmarks/throughput.py finds it
from bench import settings, timebox, timing  # noqa: E402
from bench.entries import STAGES, parse_stage, stage_overrides  # noqa: E402
from bench.runner import RunState, run_stage  # noqa: E402
from bench.stages import RUNNERS  # noqa: E402
from bench.stages.context import Shared  # noqa: E402
from byol_fast.errors import ConfigError  # noqa: E402


def parse_table(text: str) -> dict[str, dict]:
    """Rows of the results table: stage -> {median, min, max, wait}."""
    start = text.index("## Throughput")
    rows = {}
    for line in text[start:].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] in ALL_STAGES and cells[0] != "checkpoint":
            rows[cells[0]] = {"median": cells[1], "min": cells[2], "max": cells[3], "wait": cells[4]}
    return rows


def parse_ratios(text: str) -> dict[str, float]:
    """``- text: 1.234  (`key`)`` lines -> {key: value}."""
    return {m.group(2): float(m.group(1)) for m in re.finditer(r"^- .*: ([0-9.]+)  \(`(\w+)`\)$", text, re.M)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--stages", ",".join(ALL_STAGES),
           "--num-images", "40", "--image-size", "32", "--batch", "8", "--threads", "2", "--torch-threads", "1",
           "--checkpoint-repeats", "1",
           "--prefetch", "3",
           "--windows", "2", "--window-seconds", "0.2", "--warmup", "1",
           "--bench-data", str(out / "bench_data"), "--json", str(out / "r.json"), "--plot", str(out / "r.png"),
           # config overrides pass through, as for byol_fast.train: a smaller projector keeps the test fast
           "--model.projector_hidden=256", "--model.predictor_hidden=256"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "r.json").read_text()), out


@pytest.mark.slow
def test_every_stage_has_finite_positive_figures(run):
    _, result, _ = run
    assert list(result["stages"]) == ALL_STAGES and result["complete"] is True
    for name, stage in result["stages"].items():
        assert stage["error"] is None and stage["status"] == "ok", (name, stage["error"])
        if name == "checkpoint":
            continue  # seconds, not images per second: test_checkpoint_stage
        r = stage["img_per_s"]
        for key in ("median", "min", "max"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["min"] <= r["median"] <= r["max"]
        assert len(r["windows"]) == result["settings"]["windows"] == 2
        assert stage["host_peak_rss_gb"] > 0 and math.isfinite(stage["step_ms"]) and stage["step_ms"] > 0
    for name in E2E_STAGES:
        assert 0.0 <= result["stages"][name]["data_wait_fraction"] <= 1.0
    for key, value in result["ratios"].items():
        if key in NOT_MEASURED_HERE:
            assert value is None, key
        else:
            assert value is not None and math.isfinite(value) and value > 0, key


@pytest.mark.slow
def test_settings_and_environment_are_recorded(run):
    _, result, _ = run
    cfg = result["config"]
    assert cfg["model"]["backbone"] == "resnet18" and cfg["data"]["image_size"] == 32
    assert cfg["model"]["projector_hidden"] == 256  # the pass-through override reached the config
    assert cfg["optim"]["batch_size"] == 8 and cfg["reader"]["num_threads"] == 2
    assert cfg["data"]["view1"]["blur_kernel"] == 3  # 10% of the 32 px view, odd
    env = result["environment"]
    for key in ("torch", "torchvision", "dali", "cpu", "date_utc"):
        assert env[key], key
    assert result["dataset"]["num_images"] == 40


@pytest.mark.slow
def test_reader_options_reach_the_linear_stage(run):
    """--prefetch lands in the reader section, which every loader takes whole: the linear loader too."""
    _, result, _ = run
    assert result["config"]["reader"]["prefetch"] == 3
    assert "prefetch" not in result["config"]["data"]
    linear = result["stages"]["e2e-linear"]
    assert linear["error"] is None and linear["img_per_s"]["median"] > 0


@pytest.mark.slow
def test_printed_table_matches_json(run):
    stdout, result, _ = run
    rows = parse_table(stdout)
    assert sorted(rows) == sorted(s for s in ALL_STAGES if s != "checkpoint")
    for name, row in rows.items():
        r = result["stages"][name]["img_per_s"]
        for key in ("median", "min", "max"):
            assert float(row[key]) == pytest.approx(r[key], abs=0.051), (name, key)
        wait = result["stages"][name].get("data_wait_fraction")
        assert (row["wait"] == "-") == (wait is None)
        if wait is not None:
            assert float(row["wait"]) == pytest.approx(wait, abs=0.00051)
    printed = parse_ratios(stdout)
    assert set(printed) == {k for k, v in result["ratios"].items() if v is not None}
    for key, value in printed.items():
        assert value == pytest.approx(result["ratios"][key], abs=0.00051), key
    stages = result["stages"]
    assert result["ratios"]["dali_vs_torchvision_loader"] == pytest.approx(
        stages["dali"]["img_per_s"]["median"] / stages["torchvision"]["img_per_s"]["median"])


@pytest.mark.slow
def test_plot_is_a_png(run):
    _, _, out = run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_variants_and_the_best_step(run):
    """A variant runs its own setting; step=best runs the fastest model variant's step (its very
    learner, kept warm) and is compared with that step alone; the 8x V100 comparison names the best
    measured configuration."""
    stdout, result, _ = run
    stages = result["stages"]
    assert stages["model:batch=4"]["step"]["batch"] == 4 and stages["model"]["step"]["batch"] == 8
    rate = {k: stages[k]["img_per_s"]["median"] for k in ("model", "model:batch=4")}
    fastest = max(rate, key=rate.get)
    e2e = stages["e2e-dali:step=best"]
    assert e2e["step_stage"] == fastest and e2e["step_learner_reused"] is True
    assert e2e["step"] == stages[fastest]["step"]
    assert e2e["vs_step_alone"] == pytest.approx(e2e["img_per_s"]["median"] / rate[fastest])
    # the plain e2e stage has the plain model's step signature: it is compared with that one
    assert stages["e2e-dali"]["step_alone_stage"] == "model"
    best_e2e = max(["e2e-dali", "e2e-dali:step=best", "e2e-torchvision"], key=lambda k: stages[k]["img_per_s"]["median"])
    best = result["best"]
    assert best["stage"] == best_e2e and best["what"] == "end to end"
    assert result["ratios"]["devices_like_this_for_8xV100_target"] == pytest.approx(
        3121.0 / stages[best_e2e]["img_per_s"]["median"])
    assert f"Best measured configuration: {best_e2e} (end to end;" in stdout
    assert "| model:batch=4 |" in stdout


@pytest.mark.slow
def test_the_pixpro_step_is_measured_beside_the_instance_step(run):
    """model:loss=pixpro runs PixPro's step (pixel head, propagation, pairs from synthetic crop
    windows) at the model stage's settings; its ratio to the instance step is reported, and it is
    never the step an end-to-end stage borrows."""
    _, result, _ = run
    stages = result["stages"]
    pix = stages["model:loss=pixpro"]
    assert pix["step"] == {**stages["model"]["step"], "loss": "pixpro"} and pix["skipped_steps"] == 0
    assert result["ratios"]["pixpro_vs_instance_step"] == pytest.approx(
        pix["img_per_s"]["median"] / stages["model"]["img_per_s"]["median"])
    assert stages["e2e-dali:step=best"]["step"]["loss"] == "instance"


@pytest.mark.slow
def test_shards_stage_reads_the_files_of_the_dali_stage_as_shards(run):
    """The shards stage packs the very images the dali stage reads (counted here from a fresh index of
    the generated folder), records the packing, reads them through the same DALI pipeline and is
    compared with the dali stage of the same settings; a later variant of the same size reads the
    set packed before; the packed sets are gone after the run."""
    stdout, result, out = run
    stages = result["stages"]
    files = len(load_index(Path(result["dataset"]["source"]) / "train").files)
    assert files == result["dataset"]["num_images"] == 40
    sh = stages["shards"]
    assert sh["packed_samples"] == sh["num_samples"] == files
    assert sh["pack_mb_per_s"] > 0 and sh["pack_seconds"] > 0 and sh["packed_here"] is True
    # 40 images of ~110 KB: the default (an eighth of the data) is below its 1 MB floor
    assert sh["shard_bytes"] == 10**6 and sh["shards"] == len(sh["shard_sizes_bytes"]) >= 2
    assert sum(sh["shard_sizes_bytes"]) == sh["packed_bytes"] and max(sh["shard_sizes_bytes"]) <= 10**6
    assert sh["loader"] == stages["dali"]["loader"] and sh["loader"]["reader"]["loader"] == "dali"
    assert sh["files_stage"] == "dali"
    assert sh["vs_files"] == pytest.approx(sh["img_per_s"]["median"] / stages["dali"]["img_per_s"]["median"])
    again = stages["shards:shard_size=1MB"]
    assert again["packed_here"] is False and again["shard_set"] == sh["shard_set"] and again["vs_files"] > 0
    best = max(["shards", "shards:shard_size=1MB"], key=lambda k: stages[k]["img_per_s"]["median"])
    assert result["ratios"]["shards_vs_files_loader"] == pytest.approx(stages[best]["vs_files"])
    assert "## Shard set" in stdout and "- shards: 40 images, " in stdout
    assert not list((out / "bench_data" / "scratch").glob("shards_*"))  # removed at the end of the run


@pytest.mark.slow
def test_checkpoint_stage(run):
    """The checkpoint stage hands the BYOL learner's state to checkpoint_pause.measure and keeps what
    it returns; the pause ratio is read from it."""
    stdout, result, _ = run
    ck = result["stages"]["checkpoint"]
    assert ck["img_per_s"] is None and ck["state_gb"] > 0 and ck["repeats"] == 1
    figures = ck["checkpoint"]
    assert isinstance(figures, dict) and figures
    ratio = result["ratios"]["checkpoint_pause_ratio"]
    if "pause_over_sync" in figures:
        assert ratio == pytest.approx(figures["pause_over_sync"])
    assert "## Checkpoint pause" in stdout


# ---------------------------------------------------------------------------- in-process pieces


@pytest.fixture(scope="module")
def tp():
    """benchmarks/throughput.py as a module: the command line and main()."""
    spec = importlib.util.spec_from_file_location("throughput_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in_run(tp, stages: list[str], *extra: str, budget: float | None = None) -> RunState:
    """The run state the run loop hands run_stage, for stages whose work a test replaces."""
    args, over = tp.parse_args(["--device", "cpu", "--stages", ",".join(stages), "--batch", "8", "--image-size", "32",
                                "--windows", "2", "--window-seconds", "0.05", "--warmup", "0", *extra]
                               + ([] if budget is None else ["--time-budget", str(budget)]))
    options = settings.from_args(args, over)
    assert options.settings.time_budget == budget
    return RunState(options.settings, options.recipe, Shared(index=None, scratch=None),
                    budget_end=time.monotonic() + budget if budget is not None else None)


def test_stage_entries_are_checked(tp):
    assert list(RUNNERS) == list(STAGES)  # every stage runs something, in the order they are listed
    assert parse_stage("model:batch=384:compile=max-autotune-no-cudagraphs:timeout=rest") == (
        "model", {"batch": 384, "compile": "max-autotune-no-cudagraphs", "timeout": "rest"})
    assert parse_stage("dali:hw=1.0") == ("dali", {"hw": 1.0})
    assert parse_stage("shards:shard_size=64MB:threads=2") == ("shards", {"shard_size": 64 * 10**6, "threads": 2})
    assert stage_overrides({"batch": 384, "compile": False, "hw": 0.5}) == {
        "optim": {"batch_size": 384}, "compile": False, "reader": {"hw_decoder_load": 0.5}}
    assert stage_overrides(parse_stage("model:backbone=resnet200x2:loss=pixpro").options) == {
        "model": {"backbone": "resnet200x2", "loss": "pixpro"}}
    # --compile-mode passes through to the config as --compile does, and implies it
    args, over = tp.parse_args(["--device", "cpu", "--compile-mode", "max-autotune-no-cudagraphs"])
    options = settings.from_args(args, over)
    cfg = options.recipe.config()
    assert cfg.compile is True and cfg.compile_mode == "max-autotune-no-cudagraphs" and options.settings.warmup == 10
    cfg = options.recipe.config(stage_overrides({"compile": False}))
    assert cfg.compile is False  # a variant can turn it off again
    for bad, words in [("modle", "unknown stage"), ("model:hw=1.0", "does not apply"), ("dali:hw=1.5", "must be in"),
                       ("e2e-dali:step=worst", "only 'best'"), ("model:depth=3", "not key=value"),
                       ("model:batch=0", ">= 1"), ("shards:shard_size=big", "not a size"),
                       ("dali:shard_size=64MB", "does not apply"), ("model:backbone=resnet9", "one of resnet18"),
                       ("dali:backbone=resnet50", "does not apply")]:
        with pytest.raises(ConfigError, match=words):
            parse_stage(bad)


def test_a_bad_compile_mode_stops_before_any_work(tp, tmp_path, capsys):
    """Each variant's config is built (and checked by the config's rules) before any work."""
    assert tp.main(["--device", "cpu", "--stages", "model,model:compile=fastest", "--bench-data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "compile_mode" in err and "fastest" in err
    assert not any(tmp_path.iterdir())  # no images made: it stopped first
    assert tp.main(["--device", "cpu", "--compile-mode", "fastest", "--bench-data", str(tmp_path)]) == 2


def test_out_of_memory_is_recorded_and_the_next_stage_runs(tp, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setitem(RUNNERS, "model", oom)
    run = stand_in_run(tp, ["model:batch=512"])
    st = run_stage("model:batch=512", run, torch.device("cpu"))
    assert st["status"] == "out of memory" and st["img_per_s"] is None
    assert st["error"] == "CUDA out of memory at batch 512" and "Tried to allocate" in st["error_detail"]
    # wrapped by another library's error (torch.compile does so), it is still an OOM
    assert timebox.is_oom(RuntimeError("backend failed")) is False
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = torch.cuda.OutOfMemoryError("CUDA out of memory.")
    assert timebox.is_oom(wrapped)


def test_a_stage_past_its_time_box_says_so(tp, monkeypatch):
    """The box ends a stage stuck in Python, also one that swallows the first alarm (the alarm rings
    again every second), and the stage records it."""
    def stuck(*args, **kwargs):
        try:
            while True:
                time.sleep(0.01)
        except timebox.StageTimeout:
            pass  # as a weakref callback or a __del__ would: the next ring gets through
        while True:
            time.sleep(0.01)

    monkeypatch.setitem(RUNNERS, "model", stuck)
    run = stand_in_run(tp, ["model:timeout=0.3"])
    t = time.monotonic()
    st = run_stage("model:timeout=0.3", run, torch.device("cpu"))
    assert st["status"] == "timed out" and st["error"] == "timed out after 0.3 s" and st["time_box_s"] == 0.3
    assert time.monotonic() - t < 5


def test_the_budget_cuts_boxes_and_skips_stages_it_cannot_fit(tp, monkeypatch):
    run = stand_in_run(tp, ["model:timeout=100", "dali:timeout=rest", "linear"], "--stage-reserve", "4", budget=30)
    # the first keeps 4 s for linear, none for the rest-stage; the rest-stage keeps 4 s for linear
    assert timebox.time_box(run.settings, "model:timeout=100", run.budget_end) == pytest.approx(26, abs=0.5)
    assert timebox.time_box(run.settings, "dali:timeout=rest", run.budget_end) == pytest.approx(26, abs=0.5)
    assert timebox.time_box(run.settings, "linear", run.budget_end) == pytest.approx(30, abs=0.5)
    run.budget_end = time.monotonic() + 2  # 2 s left: under MIN_STAGE_SECONDS
    monkeypatch.setitem(RUNNERS, "linear", lambda *a: pytest.fail("a stage without time must not start"))
    st = run_stage("linear", run, torch.device("cpu"))
    assert st["status"] == "skipped" and st["error"].startswith("not run: 2 s of the time budget")


def test_a_window_cut_by_the_box_keeps_the_figures_measured(tp):
    """Windows shrink to fit the box; with no room for one, the calibration steps are the figure."""
    plan = timing.Plan(warmup=0, windows=3, window_seconds=10.0, deadline=time.monotonic() + 1.5)
    out = timing.measure(lambda: time.sleep(0.01), 1, lambda: None, plan, "t")
    assert len(out["img_per_s"]["windows"]) >= 1 and time.monotonic() < plan.deadline + 0.5
    plan = timing.Plan(warmup=0, windows=3, window_seconds=10.0, deadline=time.monotonic() + 0.2)
    out = timing.measure(lambda: time.sleep(0.05), 1, lambda: None, plan, "t")
    assert out["windows_cut_short"] and len(out["img_per_s"]["windows"]) == 1
    assert out["img_per_s"]["median"] == pytest.approx(20, rel=0.5)


# ---------------------------------------------------------------------------- the suite's table


@pytest.mark.slow
def test_suite_table_from_the_run(run, tmp_path):
    """benchmarks/gpu_table.py reads what gpu_checks.sh leaves under $OUT: one row per stage, the
    targets beside the figures, the stages a killed process never reached, and summary.json."""
    _, result, _ = run
    out = tmp_path / "out"
    out.mkdir()
    partial = {**result, "complete": False,
               "settings": {**result["settings"], "stages": result["settings"]["stages"] + ["model:compile=default"]}}
    (out / "throughput.json").write_text(json.dumps(partial))
    (out / "pytest-gpu.txt").write_text("....\n4 passed, 149 deselected in 18.35s\n")
    (out / "suite.jsonl").write_text('{"stage": "pytest", "rc": 0, "seconds": 20, "limit_s": 90}\n'
                                     '{"stage": "throughput", "rc": 124, "seconds": 400, "limit_s": 400}\n')
    spec = importlib.util.spec_from_file_location("gpu_table_under_test", ROOT / "benchmarks" / "gpu_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.main([str(out)]) == 0
    text = (out / "table.md").read_text()
    assert "| pytest -m gpu | the GPU-marked tests | - | 4 passed, 149 deselected in 18.35s |" in text
    for key in ALL_STAGES:
        assert f"| {key} |" in text, key
    assert "| model:compile=default | - | - | not reached: throughput.py timed out after 400 s |" in text
    e2e = max((st for k, st in result["stages"].items() if k.startswith("e2e-dali")),
              key=lambda st: st["img_per_s"]["median"])
    assert f"- e2e / step alone >= 0.97: {e2e['vs_step_alone']:,.3f}" in text
    assert "- data wait < 3.0%: " in text and "GPUs like this one match it" in text
    assert f"- DALI loader, shard set / the same files: {result['ratios']['shards_vs_files_loader']:.3f}" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"]["data_wait_fraction"]["value"] == pytest.approx(e2e["data_wait_fraction"])
    assert summary["throughput"]["complete"] is False and summary["wall_seconds"] == 420


def test_the_suite_table_needs_no_torch():
    """gpu_table.py, with the bench.table it shares, imports the standard library alone: it must run
    whatever the state of the lent machine."""
    code = "import sys; import gpu_table; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_suite_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_checks.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_a_failing_stage_is_reported_and_the_others_still_run(tmp_path):
    """A stage that cannot run (here bf16 on a CPU fails the model stage) is marked missing,
    in the table and the JSON, and the run still measures the others (exit status 1)."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--stages", "dali,model",
           "--num-images", "16", "--image-size", "32", "--batch", "8", "--threads", "1", "--windows", "1",
           "--window-seconds", "0.1", "--warmup", "1", "--bench-data", str(tmp_path / "bench_data"),
           "--json", str(tmp_path / "r.json"), "--precision=bf16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    result = json.loads((tmp_path / "r.json").read_text())
    assert proc.returncode == 1
    assert result["stages"]["dali"]["error"] is None and result["stages"]["dali"]["img_per_s"]["median"] > 0
    assert result["stages"]["model"]["img_per_s"] is None and "needs a CUDA GPU" in result["stages"]["model"]["error"]
    assert result["stages"]["model"]["status"] == "failed"
    assert "| model | missing |" in proc.stdout
