"""The state store on its own (no kernel): SQLite in WAL mode, crashes
between a change and the close, torn WAL tails, several stores open at
once, threads, failed writes and checkpoints."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from support.store import MAX_THIN_ID as MAX
from support.store import config, intent, made

import libdm
from libdm.thin.config import PoolKind
from libdm.thin.records import DeferredDelete, DeviceRecord, GrowthIntent, Intent, Op
from libdm.thin.store import DB_NAME, LOG_NAME, Store
from libdm.thin.units import Sectors

WAL = DB_NAME + "-wal"


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
        "children": {row.name: store.children(row.name) for row in store.devices()},
    }


def some_changes(store: Store) -> None:
    with store.transaction():
        for name in ("a", "b", "c"):
            thin_id = store.allocate_id(MAX)
            assert thin_id is not None
            store.add_device(name, thin_id, Sectors(2048), None, active=True)
        store.set_transaction_id(3)
    with store.transaction(durable=False):
        thin_id = store.allocate_id(MAX)
        assert thin_id is not None
        store.add_device("a-snap", thin_id, Sectors(2048), "a")
        store.set_transaction_id(4)
    with store.transaction():
        store.set_active("b", False)
        store.set_size("c", Sectors(4096))
        store.queue_delete(9, "old")
        store.mark_foreign(7)
        store.add_intent(intent(5, "create_thin", 8, "pending", 2048))
        store.set_growth_intent(GrowthIntent("refresh", config(), config(low_water_mark=8), {}))


def test_changes_survive_a_close_and_state_db_is_the_whole_state(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    some_changes(store)
    before = everything(store)
    store.close()
    # The last connection checkpointed its WAL into state.db and removed it.
    assert sorted(os.listdir(directory)) == [DB_NAME]
    again = Store(directory)
    try:
        assert everything(again) == before
    finally:
        again.close()
    db = sqlite3.connect(directory / DB_NAME)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM devices ORDER BY name")]
        assert names == ["a", "a-snap", "b", "c"]
        assert db.execute("SELECT transaction_id FROM pool").fetchone()[0] == 4
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_records_are_what_the_sqlite_store_holds(tmp_path: Path) -> None:
    store = made(tmp_path / "state")
    try:
        some_changes(store)
        row = store.device("a-snap")
        assert row is not None
        assert row == DeviceRecord("a-snap", 3, Sectors(2048), "a", False, row.created)
        assert type(row.size) is Sectors and type(row.active) is bool
        # Its creation time, as SQLite read it (a witness beside the store).
        db = sqlite3.connect(store.path)
        try:
            created = db.execute("SELECT created FROM devices WHERE name = 'a-snap'").fetchone()
        finally:
            db.close()
        assert row.created == created[0]
        assert store.device_by_id(3) == row
        assert store.children("a") == ["a-snap"]
        assert [r.name for r in store.active_devices()] == ["a", "c"]
        assert store.intents() == [Intent(Op.CREATE_THIN, 5, 8, "pending", Sectors(2048))]
        deferred = store.deferred_deletes()
        assert deferred == [DeferredDelete(9, "old", deferred[0].queued)] and deferred[0].queued
        pool = store.pool()
        assert (pool.name, pool.uuid, pool.kind, pool.config) == (
            "p",
            "LIBDM-POOL-x",
            PoolKind.LOOP,
            config(),
        )
        assert store.growth_intent() == GrowthIntent(
            "refresh", config(), config(low_water_mark=8), {}
        )
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
        assert snap is not None and snap.parent is None
        before = everything(store)
        # A row that breaks a constraint: a StateError naming the store
        # and the constraint (never sqlite3's own), and nothing stored.
        for name, thin_id in (("b", 99), ("new", 1)):
            with pytest.raises(libdm.StateError) as caught:
                store.add_device(name, thin_id, Sectors(1), None)
            said = str(caught.value)
            assert str(store.path) in said and "UNIQUE constraint failed" in said
        assert everything(store) == before
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
from libdm.thin.units import Sectors
store = Store({directory!r})
with store.transaction():
    store.add_device("x", 50, Sectors(2048), None, active=True)
    store.set_transaction_id(10)
with store.transaction(durable=False):
    store.add_device("y", 51, Sectors(2048), "x")
os._exit(9)  # killed: no close, no checkpoint
"""


def test_a_killed_process_leaves_a_wal_that_the_next_open_reads(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    code = KILLED.format(directory=str(directory))
    assert subprocess.run([sys.executable, "-P", "-c", code]).returncode == 9
    assert (directory / WAL).stat().st_size > 0
    store = Store(directory)
    try:
        assert [r.name for r in store.devices()] == ["x", "y"]
        assert store.transaction_id() == 10
        assert store.children("x") == ["y"]
    finally:
        store.close()
    assert sorted(os.listdir(directory)) == [DB_NAME]


def test_a_torn_wal_tail_loses_only_the_change_it_held(tmp_path: Path) -> None:
    """A power cut in the middle of the last commit's WAL write: the
    commits before it stay, the torn one is not applied, and the store
    goes on."""
    directory = tmp_path / "state"
    made(directory).close()
    code = KILLED.format(directory=str(directory))
    assert subprocess.run([sys.executable, "-P", "-c", code]).returncode == 9
    wal = directory / WAL
    os.truncate(wal, wal.stat().st_size - 100)
    store = Store(directory)
    try:
        assert [r.name for r in store.devices()] == ["x"]
        with store.transaction():
            store.add_device("after", 52, Sectors(2048), None)
        assert [r.name for r in store.devices()] == ["after", "x"]
    finally:
        store.close()


def test_garbage_after_the_last_wal_frame_is_not_a_change(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    code = KILLED.format(directory=str(directory))
    assert subprocess.run([sys.executable, "-P", "-c", code]).returncode == 9
    with open(directory / WAL, "ab") as fh:
        fh.write(os.urandom(5000))
    store = Store(directory)
    try:
        assert [r.name for r in store.devices()] == ["x", "y"]
    finally:
        store.close()


def test_two_stores_see_each_others_changes(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    first = made(directory)
    second = Store(directory)  # a connection of its own: as another process
    try:
        with first.transaction():
            thin_id = first.allocate_id(MAX)
            assert thin_id is not None
            first.add_device("one", thin_id, Sectors(2048), None)
        assert [r.name for r in second.devices()] == ["one"]
        with second.transaction():
            thin_id = second.allocate_id(MAX)
            assert thin_id == 1  # not the first's id
            second.add_device("two", thin_id, Sectors(2048), None)
        assert first.device("two") is not None
        first.close()
        with second.transaction():
            second.set_transaction_id(2)
    finally:
        second.close()
    assert sorted(os.listdir(directory)) == [DB_NAME]
    third = Store(directory)
    try:
        assert [r.name for r in third.devices()] == ["one", "two"]
        assert third.transaction_id() == 2
    finally:
        third.close()


def test_the_sequence_moves_with_every_change_of_anyone(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    first = made(directory)
    second = Store(directory)
    try:
        seen = first.sequence
        assert first.sequence == seen  # nothing changed
        with second.transaction():
            second.set_transaction_id(5)
        moved = first.sequence
        assert moved != seen
        with first.transaction():
            first.set_transaction_id(6)
        assert first.sequence != moved
        mine = first.sequence
        first.device("x")
        assert first.sequence == mine
    finally:
        second.close()
        first.close()


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
                    store.add_device(f"t{tag}-{i}", thin_id, Sectors(2048), None)
                store.devices()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.thin_id for r in store.devices()) == list(range(120))
    store.close()


@pytest.mark.parametrize("name", [WAL, DB_NAME + "-shm", LOG_NAME])
def test_a_symlinked_store_file_is_refused(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    target = tmp_path / "victim"
    target.write_bytes(b"x" * 100)
    os.symlink(target, directory / name)
    with pytest.raises(libdm.StateError, match="symbolic link"):
        Store(directory)
    assert target.read_bytes() == b"x" * 100
    assert os.path.islink(directory / name)


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


def test_held_reads_in_one_transaction_and_writes_see_the_latest(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    first = made(directory)
    second = Store(directory)
    try:
        with second.transaction():
            second.add_device("theirs", 1, Sectors(2048), None)
        with first.held():
            assert first.device("theirs") is not None
            assert first.db.in_transaction  # one read transaction for the block
            with first.transaction():
                first.add_device("mine", 2, Sectors(2048), None)
            assert [r.name for r in first.devices()] == ["mine", "theirs"]
        assert not first.db.in_transaction
        assert second.device("mine") is not None
    finally:
        second.close()
        first.close()


def test_the_configuration_is_in_state_db_at_once(tmp_path: Path) -> None:
    """Tools read state.db with sqlite3 while the pool is open."""
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
        store.set_config(config(low_water_mark=7))
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
            store.add_device("theirs", 2, Sectors(2048), None)
        done.append("theirs")

    try:
        with lock:  # as a pool holding its lock around a change
            with store.transaction():
                store.add_device("mine", 1, Sectors(2048), None)
            thread = threading.Thread(target=writer)
            thread.start()
            started.wait()
            thread.join(0.2)
            assert done == []  # waits for the lock the pool holds
        thread.join()
        assert done == ["theirs"]
        assert [r.name for r in store.devices()] == ["mine", "theirs"]
    finally:
        store.close()


def test_a_closed_store_refuses_by_name(tmp_path: Path) -> None:
    store = made(tmp_path / "state")
    store.close()
    store.close()  # twice: nothing
    with pytest.raises(libdm.StateError, match="closed") as caught:
        store.devices()
    assert str(store.path) in str(caught.value)


def test_an_os_error_opening_the_store_is_a_state_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing disk (EIO) under the state directory: the library says
    which file and what failed, never a bare OSError."""
    import errno

    from libdm.thin.statedir import StateDir

    directory = tmp_path / "state"
    made(directory).close()

    def failing(self: StateDir, name: str) -> None:
        raise OSError(errno.EIO, "Input/output error", name)

    monkeypatch.setattr(StateDir, "lstat", failing)
    with pytest.raises(libdm.StateError) as caught:
        Store(directory)
    said = str(caught.value)
    assert str(directory / DB_NAME) in said and "[EIO]" in said, said
