"""The package's dependencies point one way (the folders are the layers: cli/ above eval/, integrations/,
demo/, viz and loading, above methods/, above core/ with adapters/, data/ and metrics/): no import from a
layer above, and no import cycles between vlmfix's modules, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import vlmfix

ROOT = Path(vlmfix.__file__).parent
#: the layers, lowest first: a module may import its own layer and those below, never one above
LAYERS = (
    ("vlmfix.core", "vlmfix.adapters", "vlmfix.data", "vlmfix.metrics"),
    ("vlmfix.methods",),
    ("vlmfix.eval", "vlmfix.viz", "vlmfix.loading", "vlmfix.integrations", "vlmfix.demo"),
    ("vlmfix.cli", "vlmfix.__main__"),
)


def layer_of(module: str) -> int | None:
    for k, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return k
    return None


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
    unplaced = sorted(name for name in graph if name != "vlmfix" and layer_of(name) is None)
    assert not unplaced, f"modules in no layer: {unplaced}"
    upward = sorted(f"{name} -> {e}" for name, edges in graph.items() if name != "vlmfix"
                    for e in edges if e != "vlmfix" and layer_of(e) > layer_of(name))
    assert not upward, f"imports from a layer above: {upward}"


def test_no_method_outside_its_module_is_named():
    """Only a method's own module (and the registry, which imports them) names a method's classes."""
    from vlmfix.methods import methods

    names = {e.config.__name__ for e in methods().values()} | {"VARRecord", "GIFTRecord", "PruneRecord",
                                                               "SinkShareRecord"}
    found = []
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        if name.startswith("vlmfix.methods"):
            continue
        tree = ast.parse(path.read_text())
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        found += [f"{name}: {x}" for x in sorted(used & names)]
    assert not found, f"method types named outside their module: {found}"


def test_the_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
