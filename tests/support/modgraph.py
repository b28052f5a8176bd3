"""The import graph of a package, read from its source with :mod:`ast`
(nothing is imported): every ``import`` and ``from ... import`` at any
level (module, class, function), with those under ``if TYPE_CHECKING:``
marked apart, and the import cycles in it.

An import of ``a.b.c`` counts as an edge to ``a.b.c`` only, not to the
packages ``a`` and ``a.b`` that Python imports on the way: a package's
``__init__`` re-exporting its modules would otherwise make a cycle of
every module that imports from its own package.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line``; ``typing_only`` when
    the import sits under ``if TYPE_CHECKING:``."""

    source: str
    target: str
    line: int
    typing_only: bool


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (whose directory is ``root``): its
    dotted name mapped to its file.  A compiled module (``.so``, typed
    by a ``.pyi``) is a module too, with no imports of its own."""
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".pyi", ".so"):
            continue
        parts = list(path.relative_to(root).parts)
        parts[-1] = parts[-1].split(".")[0]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join([package, *parts])
        if path.suffix == ".py" or name not in names:
            names[name] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, typing_only: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement below ``tree``, and whether it is typing-only."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, typing_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), typing_only)
        else:
            yield from _imports(node, typing_only)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a ``from`` import's module stands for."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def edges(root: Path, package: str) -> list[Edge]:
    """Every import edge between the modules of ``package``."""
    modules = module_names(root, package)
    found: list[Edge] = []
    for name, path in modules.items():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node, typing_only in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # The nearest module that exists (``import a.b.C`` is a.b).
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                edge = Edge(name, target, node.lineno, typing_only)
                if target and target != name and edge not in found:
                    found.append(edge)
    return found


def graph(found: Iterable[Edge], *, typing: bool = True) -> dict[str, set[str]]:
    """The edges as adjacency sets; without ``typing``, only the imports
    that run."""
    adjacency: dict[str, set[str]] = {}
    for edge in found:
        if typing or not edge.typing_only:
            adjacency.setdefault(edge.source, set()).add(edge.target)
            adjacency.setdefault(edge.target, set())
    return adjacency


def cycles(adjacency: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each
    holds at least one cycle), sorted; Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in adjacency.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(adjacency):
        if node not in index:
            visit(node)
    return sorted(found)


def within(adjacency: Mapping[str, Iterable[str]], package: str) -> dict[str, set[str]]:
    """The part of the graph between the modules of ``package``."""

    def inside(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    return {
        source: {t for t in targets if inside(t)}
        for source, targets in adjacency.items()
        if inside(source)
    }
