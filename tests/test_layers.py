"""The package's dependencies point one way (CLI above runner above methods above core): no import
cycles between vlmfix's modules, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import vlmfix

ROOT = Path(vlmfix.__file__).parent
CORE = ("vlmfix.core.state", "vlmfix.core.eager", "vlmfix.core.sinks", "vlmfix.core.words", "vlmfix.adapters", "vlmfix.metrics")
ABOVE_METHODS = ("vlmfix.core.attach", "vlmfix.core.attention", "vlmfix.eval.runner", "vlmfix.cli.main", "vlmfix.cli.eval", "vlmfix.demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the vlmfix modules it imports anywhere in its body (TYPE_CHECKING blocks and a package
    importing its own submodules left out)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges |= {t for t in targets if t in paths and t != name and not t.startswith(name + ".")}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_point_one_way():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith(CORE):
            assert not {e for e in edges if e.startswith("vlmfix.methods")}, f"{name} (core) imports methods"
        if name.startswith("vlmfix.methods"):
            assert not {e for e in edges if e.startswith(ABOVE_METHODS)}, f"{name} imports a layer above methods"


def test_the_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
