"""A state store on its own (no kernel, no pool device): the settings a
loop pool records, and a store made with them, for the tests of the store
itself; and the store's records built from plain rows (a fixture's JSON,
what sqlite3 reads), to compare with what the store returns."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from libdm.thin.config import PoolConfig, PoolKind
from libdm.thin.records import DeferredDelete, DeviceRecord, GrowthIntent, Intent, Op, PoolRecord
from libdm.thin.store import Store
from libdm.thin.units import Sectors

#: The configuration a loop pool records (the fields the store requires).
CONFIG: dict[str, Any] = {
    "block_size": 128,
    "low_water_mark": 0,
    "features": [],
    "min_free_space": 10,
    "deferred_removal": True,
    "deferred_deletion": True,
    "token": "t",
}

#: The largest thin id the kernel takes (24 bits).
MAX_THIN_ID = 2**24 - 1


def config(**changes: Any) -> PoolConfig:
    """:data:`CONFIG` with ``changes`` (stored fields), as a ``PoolConfig``."""
    return PoolConfig.from_record({**CONFIG, **changes})


def made(directory: str | os.PathLike[str], record: dict[str, Any] | None = None) -> Store:
    """A new store in ``directory`` holding a loop pool ``p`` with the
    stored configuration ``record`` (default :data:`CONFIG`); the caller
    closes it."""
    store = Store(directory, create=True)
    store.init_pool("p", "LIBDM-POOL-x", PoolKind.LOOP, PoolConfig.from_record(record or CONFIG))
    return store


def intent(
    txid: int,
    op: str,
    thin_id: int,
    name: str,
    size: int | None = None,
    parent: str | None = None,
    origin_id: int | None = None,
) -> Intent:
    """An intent as the journal writes it (``op`` by its stored name)."""
    return Intent(
        Op(op), txid, thin_id, name, None if size is None else Sectors(size), parent, origin_id
    )


# -- records from plain rows -------------------------------------------------------------


def device_record(row: Mapping[str, Any]) -> DeviceRecord:
    return DeviceRecord(
        row["name"],
        row["thin_id"],
        Sectors(row["size"]),
        row["parent"],
        bool(row["active"]),
        row.get("created", ""),
    )


def intent_record(row: Mapping[str, Any]) -> Intent:
    return intent(
        row["txid"],
        row["op"],
        row["thin_id"],
        row["name"],
        row["size"],
        row["parent"],
        row["origin_id"],
    )


def deferred_record(row: Mapping[str, Any]) -> DeferredDelete:
    return DeferredDelete(row["thin_id"], row["name"], row.get("queued", ""))


def pool_record(row: Mapping[str, Any]) -> PoolRecord:
    return PoolRecord(
        row["name"],
        row["uuid"],
        PoolKind(row["kind"]),
        PoolConfig.from_record(row["config"]),
        row["transaction_id"],
    )


def growth_record(row: Mapping[str, Any] | None) -> GrowthIntent | None:
    return None if row is None else GrowthIntent.from_record(row)
