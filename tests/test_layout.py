"""The package's shape: no import cycle, no upward import, and a README layout table that matches the tree.

Imports are read with `ast` (module level and inside functions alike: a lazy import is still a
dependency). Layers, lowest first; a module may import from its own layer and the layers below:

    errors -> io -> moe -> analysis (the metrics) -> model -> data -> config -> training -> export
           -> analysis (the pipelines: analyze, collect, report, cli) -> experiments -> cli / train

The analysis package is split by module: its statistics (metrics, alarms, CKA, probes, routing
measures) are used by the trainer's alarms and by everything above; its pipelines read checkpoints
and exports, so they sit above `export`.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmoe_ds"
LAYERS = [
    ["mmoe_ds.errors"],
    ["mmoe_ds.io"],
    ["mmoe_ds.moe"],
    ["mmoe_ds.analysis.metrics", "mmoe_ds.analysis.alarms", "mmoe_ds.analysis.cka", "mmoe_ds.analysis.probe",
     "mmoe_ds.analysis.routing"],
    ["mmoe_ds.model"],
    ["mmoe_ds.data"],
    ["mmoe_ds.config"],
    ["mmoe_ds.training"],
    ["mmoe_ds.export"],
    ["mmoe_ds.analysis"],  # the rest of analysis: analyze, collect, report, cli and the package's __init__
    ["mmoe_ds.experiments"],
    ["mmoe_ds.cli", "mmoe_ds.train"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The mmoe_ds modules `name` imports (`from pkg import mod` counts as importing mod)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mmoe_ds"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mmoe_ds"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m != name}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


@pytest.fixture(scope="module")
def graph():
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if m != "mmoe_ds" and layer_of(m) is None] == []


def test_no_upward_import(graph):
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in graph.items() if m != "mmoe_ds" for d in sorted(deps)
              if d != "mmoe_ds" and layer_of(d) > layer_of(m)]
    assert upward == []


def test_no_import_cycle(graph):
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The rules above can fail: a planted cycle and a planted upward import are found."""
    graph = {"mmoe_ds.moe.a": {"mmoe_ds.moe.b"}, "mmoe_ds.moe.b": {"mmoe_ds.moe.a"},
             "mmoe_ds.io.atomic": {"mmoe_ds.training.trainer"}}
    assert layer_of("mmoe_ds.training.trainer") > layer_of("mmoe_ds.io.atomic")
    with pytest.raises(AssertionError):
        test_no_import_cycle(graph)
    with pytest.raises(AssertionError):
        test_no_upward_import(graph)


def layout_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Layout", 1)[1].split("\n## ", 1)[0]


def test_readme_layout_table_matches_the_tree():
    """Every path the layout table names exists; every package and top-level module of mmoe_ds/ is named."""
    section = layout_section()
    named = set(re.findall(r"`(mmoe_ds/[\w/.]*)`", section))
    assert named, "no mmoe_ds/ paths in the README's Layout section"
    assert sorted(p for p in named if not (REPO / p.rstrip("/")).exists()) == []
    entries = {f"mmoe_ds/{p.name}/" if p.is_dir() else f"mmoe_ds/{p.name}"
               for p in PACKAGE.iterdir() if (p.is_dir() and (p / "__init__.py").exists())
               or (p.suffix == ".py" and p.name != "__init__.py")}
    assert sorted(entries - named) == []


def test_readme_layout_rows_name_their_packages_modules():
    """A package's row names each of its modules (`name.py`, or `sub/` for a subpackage), and only those."""
    problems = []
    for row in layout_section().splitlines():
        cells = row.split("|")
        if len(cells) < 3:
            continue
        heads = re.findall(r"`(mmoe_ds/[\w]+/)`", cells[1])
        if len(heads) != 1:
            continue
        package = REPO / heads[0]
        named = set(re.findall(r"`([\w]+\.py|[\w]+/)`", cells[2]))
        present = {p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
        present |= {p.name + "/" for p in package.iterdir() if (p / "__init__.py").exists()}
        named.discard("__init__.py")
        if named != present:
            problems.append(f"{heads[0]}: not named {sorted(present - named)}, "
                            f"named but absent {sorted(named - present)}")
    assert problems == []
