"""The benchmark at several sides (``--image-size 160,192,224``) and the ramp's projected wall time
(benchmarks/ramp_projection.py), against figures worked out by hand."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # the bench package, as benchmarks/throughput.py finds it
import ramp_projection  # noqa: E402
import throughput  # noqa: E402
from bench.entries import stage_list, stage_overrides, parse_stage  # noqa: E402
from bench.report import at_side  # noqa: E402
from byol_fast.config import DataConfig  # noqa: E402
from byol_fast.errors import ConfigError  # noqa: E402


def test_each_image_entry_runs_once_per_side():
    assert stage_list("model,dali:hw=1.0,checkpoint,e2e-dali:size=96", False, (160, 224)) == [
        "model:size=160", "model:size=224", "dali:hw=1.0:size=160", "dali:hw=1.0:size=224", "checkpoint",
        "e2e-dali:size=96"]
    assert stage_list("model", False, (224,)) == ["model"]  # one side: entries as written
    assert stage_overrides(parse_stage("model:size=160").options) == {"data": {"image_size": 160}}
    with pytest.raises(ConfigError, match="size= does not apply to the checkpoint stage"):
        parse_stage("checkpoint:size=160")
    args, _ = throughput.parse_args(["--image-size", "160,192,224"])
    assert args.image_size == (160, 192, 224)
    with pytest.raises(SystemExit):
        throughput.parse_args(["--image-size", "160,x"])


def test_ratios_compare_entries_at_one_side():
    stages = {"model:size=160": {"options": {"size": 160}}, "model": {"options": {}},
              "model:size=224": {"options": {"size": 224}}}
    assert set(at_side(stages, 224, 224)) == {"model", "model:size=224"}
    assert set(at_side(stages, 160, 224)) == {"model:size=160"}  # an entry without size= ran at 224


def result(tmp_path, per_side: dict[int, float], default_side: int):
    """A throughput result as the GPU suite leaves it: the run's side measured without size=, the
    others with it."""
    stages = {("e2e-dali" if side == default_side else f"e2e-dali:size={side}"):
              {"stage": "e2e-dali", "options": {} if side == default_side else {"size": side},
               "img_per_s": {"median": v}} for side, v in per_side.items()}
    path = tmp_path / "sides.json"
    path.write_text(json.dumps({"settings": {"image_size": default_side}, "stages": stages}))
    return path


def test_the_projection_sums_each_epoch_at_its_side(tmp_path):
    # 160 -> 224 over epochs 4-8 of 10: 160 for epochs 0-4, 176 -> 192 and 192 for 5-6, 208 -> 224 and
    # 224 for 7-9. At 100, 80 and 50 img/s, 3,600 images an epoch: 5/100 + 2/80 + 3/50 = 0.135 h,
    # against 10/50 = 0.2 h at 224 throughout.
    per_side = {160: 100.0, 192: 80.0, 224: 50.0}
    ramp = DataConfig(image_size=224, start_image_size=160, ramp_start_epoch=4, ramp_end_epoch=8)
    got = ramp_projection.project(per_side, ramp, 10, 3600)
    assert {s: r["epochs"] for s, r in got["sides"].items()} == {160: 5, 192: 2, 224: 3}
    assert got["hours"] == pytest.approx(0.135)
    assert ramp_projection.project(per_side, DataConfig(image_size=224), 10, 3600)["hours"] == pytest.approx(0.2)
    out = tmp_path / "projection.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ramp_projection.py"),
                           str(result(tmp_path, per_side, 224)), "--epochs=10", "--images=3600", "--ramp-start=4",
                           "--ramp-end=8", f"--json={out}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["ratio"] == pytest.approx(0.675)


def test_a_side_the_ramp_visits_unmeasured_is_named(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ramp_projection.py"),
                           str(result(tmp_path, {160: 100.0, 224: 50.0}, 224)), "--epochs=10"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no measured throughput at 192 px" in done.stderr


def test_every_entry_of_the_gpu_suite_parses():
    """The suite's --stages lists (GPU and quick) are checked here, before any lent GPU time."""
    import re

    text = (ROOT / "benchmarks" / "gpu_checks.sh").read_text()
    entries = [e for chunk in re.findall(r'stages\+?="([^"]*)"', text) for e in chunk.split(",") if e]
    assert any(e.startswith("e2e-dali:size=160") for e in entries)
    for entry in entries:
        parse_stage(entry)
