"""Write ``store-v1/state.db``: a pool's state store as libdm wrote it
before the store's log (schema 1, every change a SQLite transaction).

It was run once, with the ``Store`` of that release, and its output is
committed; ``tests/test_store_upgrade.py`` opens a copy of it with the
current code.  Running it again with the current code would write the
current format instead, so it refuses to unless the Store it imports
still says schema 1.

    python tests/data/make_store_v1.py

It also writes ``store-v1/expected.json``: every row, as that Store
returned it, for the test to compare against.
"""

import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from libdm.thin.store import SCHEMA_VERSION, Store  # noqa: E402

OUT = os.path.join(HERE, "store-v1")

CONFIG = {
    "block_size": 128,
    "low_water_mark": 16,
    "features": ["skip_block_zeroing"],
    "min_free_space": 10,
    "deferred_removal": True,
    "deferred_deletion": True,
    "base_device": None,
    "token": "0f3c9a1e",
    "data_file": "data",
    "metadata_file": "metadata",
    "file_inodes": {"data": 1234567, "metadata": 1234568},
    "made_directory": True,
}


def build(directory):
    store = Store(directory, create=True)
    store.init_pool("libdm-fixture", "LIBDM-POOL-0f3c9a1e", "loop", CONFIG)
    with store.transaction():
        for name, size, parent in (
            ("base", 2048 * 64, None),
            ("app", 2048 * 32, None),
            ("scratch", 2048 * 8, None),
        ):
            thin_id = store.allocate_id(2**24 - 1)
            store.add_device(name, thin_id, size, parent, active=True)
        store.set_transaction_id(3)
    # A lineage: base <- layer1 <- layer2, and a second snapshot of base.
    with store.transaction():
        base = store.device("base")
        for name, parent in (("layer1", "base"), ("layer2", "layer1"), ("clone", "base")):
            thin_id = store.allocate_id(2**24 - 1)
            store.add_device(name, thin_id, base["size"], parent, active=name != "clone")
        store.set_transaction_id(6)
    with store.transaction():
        store.set_active("app", False)
        store.set_size("app", 2048 * 48)
    # A delete that met EBUSY: the name freed, the id queued.
    with store.transaction():
        row = store.device("scratch")
        store.drop_device("scratch")
        store.queue_delete(row["thin_id"], "scratch")
    # A create whose id the kernel held (EEXIST): never handed out again.
    with store.transaction():
        store.mark_foreign(store.allocate_id(2**24 - 1))
    # Two created and deleted devices: their ids are free for reuse (the
    # intent below takes the lower one).
    with store.transaction():
        gone = [store.allocate_id(2**24 - 1), store.allocate_id(2**24 - 1)]
        store.add_device("gone", gone[0], 2048, None)
        store.add_device("gone2", gone[1], 2048, None)
        store.set_transaction_id(7)
    with store.transaction():
        for name, thin_id in zip(("gone", "gone2"), gone, strict=True):
            store.drop_device(name)
            store.release_id(thin_id)
        store.set_transaction_id(8)
    # A change in flight: a snapshot's intent, as a kill after it leaves it.
    with store.transaction():
        thin_id = store.allocate_id(2**24 - 1)
        store.add_intent(
            9,
            "create_snap",
            thin_id,
            "layer3",
            2048 * 64,
            "layer2",
            store.device("layer2")["thin_id"],
        )
    # A growth in flight.
    with store.transaction():
        new = dict(CONFIG, low_water_mark=32)
        store.set_growth_intent(
            {
                "operation": "set_low_water_mark",
                "old": CONFIG,
                "new": new,
                "tables": {
                    "libdm-fixture": ["0 131072 thin-pool 7:1 7:0 128 16 1 skip_block_zeroing"]
                },
            }
        )
    store.close()
    store = Store(directory)
    expected = {
        "schema_version": SCHEMA_VERSION,
        "pool": store.pool(),
        "transaction_id": store.transaction_id(),
        "devices": store.devices(),
        "active_devices": store.active_devices(),
        "children": {row["name"]: store.children(row["name"]) for row in store.devices()},
        "count_devices": store.count_devices(),
        "intents": store.intents(),
        "deferred_deletes": store.deferred_deletes(),
        "foreign_ids": store.foreign_ids(),
        "growth_intent": store.growth_intent(),
        "free_ids": [r[0] for r in store.db.execute("SELECT thin_id FROM free_ids ORDER BY 1")],
        "next_id": store._meta("next_id"),
    }
    store.close()
    return expected


def main():
    if SCHEMA_VERSION != 1:
        sys.exit(f"this writes the schema 1 store; the Store here is schema {SCHEMA_VERSION}")
    shutil.rmtree(OUT, ignore_errors=True)
    expected = build(OUT)
    assert sorted(os.listdir(OUT)) == ["state.db"], os.listdir(OUT)
    with open(os.path.join(OUT, "expected.json"), "w") as fh:
        json.dump(expected, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
