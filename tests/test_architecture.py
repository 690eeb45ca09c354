"""The engine's layering, read from the source with ``ast`` (issue #15).

* no import cycle among ``napari_unet`` modules (imports inside functions count: a lazy
  import is still a dependency);
* no module over 600 lines; no function over 80 lines outside the widgets' layout code;
* engine modules (everything outside ``_widgets``) import neither napari nor Qt;
* a prediction reads top-down: the inference and distributed packages never import the
  CLI, the demo, the pipeline or the widgets; single-process inference reaches the
  cluster code only through ``predict(scheduler=...)``, which the cluster never calls.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_unet"
GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "vispy")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> set[str]:
    """Every napari_unet module ``name`` imports (at any depth of the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(name, path).split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]] | None = None) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A package's
    ``__init__`` importing its own submodules counts: importing any of them runs it."""
    edges = GRAPH if graph is None else graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_the_real_graph():
    # guards against a checker that passes because it parses nothing
    assert len(MODULES) > 40
    assert "napari_unet.models.base" in GRAPH["napari_unet.models.unet"]


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    # pipeline imports predict only inside segment_image: a lazy import is an edge too
    assert "napari_unet.inference.predict" in GRAPH["napari_unet.pipeline"]


def test_no_import_cycle():
    assert _cycles() == []


def test_no_module_over_600_lines():
    long = {
        n: len(p.read_text(encoding="utf-8").splitlines())
        for n, p in MODULES.items()
        if len(p.read_text(encoding="utf-8").splitlines()) > MAX_MODULE_LINES
    }
    assert long == {}


def _layout_code(name: str, func: ast.AST) -> bool:
    """Widgets' layout code: ``__init__`` / ``_build*`` / ``_layout*`` of a widget module."""
    return ".\u005fwidgets." in f".{name}." and getattr(func, "name", "").startswith(
        ("__init__", "_build", "_layout")
    )


def test_no_function_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and not _layout_code(name, node):
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert long == []


@pytest.mark.parametrize("name", [n for n in MODULES if not n.startswith("napari_unet._widgets")])
def test_engine_modules_import_neither_napari_nor_qt(name):
    assert not (_third_party(MODULES[name]) & set(GUI)), name


def test_inference_reads_top_down():
    upper = ("napari_unet.cli", "napari_unet.demo", "napari_unet.pipeline", "napari_unet._widgets")
    lower = [
        n for n in MODULES if n.startswith(("napari_unet.inference", "napari_unet.distributed"))
    ]
    assert lower, "the inference and distributed packages exist"
    bad = {n: sorted(d for d in GRAPH[n] if d.startswith(upper)) for n in lower}
    assert {n: d for n, d in bad.items() if d} == {}
    # the single-process path never calls into the cluster code, except the one hand-off
    # of ``predict(scheduler=...)``; the cluster code never calls the public predict back
    inference = [n for n in MODULES if n.startswith("napari_unet.inference")]
    into_cluster = {
        (n, d) for n in inference for d in GRAPH[n] if d.startswith("napari_unet.distributed")
    }
    assert {n for n, _ in into_cluster} <= {"napari_unet.inference.predict"}
    cluster = [n for n in MODULES if n.startswith("napari_unet.distributed")]
    assert not any("napari_unet.inference.predict" in GRAPH[n] for n in cluster)
