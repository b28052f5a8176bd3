"""The pool's parts that need no kernel: the typed configuration and its
store record, the growth intent's record, the journal's operations, and
the lock's wait (no kernel)."""

import fcntl
import json
import os
import sqlite3

import pytest
from support.store import made

import libdm
from libdm.thin.config import PoolConfig, PoolKind
from libdm.thin.journal import GrowthIntent, Intent, Op
from libdm.thin.lock import PoolLock
from libdm.thin.store import Store

# A record as today's create_loop writes it (keys and JSON types).
LOOP_RECORD = {
    "block_size": 128,
    "low_water_mark": 0,
    "features": ["skip_block_zeroing"],
    "min_free_space": 10,
    "deferred_removal": True,
    "deferred_deletion": True,
    "base_device": None,
    "token": "0123456789abcdef0123456789abcdef",
    "data_size": 64 << 20,
    "metadata_size": 2 << 20,
    "data_file": "data",
    "metadata_file": "metadata",
    "file_inodes": {"data": 12, "metadata": 13},
    "made_directory": True,
}


def test_a_stored_record_round_trips_unchanged():
    record = dict(
        LOOP_RECORD,
        base_size=1 << 30,
        discard_on_delete=False,
        xfs_nospace_max_retries=-1,
        repair={"damaged": "metadata.damaged-20260101T000000Z"},
        from_a_newer_libdm={"kept": [1, 2]},
    )
    config = PoolConfig.from_record(json.loads(json.dumps(record)))
    assert config.to_record() == record
    assert config.block_size == libdm.Sectors(128)
    assert config.low_water_mark == libdm.DataBlocks(0)
    assert config.features == frozenset({"skip_block_zeroing"})
    assert config.base_size == libdm.Bytes(1 << 30)
    assert config.repair == "metadata.damaged-20260101T000000Z"
    assert config.data_size == libdm.Bytes(64 << 20)
    assert config.extra == {"from_a_newer_libdm": {"kept": [1, 2]}}


def test_optional_fields_absent_in_old_stores_read_as_none():
    record = {k: v for k, v in LOOP_RECORD.items() if k not in ("made_directory", "file_inodes")}
    config = PoolConfig.from_record(record)
    assert config.made_directory is None and config.base_size is None
    assert "file_inodes" not in config.to_record()
    assert config.to_record() == record


def test_but_applies_typed_changes_and_none_clears():
    config = PoolConfig.from_record(LOOP_RECORD)
    changed = config.but(base_device="base", data_size=libdm.Bytes(128 << 20), repair="m.old")
    assert changed.base_device == "base" and changed.data_size == libdm.Bytes(128 << 20)
    assert changed.repair == "m.old"
    # Stored as before: the backing's size among its fields, a plain number.
    record = changed.to_record()
    assert record["data_size"] == 128 << 20 and type(record["data_size"]) is int
    assert record["repair"] == {"damaged": "m.old"}
    cleared = changed.but(base_device=None, repair=None)
    assert cleared.base_device is None and "repair" not in cleared.to_record()
    assert config.base_device is None  # frozen: the original is untouched
    assert config.but(file_inodes={"data": 1}).backing.file_inodes == {"data": 1}


def test_but_refuses_a_value_of_the_wrong_type_by_name():
    config = PoolConfig.from_record(LOOP_RECORD)
    with pytest.raises(libdm.StateError, match="'deferred_removal' is 1, not true or false"):
        config.but(deferred_removal=1)  # type: ignore[typeddict-item]


def test_with_backing_changes_only_the_backings_fields():
    config = PoolConfig.from_record(LOOP_RECORD)
    moved = config.with_backing(data_file="data.new")
    assert moved.backing.data_file == "data.new" and moved.token == config.token
    assert moved.to_record() == dict(LOOP_RECORD, data_file="data.new")
    with pytest.raises(ValueError, match="not fields of a pool's backing: token"):
        config.with_backing(token="x")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "field, value, said",
    [
        ("block_size", "128", "'block_size' is '128', not an integer >= 1"),
        ("block_size", True, "'block_size' is True"),
        ("low_water_mark", -1, "'low_water_mark' is -1, not an integer >= 0"),
        ("features", "skip_block_zeroing", "'features' is 'skip_block_zeroing', not a list"),
        ("min_free_space", None, "'min_free_space' is None, not a number"),
        ("deferred_removal", 1, "'deferred_removal' is 1, not true or false"),
        ("token", 7, "'token' is 7, not a string"),
        ("base_size", "10G", "'base_size' is '10G', not an integer"),
        ("repair", "metadata.old", "'repair' is 'metadata.old'"),
    ],
)
def test_a_damaged_field_is_named(field, value, said):
    with pytest.raises(libdm.StateError) as caught:
        PoolConfig.from_record(dict(LOOP_RECORD, **{field: value}), "the pool state in x.db")
    text = str(caught.value)
    assert "the pool state in x.db is damaged" in text and said in text


@pytest.mark.parametrize("field", ["block_size", "token", "deferred_deletion"])
def test_a_missing_field_is_named(field):
    record = {k: v for k, v in LOOP_RECORD.items() if k != field}
    with pytest.raises(libdm.StateError, match=f"field '{field}' is missing"):
        PoolConfig.from_record(record)


def test_a_config_that_is_not_an_object_is_refused():
    with pytest.raises(libdm.StateError, match="not a JSON object"):
        PoolConfig.from_record([1, 2])


def test_pool_kind_equals_its_stored_string_and_refuses_others():
    assert PoolKind.parse("loop") == "loop" and f"{PoolKind.BLOCK}" == "block"
    with pytest.raises(libdm.StateError, match="'kind' is 'tape', not a pool kind"):
        PoolKind.parse("tape")


def test_a_growth_intent_round_trips_with_typed_configs():
    old = PoolConfig.from_record(LOOP_RECORD)
    new = old.but(data_size=libdm.Bytes(128 << 20), low_water_mark=libdm.DataBlocks(16))
    intent = GrowthIntent("resize", old, new, {"pool": ("0 131072 thin-pool 7:1 7:0 128 0 0",)})
    back = GrowthIntent.from_record(json.loads(json.dumps(intent.to_record())))
    assert back == intent and back.op is Op.GROW
    assert back.new.low_water_mark == libdm.DataBlocks(16)


def test_a_damaged_growth_intent_is_named():
    record = GrowthIntent(
        "refresh", PoolConfig.from_record(LOOP_RECORD), PoolConfig.from_record(LOOP_RECORD), {}
    ).to_record()
    record["new"]["block_size"] = "big"
    with pytest.raises(libdm.StateError, match=r"growth intent .* \(new\) is damaged.*block_size"):
        GrowthIntent.from_record(record)
    del record["tables"]
    with pytest.raises(libdm.StateError, match="'tables' is missing"):
        GrowthIntent.from_record(record)


def test_an_intent_round_trips_through_the_store_and_an_unknown_op_is_refused(tmp_path):
    intent = Intent(Op.CREATE_SNAP, 4, 9, "snap", libdm.Sectors(2048), "vol", 3)
    store = made(tmp_path / "state")
    try:
        with store.transaction():
            store.add_intent(intent)
        assert store.intents() == [intent]
        assert type(store.intents()[0].size) is libdm.Sectors
    finally:
        store.close()
    # As SQLite holds it (a witness beside the store).
    db = sqlite3.connect(tmp_path / "state" / "state.db")
    try:
        row = db.execute("SELECT * FROM intents").fetchone()
        assert row == (4, "create_snap", 9, "snap", 2048, "vol", 3)
        for op in ("grow", "format"):
            with db:
                db.execute("UPDATE intents SET op = ?", (op,))
            store = Store(tmp_path / "state")
            try:
                with pytest.raises(libdm.StateError, match=f"unknown operation '{op}'"):
                    store.intents()
            finally:
                store.close()
    finally:
        db.close()


def test_the_lock_waits_then_names_the_lock_file(tmp_path):
    path = str(tmp_path / "lock")
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    lock = PoolLock(os.open(path, os.O_RDWR), path)
    try:
        with (
            pytest.raises(libdm.PoolLockedError, match=f"for more than 0.05 s \\(lock {path}\\)"),
            lock.held("create_thin", "p", 0.05, lambda: None),
        ):
            pass
        fcntl.flock(holder, fcntl.LOCK_UN)
        seen = []
        with (
            lock.held("create_thin", "p", 0.05, lambda: seen.append(1)),
            lock.held("create_thin", "p", 0.05, lambda: seen.append(2)),
        ):
            pass  # re-entrant: taken once
        assert seen == [1]
    finally:
        lock.close()
        os.close(holder)
    with (
        pytest.raises(libdm.RefusedError, match="pool 'p' is closed"),
        lock.held("create_thin", "p", 1.0, lambda: None),
    ):
        pass


def test_a_pool_takes_a_new_lock_timeout(tmp_path):
    # Loaded from a store alone (no device is touched); a change waits for
    # the lock as long as the pool's lock_timeout says at that moment.
    directory = tmp_path / "state"
    made(directory).close()
    pool = libdm.Pool.load(directory, lock_timeout=30.0)
    holder = os.open(directory / "lock", os.O_RDWR)
    try:
        pool.lock_timeout = 0.05
        assert pool.lock_timeout == 0.05
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(libdm.PoolLockedError, match=r"for more than 0\.05 s"):
            pool.configure(base_size="1G")
        fcntl.flock(holder, fcntl.LOCK_UN)
        pool.configure(base_size="1G")
        assert pool.base_size == libdm.Bytes(1 << 30)
    finally:
        os.close(holder)
        pool.close()
