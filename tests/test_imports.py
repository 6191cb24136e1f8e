"""The import graph of ``src/herald`` has no cycle.

Every ``import`` of a Herald module is an edge, wherever it is written: at module
level, or inside a function (a lazy import still ties the two modules together:
each needs the other to work, and the order in which they load then depends on
which is called first).  Imports under ``if TYPE_CHECKING:`` are never executed and
only name types for annotations (``from __future__ import annotations`` everywhere):
they are kept in a separate graph and may close a cycle (``policy`` names ``Node`` in
its signatures while ``node`` builds the policy).  Such a cycle costs nothing at run
time; replacing it with a Protocol is a design choice, not a fix.

``from . import __version__`` (the package itself) is not an edge: Python imports a
package before any of its modules anyway.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "herald"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, *, type_checking: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement under ``tree`` and whether it is TYPE_CHECKING-only."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_checking
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), type_checking=True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), type_checking=type_checking)
        else:
            yield from _imports(node, type_checking=type_checking)


def _targets(importer: str, is_package: bool, node: ast.stmt, known: set[str]) -> Iterator[str]:
    """The Herald modules ``node`` (in module ``importer``) imports."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                yield alias.name
        return
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = importer.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        parent = ".".join(base + ([node.module] if node.module else []))
    else:
        parent = node.module or ""
    for alias in node.names:
        submodule = f"{parent}.{alias.name}"
        if submodule in known:
            yield submodule
        elif parent in known and parent != PACKAGE:
            yield parent


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(runtime edges, TYPE_CHECKING-only edges) between Herald modules."""
    found = modules()
    known = set(found)
    runtime: dict[str, set[str]] = {name: set() for name in found}
    typing_only: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        for node, type_checking in _imports(tree):
            for target in _targets(name, path.name == "__init__.py", node, known):
                if target != name:
                    (typing_only if type_checking else runtime)[name].add(target)
    return runtime, typing_only


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_herald_modules() -> None:
    runtime, typing_only = graphs()
    # The checker itself: known edges of each kind are found.
    assert "herald.node" in runtime["herald.commands"]
    assert "herald.transports.wsreader" in runtime["herald.transports.native"]
    assert any(typing_only.values())


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_runtime_imports_form_no_cycle() -> None:
    runtime, _ = graphs()
    assert cycles(runtime) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from .node import Node", {"herald.node"}),
        ("from . import node", {"herald.node"}),
        ("from . import __version__", set()),
        ("def f():\n    from .transports import native", {"herald.transports.native"}),
        ("import herald.node", {"herald.node"}),
    ],
)
def test_edges_of_one_statement(source: str, expected: set[str]) -> None:
    known = set(modules())
    tree = ast.parse(source)
    found = {
        target
        for node, type_checking in _imports(tree)
        if not type_checking
        for target in _targets("herald.commands", False, node, known)
    }
    assert found == expected
