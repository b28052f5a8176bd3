"""The layers of libdm and the absence of import cycles, read from the
source with :mod:`ast` (see :mod:`support.modgraph`): imports at every
level count, and those under ``if TYPE_CHECKING:`` too (a cycle a type
checker needs is still a cycle a reader must follow).

The layers, bottom up: the binding and the package's private helpers
(``libdm._*``), ``libdm.dm``, ``libdm.thin``, then what is built on
them: the ``libdm`` front, the CLI, the engines (Docker's plugin, the
snapshotter, the monitor service) and the test harness.  A module
imports only from its own package or a lower layer; at the top, only the
CLI runs the engines, and nothing imports the CLI but the ``__main__``
entry points.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import modgraph

ROOT = Path(__file__).resolve().parent.parent / "libdm"

#: The packages that must have no cycle inside them.
ACYCLIC = (
    "libdm.cli",
    "libdm.dm",
    "libdm.docker",
    "libdm.snapshotter",
    "libdm.testing",
    "libdm.thin",
)

#: The layer of each part of the package (by its first name below libdm).
RANK = {"binding": 0, "dm": 1, "thin": 2, "top": 3}

#: What a part at the top may import of the other parts at the top.
TOP_ALLOWED = {
    "cli": {"libdm", "docker", "snapshotter", "service"},
    "docker": {"libdm"},
    "snapshotter": {"libdm"},
    "service": {"libdm"},
    "testing": {"libdm"},
    "libdm": set(),
}


def part(module: str) -> str:
    """``libdm.thin.pool`` -> ``thin``; ``libdm`` itself -> ``libdm``;
    ``libdm._lazy`` (and the binding) -> ``binding``."""
    names = module.split(".")
    if len(names) == 1:
        return "libdm"
    return "binding" if names[1].startswith("_") else names[1]


def rank(module: str) -> int:
    return RANK.get(part(module), RANK["top"])


def layering_violations(found: list[modgraph.Edge]) -> list[str]:
    """Each import that goes up a layer or across the top where it may not."""
    wrong = []
    for edge in found:
        source, target = part(edge.source), part(edge.target)
        if edge.source.endswith(".__main__") or source == target:
            continue  # an entry point may run anything; nothing imports it
        if edge.target.endswith(".__main__"):
            allowed = False
        elif rank(edge.target) < rank(edge.source):
            allowed = True
        elif rank(edge.target) > rank(edge.source):
            allowed = False
        else:
            allowed = target in TOP_ALLOWED.get(source, set())
        if not allowed:
            kind = " (TYPE_CHECKING)" if edge.typing_only else ""
            wrong.append(f"{edge.source}:{edge.line} imports {edge.target}{kind}")
    return wrong


def package_graph(found: list[modgraph.Edge]) -> dict[str, set[str]]:
    """The graph between the parts (one node a part)."""
    adjacency: dict[str, set[str]] = {}
    for edge in found:
        if edge.source.endswith(".__main__"):
            continue
        source, target = part(edge.source), part(edge.target)
        adjacency.setdefault(source, set())
        if source != target:
            adjacency[source].add(target)
    return adjacency


def describe(cycles: list[list[str]], found: list[modgraph.Edge]) -> str:
    """The cycles, each with the imports that make it."""
    lines = []
    for members in cycles:
        inside = set(members)
        lines.append("cycle: " + ", ".join(members))
        for edge in found:
            if edge.source in inside and edge.target in inside:
                kind = " (TYPE_CHECKING)" if edge.typing_only else ""
                lines.append(f"  {edge.source}:{edge.line} -> {edge.target}{kind}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def found() -> list[modgraph.Edge]:
    return modgraph.edges(ROOT, "libdm")


def test_the_graph_is_read_from_the_source(found):
    # Guard against a reader that sees nothing (and so no cycle).
    assert len(modgraph.module_names(ROOT, "libdm")) > 50
    pairs = {(e.source, e.target, e.typing_only) for e in found}
    assert ("libdm.thin.pool", "libdm.thin.store", False) in pairs
    assert ("libdm.dm._lib", "libdm._libdevmapper", False) in pairs
    assert any(e.typing_only for e in found)


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_import_cycle_in(found, package):
    adjacency = modgraph.within(modgraph.graph(found), package)
    cycles = modgraph.cycles(adjacency)
    assert not cycles, describe(cycles, found)


def test_no_import_cycle_between_packages(found):
    cycles = modgraph.cycles(package_graph(found))
    assert not cycles, describe([[f"part {p}" for p in c] for c in cycles], found)


def test_each_layer_imports_only_from_below(found):
    assert layering_violations(found) == []


def test_a_cycle_is_caught(tmp_path):
    # The checks can fail: a package whose modules import each other, one
    # of them only for typing, and a lower layer importing a higher one.
    (tmp_path / "cli").mkdir()
    (tmp_path / "dm").mkdir()
    (tmp_path / "thin").mkdir()
    for name in ("__init__", "cli/__init__", "dm/__init__", "thin/__init__"):
        (tmp_path / f"{name}.py").write_text("")
    (tmp_path / "cli" / "a.py").write_text("def f():\n    from libdm.cli import b\n")
    (tmp_path / "cli" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
    )
    (tmp_path / "dm" / "x.py").write_text("import libdm.thin.y\n")
    (tmp_path / "thin" / "y.py").write_text("from libdm.dm import x\n")
    made = modgraph.edges(tmp_path, "libdm")
    assert modgraph.cycles(modgraph.within(modgraph.graph(made), "libdm.cli")) == [
        ["libdm.cli.a", "libdm.cli.b"]
    ]
    assert modgraph.cycles(modgraph.graph(made, typing=False)) == [["libdm.dm.x", "libdm.thin.y"]]
    assert modgraph.cycles(package_graph(made)) == [["dm", "thin"]]
    assert layering_violations(made) == ["libdm.dm.x:1 imports libdm.thin.y"]


# -- the backing is asked what it can do, never which kind it is -----------------------

#: The backing classes, which only their own module may tell apart.
BACKING_CLASSES = frozenset({"LoopBacking", "LinearBacking", "AdoptedBacking"})
#: The stored spellings of a pool's kind (``PoolKind``'s values).
KIND_NAMES = frozenset({"loop", "block", "adopted"})
#: Where a kind may be told apart: the backings alone (their dispatch tables).
KIND_HOMES = frozenset({"thin/backing.py"})


def _named(node: ast.expr) -> str:
    """The last name of ``node`` (``pool.kind`` -> ``kind``), or ``""``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(node.slice.value)  # row["kind"]
    return ""


def _is_kind_constant(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in KIND_NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_is_kind_constant(elt) for elt in node.elts)
    # PoolKind.LOOP and the like.
    return isinstance(node, ast.Attribute) and _named(node.value) == "PoolKind"


def kind_tests(source: str) -> list[str]:
    """Each ``isinstance`` on a backing class and each comparison of a kind
    (with a string literal, or a ``PoolKind`` member), as ``line: text``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and _named(node.func) == "isinstance"
            and len(node.args) == 2
        ):
            classes = node.args[1]
            names = (
                {_named(e) for e in classes.elts}
                if isinstance(classes, ast.Tuple)
                else {_named(classes)}
            )
            if names & BACKING_CLASSES:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            about_kind = any("kind" in _named(op).lower() for op in operands)
            member = any(
                isinstance(op, ast.Attribute) and _named(op.value) == "PoolKind" for op in operands
            )
            if member or (about_kind and any(_is_kind_constant(op) for op in operands)):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_caller_asks_which_backing_it_holds():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        if where in KIND_HOMES:
            continue
        wrong += [f"libdm/{where}:{hit}" for hit in kind_tests(path.read_text())]
    assert wrong == [], "ask the backing what it can do instead:\n" + "\n".join(wrong)


def test_a_kind_test_is_caught():
    source = (
        "if isinstance(b, (backings.LoopBacking, X)): pass\n"
        "if isinstance(b, LinearBacking): pass\n"
        "if pool.kind == 'loop': pass\n"
        "if kind in ('block', 'adopted'): pass\n"
        "if self.kind != PoolKind.ADOPTED: pass\n"
        "if row['kind'] == 'block': pass\n"
        "if part == 'data' and entry.startswith('loop'): pass\n"
        "if isinstance(b, RecordedDevice) or name == 'loop': pass\n"
    )
    assert [hit.split(":")[0] for hit in kind_tests(source)] == ["1", "2", "3", "4", "5", "6"]


# -- typed records across the modules of libdm.thin ---------------------------------------

THIN = ROOT / "thin"

#: An annotation that hands a caller a bag of untyped values.
UNTYPED = re.compile(r"\b(?:dict|Dict|Mapping|MutableMapping)\[str, Any\]")


def untyped_aliases(trees: dict[str, ast.Module]) -> set[str]:
    """Names bound to an untyped mapping (``Row = dict[str, Any]``)."""
    names = set()
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.Assign) and UNTYPED.search(ast.unparse(node.value)):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.value is not None
                and UNTYPED.search(ast.unparse(node.value))
            ):
                names.add(node.target.id)
    return names


def functions(
    tree: ast.Module,
) -> Iterator[tuple[str, bool, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Each function and method: its dotted name in the module, whether
    it is public (its name and its classes' names have no leading ``_``;
    a dunder counts as public), and its node."""

    def public(name: str) -> bool:
        return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))

    def walk(body: list[ast.stmt], prefix: str, visible: bool) -> Iterator[Any]:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{prefix}{node.name}", visible and public(node.name), node
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, f"{prefix}{node.name}.", visible and public(node.name))

    yield from walk(tree.body, "", True)


def used_names(tree: ast.Module) -> set[str]:
    """The names a module reaches for in others: attributes and imports."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            out.update(alias.name for alias in node.names)
    return out


def untyped_signatures(package: Path) -> list[str]:
    """Each public function of the package's modules, and each private one
    another module uses, whose parameters or result are an untyped
    mapping: ``module.function: the annotation``."""
    trees = {
        path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(package.glob("*.py"))
    }
    aliases = untyped_aliases(trees)
    used = {module: used_names(tree) for module, tree in trees.items()}
    found = []
    for module, tree in trees.items():
        elsewhere = set().union(*(names for other, names in used.items() if other != module))
        for qualname, public, node in functions(tree):
            if not public and node.name not in elsewhere:
                continue
            args = node.args
            annotations = [
                a.annotation
                for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
                if a is not None and a.annotation is not None
            ]
            if node.returns is not None:
                annotations.append(node.returns)
            for annotation in annotations:
                text = ast.unparse(annotation)
                names = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
                if UNTYPED.search(text) or names & aliases:
                    found.append(f"{module}.{qualname}: {text}")
    return found


def untyped_fields(package: Path) -> list[str]:
    """Each annotated attribute of a public class of the package's modules
    (a record's field) whose type is an untyped mapping:
    ``module.Class.field: the annotation``."""
    found = []
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        aliases = untyped_aliases({path.stem: tree})
        for node in tree.body:
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    text = ast.unparse(item.annotation)
                    names = {n.id for n in ast.walk(item.annotation) if isinstance(n, ast.Name)}
                    if UNTYPED.search(text) or names & aliases:
                        found.append(f"{path.stem}.{node.name}.{item.target.id}: {text}")
    return found


def test_no_untyped_mapping_crosses_a_module_of_thin():
    # The backing's stored form included: it is read into typed fields
    # (libdm.thin.config.BackingFields), never handed on as a mapping.
    assert untyped_signatures(THIN) == []
    assert untyped_fields(THIN) == []


def test_an_untyped_field_is_caught(tmp_path):
    (tmp_path / "a.py").write_text(
        "from typing import Any\n"
        "class Config:\n"
        "    backing: Mapping[str, Any]\n"
        "    fine: Mapping[str, int]\n"
        "class _Local:\n"
        "    rows: dict[str, Any]\n"
    )
    assert untyped_fields(tmp_path) == ["a.Config.backing: Mapping[str, Any]"]


def test_an_untyped_signature_is_caught(tmp_path):
    (tmp_path / "a.py").write_text(
        "from typing import Any\n"
        "Row = dict[str, Any]\n"
        "def public(x: 'Mapping[str, Any]') -> None: ...\n"
        "def _shared() -> list[Row]: ...\n"
        "def _local(x: dict[str, Any]) -> None: ...\n"
        "class Store:\n"
        "    def rows(self) -> Row | None: ...\n"
        "    def fine(self) -> dict[str, int]: ...\n"
    )
    (tmp_path / "b.py").write_text("from a import _shared\n")
    assert untyped_signatures(tmp_path) == [
        "a.public: 'Mapping[str, Any]'",
        "a._shared: list[Row]",
        "a.Store.rows: Row | None",
    ]
