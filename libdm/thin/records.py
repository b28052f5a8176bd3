"""What the pool's state store holds, as typed, frozen records.

:class:`~libdm.thin.store.Store` returns these and takes them (or typed
values) for its changes; no plain row crosses out of it.  A size is a
:class:`~libdm.thin.units.Sectors` from the moment it is read, a kind a
:class:`~libdm.thin.config.PoolKind`, a configuration a
:class:`~libdm.thin.config.PoolConfig`, an operation an :class:`Op`.

* :class:`PoolRecord`: the pool's one row.
* :class:`DeviceRecord`: a thin device or snapshot.
* :class:`DeferredDelete`: a thin id whose delete met EBUSY, retried later.
* :class:`Intent`: a change of thin ids in flight (see :mod:`.journal`).
* :class:`GrowthIntent`: a growth in flight (see :mod:`.journal`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from libdm.thin.config import PoolConfig, PoolKind
from libdm.thin.errors import StateError
from libdm.thin.units import Sectors

__all__ = ["DeferredDelete", "DeviceRecord", "GrowthIntent", "Intent", "Op", "PoolRecord"]


@dataclass(frozen=True)
class PoolRecord:
    """The pool's row: what it is called, what it sits on, how it is set up,
    and the last transaction id committed to its metadata."""

    name: str
    uuid: str
    kind: PoolKind
    config: PoolConfig
    transaction_id: int


@dataclass(frozen=True)
class DeviceRecord:
    """A thin device as the store records it.

    Attributes:
        name: its name within the pool.
        thin_id: its id in the pool's metadata.
        size: its size.
        parent: the device it is a snapshot of (``None``: none, or the
            origin was deleted since).
        active: whether it should be live.
        created: when it was recorded (UTC, ``YYYY-MM-DDTHH:MM:SSZ``; empty
            for a record not read from the store).
    """

    name: str
    thin_id: int
    size: Sectors
    parent: str | None
    active: bool
    created: str = ""


@dataclass(frozen=True)
class DeferredDelete:
    """A thin id whose delete met EBUSY: its name is free already, the id is
    deleted by a later attempt.  ``queued``: when (UTC)."""

    thin_id: int
    name: str
    queued: str = ""


class Op(enum.Enum):
    """The changes the journal knows."""

    CREATE_THIN = "create_thin"
    CREATE_SNAP = "create_snap"
    DELETE = "delete"
    GROW = "grow"

    @property
    def creates(self) -> bool:
        return self in (Op.CREATE_THIN, Op.CREATE_SNAP)

    @property
    def crash_prefix(self) -> str:
        """The family of its crash points: ``create:...``, ``delete:...``, ``grow:...``."""
        if self.creates:
            return "create"
        return "delete" if self is Op.DELETE else "grow"


@dataclass(frozen=True)
class Intent:
    """A change of thin ids in flight, as the store records it before the
    kernel sees it.  ``parent`` and ``origin_id`` name a snapshot's origin."""

    op: Op
    txid: int
    thin_id: int
    name: str
    size: Sectors | None = None
    parent: str | None = None
    origin_id: int | None = None

    @classmethod
    def stored(
        cls,
        txid: int,
        op: str,
        thin_id: int,
        name: str,
        size: int | None,
        parent: str | None,
        origin_id: int | None,
    ) -> Intent:
        """The intent the store's columns hold.

        Raises:
            StateError: an operation this libdm does not know.
        """
        try:
            known = Op(op)
        except ValueError:
            known = Op.GROW
        if known is Op.GROW:  # a growth has a record of its own
            raise StateError(
                f"the journal holds an unknown operation {op!r} (transaction {txid})",
                "open",
                None,
            )
        return cls(
            known, txid, thin_id, name, None if size is None else Sectors(size), parent, origin_id
        )


@dataclass(frozen=True)
class GrowthIntent:
    """A growth in flight, as the store records it before the first step.

    Attributes:
        operation: the call (``resize``, ``extend``, ``refresh``,
            ``set_low_water_mark``).
        old: the pool's configuration before it.
        new: the configuration it brings.
        tables: the live tables (text lines) of the pool and its linear
            pieces before it, to roll back to.
    """

    operation: str
    old: PoolConfig
    new: PoolConfig
    tables: Mapping[str, tuple[str, ...]]

    op = Op.GROW

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> GrowthIntent:
        """Read a stored growth intent (its JSON object).

        Raises:
            StateError: a damaged record (the field is named).
        """
        where = "the growth intent in the pool state"
        for field in ("operation", "old", "new", "tables"):
            if field not in record:
                raise StateError(
                    f"{where} is damaged: its field {field!r} is missing", "open", None
                )
        tables = record["tables"]
        if not isinstance(tables, Mapping) or not all(
            isinstance(lines, list) and all(isinstance(line, str) for line in lines)
            for lines in tables.values()
        ):
            raise StateError(
                f"{where} is damaged: its field 'tables' is {tables!r}, not a map of "
                f"device names to table lines",
                "open",
                None,
            )
        return cls(
            str(record["operation"]),
            PoolConfig.from_record(record["old"], f"{where} (old)"),
            PoolConfig.from_record(record["new"], f"{where} (new)"),
            MappingProxyType({str(name): tuple(lines) for name, lines in tables.items()}),
        )

    def to_record(self) -> dict[str, object]:
        """The JSON object the store keeps."""
        return {
            "operation": self.operation,
            "old": self.old.to_record(),
            "new": self.new.to_record(),
            "tables": {name: list(lines) for name, lines in self.tables.items()},
        }
