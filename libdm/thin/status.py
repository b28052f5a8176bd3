"""Thin-pool and thin status lines, parsed into typed values.

Parse errors name the field position, what it should hold and what it
held.  A pool whose status is the bare word ``Fail`` or ``Error`` parses
to :class:`ThinPoolFailed`; a thin device's to :class:`ThinFailed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeAlias, TypeVar

from libdm.thin.units import DataBlocks, MetaBlocks, Sectors

__all__ = [
    "PoolStatus",
    "ThinFailed",
    "ThinPoolFailed",
    "ThinPoolStatus",
    "ThinStatus",
    "ThinTargetStatus",
    "parse_pool_status",
    "parse_thin_status",
]

MODES: tuple[str, ...] = ("rw", "ro", "out_of_data_space")
DISCARDS: tuple[str, ...] = ("discard_passdown", "no_discard_passdown", "ignore_discard")
NO_SPACE: tuple[str, ...] = ("error_if_no_space", "queue_if_no_space")


@dataclass(frozen=True)
class ThinPoolFailed:
    """A pool the kernel reports as ``Fail`` or ``Error``: it has stopped
    serving I/O; check and repair its metadata (thin_check, thin_repair)."""

    state: str

    #: Tells the two apart: ``if status.failed:`` narrows the type too.
    failed: ClassVar[Literal[True]] = True

    def __str__(self) -> str:
        return self.state


@dataclass(frozen=True)
class ThinPoolStatus:
    """A working pool's status line.

    Attributes:
        transaction_id: the userspace transaction id.
        used_meta, total_meta: ``MetaBlocks`` (4 KiB) of metadata.
        used_data, total_data: ``DataBlocks`` of data.
        held_root: the held metadata root's block, or ``None`` (``-``).
        mode: ``"rw"``, ``"ro"`` or ``"out_of_data_space"``.
        discard: ``"discard_passdown"``, ``"no_discard_passdown"`` or
            ``"ignore_discard"``.
        no_space: ``"error_if_no_space"`` or ``"queue_if_no_space"``.
        needs_check: the metadata must be checked (thin_check) before the
            pool can be changed again.
        meta_low_water: the metadata low water mark in ``MetaBlocks``, or
            ``None`` on kernels that do not report it.
    """

    transaction_id: int
    used_meta: MetaBlocks
    total_meta: MetaBlocks
    used_data: DataBlocks
    total_data: DataBlocks
    held_root: int | None
    mode: str
    discard: str
    no_space: str
    needs_check: bool
    meta_low_water: MetaBlocks | None = None

    failed: ClassVar[Literal[False]] = False

    @property
    def free_data(self) -> DataBlocks:
        """Data blocks not yet allocated."""
        return self.total_data - self.used_data

    @property
    def free_meta(self) -> MetaBlocks:
        """Metadata blocks free (the kernel's reserve counts as used)."""
        return self.total_meta - self.used_meta

    def __str__(self) -> str:
        parts = [
            str(self.transaction_id),
            f"{self.used_meta}/{self.total_meta}",
            f"{self.used_data}/{self.total_data}",
            "-" if self.held_root is None else str(self.held_root),
            self.mode,
            self.discard,
            self.no_space,
            "needs_check" if self.needs_check else "-",
        ]
        if self.meta_low_water is not None:
            parts.append(str(self.meta_low_water))
        return " ".join(parts)


#: What :func:`parse_pool_status` returns.
PoolStatus: TypeAlias = ThinPoolStatus | ThinPoolFailed

_U = TypeVar("_U", DataBlocks, MetaBlocks)


def _field(fields: Sequence[str], pos: int, what: str, text: str) -> str:
    try:
        return fields[pos]
    except IndexError:
        raise ValueError(
            f"thin-pool status {text!r}: field {pos + 1} ({what}) is missing"
        ) from None


def _number(value: str, pos: int, what: str, text: str, kind: str = "status") -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{kind} {text!r}: field {pos + 1} ({what}) is {value!r}, not a number")
    return int(value)


def _ratio(fields: Sequence[str], pos: int, what: str, text: str, unit: type[_U]) -> tuple[_U, _U]:
    value = _field(fields, pos, what, text)
    used, sep, total = value.partition("/")
    if not sep or not (used + total).isascii() or not used.isdigit() or not total.isdigit():
        raise ValueError(
            f"thin-pool status {text!r}: field {pos + 1} ({what}) is {value!r}, "
            f"not '<used>/<total>'"
        )
    return unit(int(used)), unit(int(total))


def _choice(fields: Sequence[str], pos: int, what: str, text: str, choices: Sequence[str]) -> str:
    value = _field(fields, pos, what, text)
    if value not in choices:
        raise ValueError(
            f"thin-pool status {text!r}: field {pos + 1} ({what}) is {value!r}, "
            f"expected one of {', '.join(choices)}"
        )
    return value


def parse_pool_status(text: str) -> PoolStatus:
    """Parse a thin-pool status line.

    Returns:
        :class:`ThinPoolStatus`, or :class:`ThinPoolFailed` for ``Fail`` /
        ``Error``.

    Raises:
        ValueError: naming the field that did not parse.
    """
    given: object = text
    if not isinstance(given, str):
        raise TypeError("thin-pool status must be a str")
    stripped = text.strip()
    if stripped in ("Fail", "Error"):
        return ThinPoolFailed(stripped)
    f = stripped.split()
    if len(f) > 9:
        raise ValueError(f"thin-pool status {text!r}: {len(f)} fields, at most 9 expected")
    tid = _number(
        _field(f, 0, "transaction id", text), 0, "transaction id", text, "thin-pool status"
    )
    used_meta, total_meta = _ratio(f, 1, "metadata used/total", text, MetaBlocks)
    used_data, total_data = _ratio(f, 2, "data used/total", text, DataBlocks)
    held = _field(f, 3, "held metadata root", text)
    held_root = (
        None if held == "-" else _number(held, 3, "held metadata root", text, "thin-pool status")
    )
    mode = _choice(f, 4, "mode", text, MODES)
    discard = _choice(f, 5, "discard mode", text, DISCARDS)
    no_space = _choice(f, 6, "no-space policy", text, NO_SPACE)
    needs_check = _choice(f, 7, "needs_check", text, ("needs_check", "-")) == "needs_check"
    meta_lwm = None
    if len(f) > 8:
        meta_lwm = MetaBlocks(
            _number(f[8], 8, "metadata low water mark", text, "thin-pool status")
        )
    return ThinPoolStatus(
        tid,
        used_meta,
        total_meta,
        used_data,
        total_data,
        held_root,
        mode,
        discard,
        no_space,
        needs_check,
        meta_lwm,
    )


@dataclass(frozen=True)
class ThinFailed:
    """A thin device whose status is ``Fail`` or ``Error`` (its pool failed)."""

    state: str

    failed: ClassVar[Literal[True]] = True

    def __str__(self) -> str:
        return self.state


@dataclass(frozen=True)
class ThinStatus:
    """A thin device's status.

    Attributes:
        mapped: ``Sectors`` with data allocated in the pool.
        highest_mapped: the highest mapped sector, or ``None`` (``-``) when
            nothing is mapped.
    """

    mapped: Sectors
    highest_mapped: Sectors | None

    failed: ClassVar[Literal[False]] = False

    def __str__(self) -> str:
        high = "-" if self.highest_mapped is None else str(self.highest_mapped)
        return f"{self.mapped} {high}"


#: What :func:`parse_thin_status` returns.
ThinTargetStatus: TypeAlias = ThinStatus | ThinFailed


def parse_thin_status(text: str) -> ThinTargetStatus:
    """Parse a thin target's status line.

    Returns:
        :class:`ThinStatus`, or :class:`ThinFailed` for ``Fail`` / ``Error``.

    Raises:
        ValueError: naming the field that did not parse.
    """
    given: object = text
    if not isinstance(given, str):
        raise TypeError("thin status must be a str")
    stripped = text.strip()
    if stripped in ("Fail", "Error"):
        return ThinFailed(stripped)
    f = stripped.split()
    if len(f) != 2:
        raise ValueError(
            f"thin status {text!r}: expected '<mapped sectors> <highest mapped sector>'"
        )
    mapped = _number(f[0], 0, "mapped sectors", text, "thin status")
    highest = (
        None if f[1] == "-" else _number(f[1], 1, "highest mapped sector", text, "thin status")
    )
    return ThinStatus(Sectors(mapped), None if highest is None else Sectors(highest))
