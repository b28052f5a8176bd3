"""containerd's filter syntax, for List.

A request carries a list of filters; a snapshot is listed when any of them
matches.  A filter is selectors joined by ``,``, all of which must match.
A selector is a field path (``name``, ``parent``, ``kind``,
``labels.<key>``; a part may be quoted, ``labels."a.b"``), alone (the
field is present) or followed by ``==``, ``!=`` or ``~=`` (a regular
expression) and a value, quoted or bare.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

__all__ = ["FieldLookup", "FilterError", "Matcher", "parse_filters"]

#: ``fields(path)``: the value of the field at ``path`` (``["labels",
#: "a.b"]``) and whether the snapshot has that field.
FieldLookup = Callable[[Sequence[str]], tuple[str, bool]]
#: ``match(fields)``: whether a snapshot, seen through ``fields``, is listed.
Matcher = Callable[[FieldLookup], bool]


class FilterError(ValueError):
    """A filter that does not parse; the message quotes it."""


class _Selector(NamedTuple):
    """One selector: a field path, then, unless it tests presence alone,
    an operator and the value (a compiled expression for ``~=``)."""

    path: list[str]
    op: str | None
    value: str | None
    pattern: re.Pattern[str] | None


_BARE_FIELD = re.compile(r"[A-Za-z0-9_\-]+")
_BARE_VALUE = re.compile(r"[^,\s\"'/]+")


def _quoted(text: str, i: int) -> tuple[str, int]:
    quote = text[i]
    out = []
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
            i += 2
            continue
        if c == quote:
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise FilterError(f"unterminated quote in filter {text!r}")


def _selector(text: str, i: int) -> tuple[_Selector, int]:
    path = []
    while True:
        if i < len(text) and text[i] in "\"'":
            part, i = _quoted(text, i)
        else:
            m = _BARE_FIELD.match(text, i)
            if not m:
                raise FilterError(f"expected a field name at {i} in filter {text!r}")
            part, i = m.group(0), m.end()
        path.append(part)
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        break
    while i < len(text) and text[i].isspace():
        i += 1
    op: str | None = None
    value: str | None = None
    pattern: re.Pattern[str] | None = None
    if text.startswith(("==", "!=", "~="), i):
        op = text[i : i + 2]
        i += 2
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] in "\"'/":
            value, i = _quoted(text, i)
        else:
            m = _BARE_VALUE.match(text, i)
            if not m:
                raise FilterError(f"expected a value at {i} in filter {text!r}")
            value, i = m.group(0), m.end()
        if op == "~=":
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise FilterError(f"bad regular expression in filter {text!r}: {exc}") from None
    while i < len(text) and text[i].isspace():
        i += 1
    return _Selector(path, op, value, pattern), i


def _parse_one(text: str) -> list[_Selector]:
    selectors = []
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        sel, i = _selector(text, i)
        selectors.append(sel)
        if i == len(text):
            return selectors
        if text[i] != ",":
            raise FilterError(f"unexpected {text[i]!r} at {i} in filter {text!r}")
        i += 1


def parse_filters(filters: Iterable[str]) -> Matcher:
    """A predicate ``match(fields)`` for a list of filter strings, where
    ``fields(path)`` gives ``(value, present)``.  No filters (or only empty
    ones) match everything.

    Raises:
        FilterError: a filter does not parse.
    """
    parsed = [_parse_one(f) for f in filters if f.strip()]
    if not parsed:
        return lambda fields: True

    def matches(selectors: list[_Selector], fields: FieldLookup) -> bool:
        for path, op, value, pattern in selectors:
            got, present = fields(path)
            if op is None:
                if not present:
                    return False
            elif op == "==":
                if not present or got != value:
                    return False
            elif op == "!=":
                if present and got == value:
                    return False
            elif not present or pattern is None or not pattern.search(got):
                return False
        return True

    return lambda fields: any(matches(s, fields) for s in parsed)
