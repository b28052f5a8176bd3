"""The state store on its own (no kernel): its log, crashes between a
change and the close, torn tails, several stores open at once, folding."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

import libdm
from libdm.thin import store as store_module
from libdm.thin import storelog
from libdm.thin.store import DB_NAME, LOG_NAME, Store

CONFIG: dict[str, Any] = {
    "block_size": 128,
    "low_water_mark": 0,
    "features": [],
    "min_free_space": 10,
    "deferred_removal": True,
    "deferred_deletion": True,
    "token": "t",
}
MAX = 2**24 - 1


def made(directory: Path) -> Store:
    store = Store(directory, create=True)
    store.init_pool("p", "LIBDM-POOL-x", "loop", CONFIG)
    return store


def die(store: Store) -> None:
    """Let go of everything as a killed process does: no fold."""
    assert store._log is not None
    store._log.close()
    store._log = None
    store.db.close()
    store.statedir.close()


def everything(store: Store) -> dict[str, Any]:
    return {
        "pool": store.pool(),
        "devices": store.devices(),
        "active": store.active_devices(),
        "intents": store.intents(),
        "deferred": store.deferred_deletes(),
        "foreign": store.foreign_ids(),
        "growth": store.growth_intent(),
        "count": store.count_devices(),
        "children": {row["name"]: store.children(row["name"]) for row in store.devices()},
    }


def some_changes(store: Store) -> None:
    with store.transaction():
        for name in ("a", "b", "c"):
            thin_id = store.allocate_id(MAX)
            assert thin_id is not None
            store.add_device(name, thin_id, 2048, None, active=True)
        store.set_transaction_id(3)
    with store.transaction(durable=False):
        thin_id = store.allocate_id(MAX)
        assert thin_id is not None
        store.add_device("a-snap", thin_id, 2048, "a")
        store.set_transaction_id(4)
    with store.transaction():
        store.set_active("b", False)
        store.set_size("c", 4096)
        store.queue_delete(9, "old")
        store.mark_foreign(7)
        store.add_intent(5, "create_thin", 8, "pending", 2048)
        store.set_growth_intent({"operation": "refresh", "old": {}, "new": {}, "tables": {}})


def test_changes_survive_a_close_and_the_log_goes(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    some_changes(store)
    before = everything(store)
    assert (directory / LOG_NAME).exists()
    store.close()
    assert sorted(os.listdir(directory)) == [DB_NAME]  # folded into state.db
    again = Store(directory)
    try:
        assert everything(again) == before
    finally:
        again.close()
    # state.db alone holds it all, readable with sqlite3.
    db = sqlite3.connect(directory / DB_NAME)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM devices ORDER BY name")]
        assert names == ["a", "a-snap", "b", "c"]
        assert db.execute("SELECT transaction_id FROM pool").fetchone()[0] == 4
    finally:
        db.close()


def test_rows_are_what_the_sqlite_store_returned(tmp_path: Path) -> None:
    store = made(tmp_path / "state")
    try:
        some_changes(store)
        row = store.device("a-snap")
        assert row is not None
        assert set(row) == {"name", "thin_id", "size", "parent", "active", "created"}
        assert (row["thin_id"], row["size"], row["parent"], row["active"]) == (3, 2048, "a", 0)
        assert store.device_by_id(3) == row
        assert store.children("a") == ["a-snap"]
        assert [r["name"] for r in store.active_devices()] == ["a", "c"]
        assert store.intents() == [
            {
                "txid": 5,
                "op": "create_thin",
                "thin_id": 8,
                "name": "pending",
                "size": 2048,
                "parent": None,
                "origin_id": None,
            }
        ]
        assert [(r["thin_id"], r["name"]) for r in store.deferred_deletes()] == [(9, "old")]
        assert store.id_in_use(8) and store.id_in_use(9) and store.id_in_use(7)
        assert not store.id_in_use(6)
        # The next id skips every id in use (devices 0-3, foreign 7,
        # the intent's 8, the deferred 9).
        with store.transaction():
            assert [store.allocate_id(MAX) for _ in range(4)] == [4, 5, 6, 10]
            store.release_id(5)
            assert store.allocate_id(MAX) == 5
        with store.transaction():
            store.drop_device("a")  # its snapshot becomes a root
        snap = store.device("a-snap")
        assert snap is not None and snap["parent"] is None
        with pytest.raises(sqlite3.IntegrityError):
            store.add_device("b", 99, 1, None)
        with pytest.raises(sqlite3.IntegrityError):
            store.add_device("new", 1, 1, None)  # b's thin id
    finally:
        store.close()


def test_a_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    some_changes(store)
    before = everything(store)
    with pytest.raises(RuntimeError), store.transaction():
        store.drop_device("a")
        store.set_transaction_id(40)
        store.allocate_id(MAX)
        raise RuntimeError("stop")
    assert everything(store) == before
    store.close()
    again = Store(directory)
    try:
        assert everything(again) == before
    finally:
        again.close()


# The child imports the libdm under test (the installed wheel in the
# README's run), not the source tree.
KILLED = """
import os
from libdm.thin.store import Store
store = Store({directory!r})
with store.transaction():
    store.add_device("x", 50, 2048, None, active=True)
    store.set_transaction_id(10)
with store.transaction(durable=False):
    store.add_device("y", 51, 2048, "x")
os._exit(9)  # killed: no close, no fold
"""


def test_a_killed_process_leaves_a_log_that_the_next_open_replays(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    code = KILLED.format(directory=str(directory))
    assert subprocess.run([sys.executable, "-P", "-c", code]).returncode == 9
    assert (directory / LOG_NAME).exists()
    store = Store(directory)
    try:
        assert [r["name"] for r in store.devices()] == ["x", "y"]
        assert store.transaction_id() == 10
        assert store.children("x") == ["y"]
    finally:
        store.close()
    assert sorted(os.listdir(directory)) == [DB_NAME]


def test_a_torn_tail_is_ignored_and_written_over(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("kept", 1, 2048, None)
    with store.transaction():
        store.add_device("torn", 2, 2048, None)
    log = directory / LOG_NAME
    size = log.stat().st_size
    # A copy of the log as a power cut may leave it: the last record cut short.
    torn = log.read_bytes()[: size - 7]
    die(store)
    log.write_bytes(torn)
    again = Store(directory)
    try:
        assert [r["name"] for r in again.devices()] == ["kept"]
        with again.transaction():
            again.add_device("after", 3, 2048, None)
        assert [r["name"] for r in again.devices()] == ["after", "kept"]
    finally:
        again.close()
    final = Store(directory)
    try:
        assert [r["name"] for r in final.devices()] == ["after", "kept"]
    finally:
        final.close()


def test_garbage_after_the_last_record_is_not_a_record(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("kept", 1, 2048, None)
    log = directory / LOG_NAME
    with open(log, "ab") as fh:
        fh.write(os.urandom(300))
    other = Store(directory)  # reads up to the garbage
    try:
        assert [r["name"] for r in other.devices()] == ["kept"]
        with store.transaction():  # cuts the garbage off, then appends
            store.add_device("next", 2, 2048, None)
        assert [r["name"] for r in other.devices()] == ["kept", "next"]
    finally:
        other.close()
        store.close()


def test_two_stores_see_each_others_changes(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    first = made(directory)
    second = Store(directory)  # its own open file: as another process
    try:
        with first.transaction():
            thin_id = first.allocate_id(MAX)
            assert thin_id is not None
            first.add_device("one", thin_id, 2048, None)
        assert [r["name"] for r in second.devices()] == ["one"]
        with second.transaction():
            thin_id = second.allocate_id(MAX)
            assert thin_id == 1  # not the first's id
            second.add_device("two", thin_id, 2048, None)
        assert first.device("two") is not None
        first.close()  # the second has it open: no fold, the log stays
        assert (directory / LOG_NAME).exists()
        with second.transaction():
            second.set_transaction_id(2)
    finally:
        second.close()
    assert sorted(os.listdir(directory)) == [DB_NAME]
    third = Store(directory)
    try:
        assert [r["name"] for r in third.devices()] == ["one", "two"]
        assert third.transaction_id() == 2
    finally:
        third.close()


def test_a_store_reopens_a_log_folded_and_removed_behind_it(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    first = made(directory)
    with first.transaction():
        first.add_device("one", 1, 2048, None)
    # The first's shared hold is lost (as when a process forked and the
    # child closed): another store folds and removes the log.
    assert first._log is not None
    storelog._lock(first._log.fd, fcntl.F_UNLCK, wait=False)
    second = Store(directory)
    with second.transaction():
        second.add_device("two", 2, 2048, None)
    second.close()
    assert not (directory / LOG_NAME).exists()
    try:
        assert [r["name"] for r in first.devices()] == ["one", "two"]
        with first.transaction():
            first.add_device("three", 3, 2048, None)
    finally:
        first.close()
    final = Store(directory)
    try:
        assert [r["name"] for r in final.devices()] == ["one", "three", "two"]
    finally:
        final.close()


def test_a_long_log_is_folded_while_the_store_is_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "LOG_LIMIT", 4096)
    directory = tmp_path / "state"
    store = made(directory)
    try:
        for i in range(200):
            with store.transaction():
                store.add_device(f"d{i}", i, 2048, None)
        assert (directory / LOG_NAME).stat().st_size <= 8192
        db = sqlite3.connect(directory / DB_NAME)
        try:
            folded = db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
        finally:
            db.close()
        assert 150 <= folded < 200
        assert store.count_devices() == 200
    finally:
        store.close()
    again = Store(directory)
    try:
        assert again.count_devices() == 200
    finally:
        again.close()


def test_threads_share_a_store(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    errors: list[BaseException] = []

    def work(tag: int) -> None:
        try:
            for i in range(30):
                with store.transaction():
                    thin_id = store.allocate_id(MAX)
                    assert thin_id is not None
                    store.add_device(f"t{tag}-{i}", thin_id, 2048, None)
                store.devices()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r["thin_id"] for r in store.devices()) == list(range(120))
    store.close()


def test_a_log_of_another_store_is_refused_and_kept(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for directory in (one, two):
        store = made(directory)
        with store.transaction():
            store.add_device("x", 1, 2048, None)
        die(store)
    foreign = (two / LOG_NAME).read_bytes()
    (one / LOG_NAME).write_bytes(foreign)
    with pytest.raises(libdm.StateError) as caught:
        Store(one)
    said = str(caught.value)
    assert str(one / LOG_NAME) in said and "another state store" in said
    assert (one / LOG_NAME).read_bytes() == foreign


def test_a_newer_log_format_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("x", 1, 2048, None)
    die(store)
    log = directory / LOG_NAME
    data = bytearray(log.read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    data[32:36] = struct.pack("<I", zlib.crc32(bytes(data[:32])))
    log.write_bytes(bytes(data))
    with pytest.raises(libdm.StateError, match="newer libdm"):
        Store(directory)


def test_a_symlinked_log_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    target = tmp_path / "victim"
    target.write_bytes(b"x" * 100)
    os.symlink(target, directory / LOG_NAME)
    with pytest.raises(libdm.StateError, match="symbolic link"):
        Store(directory)
    assert target.read_bytes() == b"x" * 100


def test_opening_and_closing_changes_nothing_on_disk(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    before = (directory / DB_NAME).read_bytes()
    for _ in range(2):
        store = Store(directory)
        store.devices()
        store.close()
    assert (directory / DB_NAME).read_bytes() == before
    assert sorted(os.listdir(directory)) == [DB_NAME]


def test_held_takes_in_other_changes_once_at_its_start(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    first = made(directory)
    second = Store(directory)
    try:
        with second.transaction():
            second.add_device("theirs", 1, 2048, None)
        with first.held():
            assert first.device("theirs") is not None
            with first.transaction():
                first.add_device("mine", 2, 2048, None)
            assert [r["name"] for r in first.devices()] == ["mine", "theirs"]
        assert second.device("mine") is not None
    finally:
        second.close()
        first.close()


def test_a_failed_write_is_taken_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    try:
        with store.transaction():
            store.add_device("kept", 1, 2048, None)
        size = (directory / LOG_NAME).stat().st_size

        def no_space(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fdatasync", no_space)
        with pytest.raises(OSError), store.transaction():
            store.add_device("lost", 2, 2048, None)
        monkeypatch.undo()
        assert store.device("lost") is None
        # The record stays, taken back by the next (readers may have seen it).
        assert (directory / LOG_NAME).stat().st_size > size
        other = Store(directory)
        try:
            assert other.device("lost") is None
        finally:
            other.close()
        with store.transaction():
            store.add_device("next", 2, 2048, None)
    finally:
        store.close()
    again = Store(directory)
    try:
        assert [r["name"] for r in again.devices()] == ["kept", "next"]
    finally:
        again.close()


def test_a_fold_interrupted_before_the_log_went_is_not_applied_twice(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    some_changes(store)
    before = everything(store)
    assert store._log is not None and store._log.try_exclusive()
    store._fold()  # state.db has it all; killed before the log is removed
    die(store)
    again = Store(directory)
    try:
        assert everything(again) == before
        with again.transaction():
            again.add_device("after", 20, 2048, None)
    finally:
        die(again)  # killed again: the log holds folded and new records
    final = Store(directory)
    try:
        assert final.device("after") is not None
        assert final.count_devices() == before["count"] + 1
    finally:
        final.close()
    assert sorted(os.listdir(directory)) == [DB_NAME]


def test_the_configuration_reaches_state_db_at_once(tmp_path: Path) -> None:
    directory = tmp_path / "state"

    def stored() -> Any:
        db = sqlite3.connect(directory / DB_NAME)
        try:
            return db.execute("SELECT config FROM pool").fetchone()
        finally:
            db.close()

    store = made(directory)
    try:
        assert stored() is not None  # the new pool, while it is open
        store.set_config(dict(CONFIG, low_water_mark=7))
        assert '"low_water_mark": 7' in stored()[0]
    finally:
        store.close()


def test_a_shared_lock_is_the_one_transactions_take(tmp_path: Path) -> None:
    store = made(tmp_path / "state")
    lock = threading.RLock()
    store.share_lock(lock)
    started = threading.Event()
    done: list[str] = []

    def writer() -> None:
        started.set()
        with store.transaction():
            store.add_device("theirs", 2, 2048, None)
        done.append("theirs")

    try:
        with lock:  # as a pool holding its lock around a change
            with store.transaction():
                store.add_device("mine", 1, 2048, None)
            thread = threading.Thread(target=writer)
            thread.start()
            started.wait()
            thread.join(0.2)
            assert done == []  # waits for the lock the pool holds
        thread.join()
        assert done == ["theirs"]
        assert [r["name"] for r in store.devices()] == ["mine", "theirs"]
    finally:
        store.close()


def test_a_fold_that_fails_leaves_the_change_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state"
    store = made(directory)

    def fails(self: Store) -> None:
        raise libdm.StateError("state.db is full", "close")

    monkeypatch.setattr(Store, "_fold", fails)
    store.set_config(dict(CONFIG, low_water_mark=9))  # folded at once, were it not for this
    assert store.pool()["config"]["low_water_mark"] == 9
    monkeypatch.undo()
    die(store)
    again = Store(directory)
    try:
        assert again.pool()["config"]["low_water_mark"] == 9
    finally:
        again.close()


def test_a_reader_left_alone_folds_what_a_writer_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "LOG_LIMIT", 4096)
    directory = tmp_path / "state"
    reader = made(directory)
    writer = Store(directory)
    for i in range(100):  # past the limit, never alone: nothing folded
        with writer.transaction():
            writer.add_device(f"d{i}", i, 2048, None)
    writer.close()
    assert (directory / LOG_NAME).stat().st_size > 4096
    try:
        assert reader.count_devices() == 100  # reads the log, then folds it
        assert (directory / LOG_NAME).stat().st_size < 4096
    finally:
        reader.close()
    again = Store(directory)
    try:
        assert again.count_devices() == 100
    finally:
        again.close()


def test_an_open_after_a_crash_folds_the_log_it_finds(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("x", 1, 2048, None)
    die(store)
    again = Store(directory)
    try:
        db = sqlite3.connect(directory / DB_NAME)
        try:
            assert db.execute("SELECT name FROM devices").fetchall() == [("x",)]
        finally:
            db.close()
    finally:
        again.close()
