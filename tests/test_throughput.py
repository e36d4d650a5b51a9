"""benchmarks/throughput.py end to end on the CPU: every stage runs, every figure is there, and the
printed table says what the JSON says.

One subprocess run of ``--quick`` on tiny settings (resnet18 at 32 px, batch 8, a few dozen
generated JPEGs), so the test exercises the very command a user runs.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "throughput.py"
ALL_STAGES = ["dali", "torchvision", "model", "e2e-dali", "e2e-torchvision", "linear", "e2e-linear"]
E2E_STAGES = ["e2e-dali", "e2e-torchvision", "e2e-linear"]

pytest.importorskip("nvidia.dali")


def parse_table(text: str) -> dict[str, dict]:
    """Rows of the results table: stage -> {median, min, max, wait}."""
    start = text.index("## Throughput")
    rows = {}
    for line in text[start:].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] in ALL_STAGES:
            rows[cells[0]] = {"median": cells[1], "min": cells[2], "max": cells[3], "wait": cells[4]}
    return rows


def parse_ratios(text: str) -> dict[str, float]:
    """``- text: 1.234  (`key`)`` lines -> {key: value}."""
    return {m.group(2): float(m.group(1)) for m in re.finditer(r"^- .*: ([0-9.]+)  \(`(\w+)`\)$", text, re.M)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--linear",
           "--num-images", "40", "--image-size", "32", "--batch", "8", "--threads", "2", "--torch-threads", "1",
           "--prefetch", "3",
           "--windows", "2", "--window-seconds", "0.2", "--warmup", "1",
           "--bench-data", str(out / "bench_data"), "--json", str(out / "r.json"), "--plot", str(out / "r.png"),
           # config overrides pass through, as for byol_fast.train: a smaller projector keeps the test fast
           "--model.projector_hidden=256", "--model.predictor_hidden=256"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "r.json").read_text()), out


def test_every_stage_has_finite_positive_figures(run):
    _, result, _ = run
    assert list(result["stages"]) == ALL_STAGES
    for name, stage in result["stages"].items():
        assert stage["error"] is None, (name, stage["error"])
        r = stage["img_per_s"]
        for key in ("median", "min", "max"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["min"] <= r["median"] <= r["max"]
        assert len(r["windows"]) == result["settings"]["windows"] == 2
        assert stage["host_peak_rss_gb"] > 0 and math.isfinite(stage["step_ms"]) and stage["step_ms"] > 0
    for name in E2E_STAGES:
        assert 0.0 <= result["stages"][name]["data_wait_fraction"] <= 1.0
    for key, value in result["ratios"].items():
        assert value is not None and math.isfinite(value) and value > 0, key


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


def test_reader_options_reach_the_linear_stage(run):
    """--prefetch lands in the reader section, which every loader takes whole: the linear loader too."""
    _, result, _ = run
    assert result["config"]["reader"]["prefetch"] == 3
    assert "prefetch" not in result["config"]["data"]
    linear = result["stages"]["e2e-linear"]
    assert linear["error"] is None and linear["img_per_s"]["median"] > 0


def test_printed_table_matches_json(run):
    stdout, result, _ = run
    rows = parse_table(stdout)
    assert sorted(rows) == sorted(ALL_STAGES)
    for name, row in rows.items():
        r = result["stages"][name]["img_per_s"]
        for key in ("median", "min", "max"):
            assert float(row[key]) == pytest.approx(r[key], abs=0.051), (name, key)
        wait = result["stages"][name].get("data_wait_fraction")
        assert (row["wait"] == "-") == (wait is None)
        if wait is not None:
            assert float(row["wait"]) == pytest.approx(wait, abs=0.00051)
    printed = parse_ratios(stdout)
    assert set(printed) == set(result["ratios"])
    for key, value in printed.items():
        assert value == pytest.approx(result["ratios"][key], abs=0.00051), key
    stages = result["stages"]
    assert result["ratios"]["dali_vs_torchvision_loader"] == pytest.approx(
        stages["dali"]["img_per_s"]["median"] / stages["torchvision"]["img_per_s"]["median"])


def test_plot_is_a_png(run):
    _, _, out = run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert "| model | missing |" in proc.stdout
