"""A state store on its own (no kernel, no pool device): the settings a
loop pool records, and a store made with them, for the tests of the store
itself."""

from __future__ import annotations

import os
from typing import Any

from libdm.thin.store import Store

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


def made(directory: str | os.PathLike[str], config: dict[str, Any] | None = None) -> Store:
    """A new store in ``directory`` holding a loop pool ``p`` with
    ``config`` (default :data:`CONFIG`); the caller closes it."""
    store = Store(directory, create=True)
    store.init_pool("p", "LIBDM-POOL-x", "loop", CONFIG if config is None else config)
    return store
