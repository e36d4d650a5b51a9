"""The layers of the code, checked from its import statements (read with ast, nothing imported):
entry points sit on the library and never import each other; the library never imports an entry
point; pipelines/ knows only the config and the constants of byol_fast."""
import ast

import pytest
from conftest import ROOT

DRIVERS = {"train", "linear_eval", "finetune", "export", "convert", "predict", "launch", "data", "dense_probe"}  # python -m byol_fast.<name>


def imported_modules(path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against byol_fast)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("byol_fast." + (node.module or "")).rstrip(".") if node.level else node.module
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # from byol_fast import train: a module too
    return names


def project_imports(path) -> set[str]:
    return {n for n in imported_modules(path) if n.split(".")[0] in ("byol_fast", "pipelines")}


def test_the_import_reader_sees_relative_and_absolute_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from . import dist\nfrom .config import Config\nimport pipelines.loader\nimport os\n"
                 "from byol_fast import train\n")
    assert {"byol_fast.dist", "byol_fast.config", "pipelines.loader", "byol_fast.train"} <= project_imports(f)
    assert not any(n.startswith("os") for n in project_imports(f))


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_entry_points_never_import_each_other(driver):
    others = {f"byol_fast.{d}" for d in DRIVERS - {driver}}
    assert not project_imports(ROOT / "byol_fast" / f"{driver}.py") & others


def test_the_library_and_the_benchmark_never_import_an_entry_point():
    drivers = {f"byol_fast.{d}" for d in DRIVERS}
    files = [p for p in (ROOT / "byol_fast").glob("*.py") if p.stem not in DRIVERS]
    files += list((ROOT / "benchmarks").glob("*.py"))
    assert len(files) > 15
    offenders = {p.name: sorted(project_imports(p) & drivers) for p in files if project_imports(p) & drivers}
    assert not offenders


def test_pipelines_know_only_the_config_and_the_constants():
    allowed = {"byol_fast.config", "byol_fast.constants"}
    for path in (ROOT / "pipelines").glob("*.py"):
        outside = {n for n in project_imports(path) if n.startswith("byol_fast")
                   and not any(n == m or n.startswith(m + ".") for m in allowed)}
        assert not outside, f"{path.name} imports {sorted(outside)}"
