"""Output helpers: JSON for programs, aligned columns and trees for people.

Nothing here touches device-mapper; every function takes plain values and
returns text, so the formatting is tested without a kernel.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Container, Iterable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from libdm.thin.units import format_size

if TYPE_CHECKING:
    from libdm.thin.units import Bytes

__all__ = [
    "JSON",
    "columns",
    "dumps",
    "pairs",
    "percent",
    "size_text",
    "to_jsonable",
    "tree",
]

#: A value ``json`` can write, as :func:`to_jsonable` returns it.
JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"

_Node = TypeVar("_Node")


def to_jsonable(value: object) -> JSON:
    """Turn library values into what ``json`` can write.

    Named tuples become objects, dataclasses too, unit ints (``Bytes``,
    ``Sectors``...) plain ints, tuples lists; the rest is left as it is.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "_asdict"):
        return {k: to_jsonable(v) for k, v in value._asdict().items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    return str(value)


def dumps(value: object) -> str:
    """Indented JSON text (sorted as given, not by key), ending in a newline."""
    return json.dumps(to_jsonable(value), indent=2) + "\n"


def columns(
    rows: Iterable[Iterable[object]],
    headers: Iterable[object] | None = None,
    right: Container[int] = (),
) -> str:
    """Rows of cells as aligned text, two spaces between columns.

    Args:
        rows: sequences of cells (turned into ``str``).
        headers: an optional first row.
        right: indexes of the columns to right-align (numbers, sizes).

    Returns:
        The lines joined by newlines, each without trailing spaces, plus a
        final newline; ``""`` for no rows and no headers.
    """
    table = [list(map(str, headers))] if headers else []
    table += [[str(cell) for cell in row] for row in rows]
    if not table:
        return ""
    widths = [
        max(len(row[i]) for row in table if i < len(row))
        for i in range(max(len(row) for row in table))
    ]
    lines = []
    for row in table:
        cells: list[str] = []
        for i, cell in enumerate(row):
            cells.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def pairs(items: Iterable[tuple[str, object]]) -> str:
    """``label: value`` lines with the values aligned, as ``dmsetup info``."""
    items = list(items)
    if not items:
        return ""
    width = max(len(label) for label, _ in items) + 1
    return "".join(f"{label + ':':<{width}} {value}".rstrip() + "\n" for label, value in items)


def tree(
    roots: Iterable[_Node],
    label: Callable[[_Node], str],
    children: Callable[[_Node], Iterable[_Node]],
) -> str:
    """Draw a forest with box-drawing lines, like ``dmsetup ls --tree``.

    Args:
        roots: the top nodes.
        label: ``label(node) -> str``.
        children: ``children(node) -> list of nodes``.

    Returns:
        The drawing, one node a line, with a final newline (``""`` for no
        roots).  A node met again below itself (a cycle) is drawn once more
        and not descended into.
    """
    lines: list[str] = []

    def walk(node: _Node, prefix: str, last: bool, top: bool, seen: frozenset[object]) -> None:
        if top:
            lines.append(label(node))
            inner = ""
        else:
            lines.append(prefix + ("└─" if last else "├─") + label(node))
            inner = prefix + ("  " if last else "│ ")
        key: object = id(node) if not isinstance(node, (str, int, tuple)) else node
        if key in seen:
            return
        kids = list(children(node))
        for i, kid in enumerate(kids):
            walk(kid, inner, i == len(kids) - 1, False, seen | {key})

    for root in roots:
        walk(root, "", True, True, frozenset())
    return "".join(line + "\n" for line in lines)


def size_text(value: Bytes | int | None) -> str:
    """A size for people (``format_size``), or ``-`` for none."""
    return "-" if value is None else format_size(value)


def percent(used: int, total: int) -> str:
    """``used`` of ``total`` as a percentage with one decimal."""
    return f"{100.0 * int(used) / int(total):.1f}%" if int(total) else "-"
