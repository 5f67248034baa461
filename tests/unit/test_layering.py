"""The package's import graph: no circles between modules, and layers import one way.

``cluster -> workers -> kernels``; ``client`` stands alone (it may use only ``proto``). Every module
is parsed with ``ast`` (nothing is imported), and every import counts: module level, inside a
function, and under ``TYPE_CHECKING`` (a type-only circle is still a circle for a reader).
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root is the package `kvrelay`
NOT_PACKAGE = {"tests", "benchmarks", "deploy", "scripts", "build", "dev"}

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "proto": set(),
    "kernels": set(),
    "client": {"proto"},
    "workers": {"kernels"},
    "cluster": {"workers", "kernels", "proto", "client"},
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in NOT_PACKAGE or any(p.startswith(".") for p in parts):
            continue
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        names = list(parts[:-1]) if path.name == "__init__.py" else [*parts[:-1], path.stem]
        out[".".join(["kvrelay", *names])] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                named.add(sub if sub in modules else source)
    edges = set()
    for name in named:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            edges.add(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "kvrelay.workers.worker" in graph
    assert "kvrelay.cluster.controller.controller" in graph
    assert any(m.startswith("kvrelay.workers") for m in graph["kvrelay.cluster.controller.controller"])


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_layers_import_one_way() -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if _layer(module) in ALLOWED
        and _layer(target) != _layer(module)
        and _layer(target) in ALLOWED
        and _layer(target) not in ALLOWED[_layer(module)]
    )
    assert wrong == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
