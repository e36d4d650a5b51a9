"""The layers of the code, checked from its import statements (read with ast, nothing imported).

Every import counts, at the top of a module or inside a function: an import moved into a function
still ties two modules together. The rules:

- the commands (``python -m byol_fast.<name>``) sit on the library and never import each other; the
  library and the benchmark never import a command;
- each library subpackage imports only the layers below it (:data:`ALLOWED`); the foundation
  modules (``config``, ``constants``, ``errors``) import nothing above them;
- ``pipelines/`` knows only the config, the constants and the errors of byol_fast;
- no circle among the project's modules.
"""
import ast

import pytest
from conftest import ROOT

COMMANDS = {"train", "linear_eval", "finetune", "export", "convert", "predict", "launch", "data", "dense_probe"}
FOUNDATION = {"byol_fast.config", "byol_fast.config_files", "byol_fast.config_ranges", "byol_fast.constants",
              "byol_fast.errors"}
# What each part of the library may import besides itself, lowest layer first.
ALLOWED = {
    "byol_fast.errors": set(),
    "byol_fast.constants": set(),
    "byol_fast.config_files": {"byol_fast.errors"},
    "byol_fast.config_ranges": {"byol_fast.errors"},
    "byol_fast.config": {"byol_fast.config_files", "byol_fast.config_ranges", "byol_fast.constants", "byol_fast.errors"},
    "pipelines": FOUNDATION,
    "byol_fast.runtime": FOUNDATION,
    "byol_fast.models": FOUNDATION,
    "byol_fast.optim": FOUNDATION,
    "byol_fast.weights": FOUNDATION | {"byol_fast.runtime", "byol_fast.models"},
    "byol_fast.datasets": FOUNDATION | {"byol_fast.runtime", "pipelines"},
    "byol_fast.evaluation": FOUNDATION | {"byol_fast.runtime", "byol_fast.models", "byol_fast.optim",
                                          "byol_fast.weights", "byol_fast.datasets", "pipelines"},
    "byol_fast.pretrain": FOUNDATION | {"byol_fast.runtime", "byol_fast.models", "byol_fast.optim",
                                        "byol_fast.weights", "byol_fast.datasets", "byol_fast.evaluation",
                                        "pipelines"},
}


def module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, own: str | None = None) -> set[str]:
    """Absolute names of what a file imports anywhere in it (relative imports resolved against its
    module name ``own``); for ``from a.b import c`` both ``a.b`` and ``a.b.c`` (c may be a module)."""
    own = own or module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def project_files():
    return sorted(p for d in ("byol_fast", "pipelines") for p in (ROOT / d).rglob("*.py"))


MODULES = {module_name(p): p for p in project_files()}


def project_imports(path) -> set[str]:
    """The project modules a file imports (names that are not modules, like ``a.b.Class``, dropped)."""
    return {n for n in imported_modules(path) if n in MODULES} - {module_name(path)}


def is_command(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 2 and parts[0] == "byol_fast" and parts[1] in COMMANDS


def layer_of(module: str) -> str:
    """The key of ALLOWED a module belongs to."""
    return max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len)


def test_the_import_reader_sees_relative_absolute_and_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from . import dist\nfrom .config import Config\nimport pipelines.loader\nimport os\n"
                 "from byol_fast import train\ndef f():\n    from byol_fast.weights import checkpoint\n")
    found = imported_modules(f, "byol_fast.runtime.m")
    assert {"byol_fast.runtime.dist", "byol_fast.runtime.config.Config", "pipelines.loader", "byol_fast.train",
            "byol_fast.weights.checkpoint"} <= found
    assert not any(n.startswith("os") for n in found if n != "os")


def test_every_library_module_has_a_layer_and_every_subpackage_says_what_it_holds():
    library = [m for m in MODULES if m != "byol_fast" and not is_command(m)]
    assert len(library) > 40
    for m in library:
        assert layer_of(m)
    for package in [k for k in ALLOWED if (ROOT / k.replace(".", "/") / "__init__.py").exists()]:
        doc = ast.get_docstring(ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text()))
        assert doc and "May import" in doc or package == "pipelines", package


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_never_import_each_other(command):
    others = {f"byol_fast.{c}" for c in COMMANDS - {command}}
    assert not project_imports(MODULES[f"byol_fast.{command}"]) & others


def test_the_library_and_the_benchmark_never_import_a_command():
    commands = {f"byol_fast.{c}" for c in COMMANDS}
    files = [p for m, p in MODULES.items() if not is_command(m)]
    files += list((ROOT / "benchmarks").rglob("*.py"))
    offenders = {str(p.relative_to(ROOT)): sorted(project_imports(p) & commands) for p in files
                 if project_imports(p) & commands}
    assert not offenders


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "byol_fast" and not is_command(m)))
def test_each_layer_imports_only_the_layers_below_it(module):
    layer = layer_of(module)
    allowed = ALLOWED[layer] | {layer}
    outside = {n for n in project_imports(MODULES[module])
               if not any(n == a or n.startswith(a + ".") for a in allowed) and n != "byol_fast"}
    assert not outside, f"{module} ({layer}) imports {sorted(outside)}"


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (module -> modules it imports), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_among_the_projects_modules():
    graph = {}
    for m, p in MODULES.items():
        # importing a.b.c runs a/__init__ and a/b/__init__ first: a package's __init__ is a module too
        graph[m] = project_imports(p)
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))
