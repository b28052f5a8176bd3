"""Write ``store-v2/``: a pool's state store as libdm wrote it with the
log in front of SQLite (schema 2): ``state.db`` and a ``state.db-log``
holding changes not yet folded into it, as a process killed while it
had the pool open leaves them, with the torn end of a last write.

It was run once, with the ``Store`` of that release, and its output is
committed; ``tests/test_store_upgrade.py`` opens copies of it with the
current code.  Running it again with the current code would write the
current format instead, so it refuses to unless the Store it imports
still says schema 2.

    python tests/data/make_store_v2.py

It also writes ``store-v2/expected.json``: every row, as that Store read
it back (``state.db`` with the log replayed), and the log's records.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from libdm.thin import storelog  # noqa: E402
from libdm.thin.store import DB_NAME, LOG_NAME, SCHEMA_VERSION, Store  # noqa: E402

OUT = os.path.join(HERE, "store-v2")
MAX = 2**24 - 1

CONFIG = {
    "block_size": 128,
    "low_water_mark": 16,
    "features": ["skip_block_zeroing"],
    "min_free_space": 10,
    "deferred_removal": True,
    "deferred_deletion": True,
    "base_device": None,
    "token": "5d20b7c4",
    "data_file": "data",
    "metadata_file": "metadata",
    "file_inodes": {"data": 2234567, "metadata": 2234568},
    "made_directory": True,
}


def folded_part(directory):
    """What state.db holds: made, changed, closed (the log folded)."""
    store = Store(directory, create=True)
    store.init_pool("libdm-fixture2", "LIBDM-POOL-5d20b7c4", "loop", CONFIG)
    with store.transaction():
        for name, size in (("base", 2048 * 64), ("app", 2048 * 32), ("scratch", 2048 * 8)):
            store.add_device(name, store.allocate_id(MAX), size, None, active=True)
        store.set_transaction_id(3)
    with store.transaction():
        size = store.device("base")["size"]
        for name, parent in (("layer1", "base"), ("clone", "base")):
            store.add_device(name, store.allocate_id(MAX), size, parent, active=True)
        store.set_transaction_id(5)
    store.close()


# Run in a process of its own that ends without closing the store, as a
# killed one does: its changes stay in the log, unfolded.
UNFOLDED = """
import os, sys
sys.path.insert(0, {root!r})
from libdm.thin.store import Store
MAX = 2**24 - 1
store = Store({directory!r})
# A snapshot made: intent (durable), then outcome.
with store.transaction():
    thin_id = store.allocate_id(MAX)
    store.add_intent(6, "create_snap", thin_id, "layer2", 2048 * 64, "layer1",
                     store.device("layer1")["thin_id"])
with store.transaction(durable=False):
    store.add_device("layer2", thin_id, 2048 * 64, "layer1", active=True)
    store.set_transaction_id(6)
    store.drop_intent(6)
# Deactivated and resized.
with store.transaction():
    store.set_active("app", False)
with store.transaction():
    store.set_size("app", 2048 * 48)
# A delete done: the id back for reuse.
with store.transaction():
    store.add_intent(7, "delete", store.device("clone")["thin_id"], "clone")
with store.transaction():
    store.set_active("clone", False)
with store.transaction(durable=False):
    row = store.device("clone")
    store.drop_device("clone")
    store.release_id(row["thin_id"])
    store.set_transaction_id(7)
    store.drop_intent(7)
# A delete that met EBUSY: the name freed, the id queued.
with store.transaction():
    row = store.device("scratch")
    store.drop_device("scratch")
    store.queue_delete(row["thin_id"], "scratch")
# An id the kernel held (EEXIST): never handed out.
with store.transaction():
    store.mark_foreign(store.allocate_id(MAX))
# A change in flight: a create's intent, as a kill after it leaves it.
with store.transaction():
    store.add_intent(8, "create_thin", store.allocate_id(MAX), "pending", 2048 * 4)
os._exit(0)
"""


def unfolded_part(directory):
    code = UNFOLDED.format(root=ROOT, directory=directory)
    subprocess.run([sys.executable, "-c", code], check=True)


def tear_the_tail(directory):
    """Append the first half of one more record, as a power cut during
    its write leaves it (never synced: nothing relied on it)."""
    path = os.path.join(directory, LOG_NAME)
    with open(path, "rb") as fh:
        data = fh.read()
    records = list(storelog.decode(data[storelog.HEADER_SIZE :], None))
    last = records[-1][1].seq
    payload = json.dumps([["devices", "torn", [99, 2048, None, 0, "x"]]]).encode()
    record = storelog.encode(last + 1, payload)
    with open(path, "ab") as fh:
        fh.write(record[: len(record) // 2])


def read_back(directory):
    """Every row as this Store reads the store (a copy: the read folds it)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "state")
        shutil.copytree(directory, copy)
        store = Store(copy)
        try:
            return {
                "schema_version": SCHEMA_VERSION,
                "pool": store.pool(),
                "transaction_id": store.transaction_id(),
                "devices": store.devices(),
                "active_devices": store.active_devices(),
                "children": {r["name"]: store.children(r["name"]) for r in store.devices()},
                "count_devices": store.count_devices(),
                "intents": store.intents(),
                "deferred_deletes": store.deferred_deletes(),
                "foreign_ids": store.foreign_ids(),
                "growth_intent": store.growth_intent(),
                "free_ids": sorted(store._tables.rows["free_ids"]),
                "next_id": store._meta("next_id"),
            }
        finally:
            store.close()


def log_records(directory):
    with open(os.path.join(directory, LOG_NAME), "rb") as fh:
        data = fh.read()
    out = []
    for end, record in storelog.decode(data[storelog.HEADER_SIZE :], None):
        out.append({"seq": record.seq, "end": storelog.HEADER_SIZE + end})
    return {"records": out, "size": len(data)}


def main():
    if SCHEMA_VERSION != 2:
        sys.exit(f"this writes the schema 2 store; the Store here is schema {SCHEMA_VERSION}")
    shutil.rmtree(OUT, ignore_errors=True)
    folded_part(OUT)
    unfolded_part(OUT)
    tear_the_tail(OUT)
    # The killed process left SQLite's files beside the log.
    assert set(os.listdir(OUT)) <= {DB_NAME, LOG_NAME, DB_NAME + "-wal", DB_NAME + "-shm"}
    expected = read_back(OUT)
    expected["log"] = log_records(OUT)
    with open(os.path.join(OUT, "expected.json"), "w") as fh:
        json.dump(expected, fh, indent=1, sort_keys=True)
        fh.write("\n")


if __name__ == "__main__":
    main()
