"""A store written by an older libdm opens, keeps every field, and is
upgraded in place (tests/data/make_store_v1.py and make_store_v2.py say
how the fixtures were made); a store from a newer libdm is refused."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from support.store import (
    deferred_record,
    device_record,
    growth_record,
    intent_record,
    pool_record,
)

import libdm
from libdm.thin.store import DB_NAME, LOG_NAME, MIGRATIONS, SCHEMA_VERSION, Store

DATA = Path(__file__).resolve().parent / "data" / "store-v1"
DATA2 = Path(__file__).resolve().parent / "data" / "store-v2"


def copy_of_v1(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    shutil.copyfile(DATA / DB_NAME, directory / DB_NAME)
    os.chmod(directory / DB_NAME, 0o600)
    return directory


def copy_of_v2(tmp_path: Path) -> Path:
    """The schema 2 store, its log and the SQLite files beside it."""
    directory = tmp_path / "state2"
    shutil.copytree(DATA2, directory)
    os.chmod(directory, 0o700)
    os.unlink(directory / "expected.json")
    for name in os.listdir(directory):
        os.chmod(directory / name, 0o600)
    return directory


def expected(data: Path = DATA) -> dict[str, Any]:
    with open(data / "expected.json") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def schema_version(directory: Path) -> int:
    # A fixture is read as it is: a connection that may write would
    # checkpoint and remove the SQLite files the fixture keeps.
    fixture = directory in (DATA, DATA2)
    where = f"file:{directory / DB_NAME}?mode=ro&immutable=1" if fixture else directory / DB_NAME
    db = sqlite3.connect(where, uri=fixture)
    try:
        return int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    finally:
        db.close()


def check_every_field(store: Store, want: dict[str, Any]) -> None:
    """The store's records are the rows the older libdm read back."""
    devices = [device_record(row) for row in want["devices"]]
    assert store.pool() == pool_record(want["pool"])
    assert store.transaction_id() == want["transaction_id"]
    assert store.devices() == devices
    assert store.active_devices() == [device_record(row) for row in want["active_devices"]]
    assert {r.name: store.children(r.name) for r in store.devices()} == want["children"]
    assert store.count_devices() == want["count_devices"]
    assert store.intents() == [intent_record(row) for row in want["intents"]]
    assert store.deferred_deletes() == [deferred_record(row) for row in want["deferred_deletes"]]
    assert store.foreign_ids() == want["foreign_ids"]
    assert store.growth_intent() == growth_record(want["growth_intent"])
    for record in devices:
        assert store.device(record.name) == record
        assert store.device_by_id(record.thin_id) == record
    for thin_id in want["free_ids"]:
        assert not store.id_in_use(thin_id)


def test_the_fixture_is_a_schema_1_store() -> None:
    assert expected()["schema_version"] == 1 and schema_version(DATA) == 1


def test_a_schema_1_store_opens_keeps_every_field_and_is_upgraded(tmp_path: Path) -> None:
    directory = copy_of_v1(tmp_path)
    want = expected()
    store = Store(directory)
    try:
        check_every_field(store, want)
        assert schema_version(directory) == SCHEMA_VERSION
        # The thin id allocation goes on where it was: the free id first,
        # then next_id (7 is the intent's, 6 foreign).
        with store.transaction():
            assert store.allocate_id(2**24 - 1) == want["free_ids"][0]
            assert store.allocate_id(2**24 - 1) == int(want["next_id"])
            store.drop_intent(want["intents"][0]["txid"])
    finally:
        store.close()
    assert sorted(os.listdir(directory)) == [DB_NAME]
    # A second open, of the upgraded store.
    again = Store(directory)
    try:
        want["intents"] = []
        check_every_field(again, want)
    finally:
        again.close()


def test_an_upgraded_store_still_opens_with_sqlite3_as_before(tmp_path: Path) -> None:
    directory = copy_of_v1(tmp_path)
    Store(directory).close()
    db = sqlite3.connect(directory / DB_NAME)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM devices ORDER BY name")]
        assert names == [r["name"] for r in expected()["devices"]]
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        assert int(meta["schema_version"]) == SCHEMA_VERSION
    finally:
        db.close()


def test_the_migrations_end_at_the_schema_version() -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == list(range(2, SCHEMA_VERSION + 1))


def test_a_store_from_a_newer_libdm_is_refused_and_left_alone(tmp_path: Path) -> None:
    directory = copy_of_v1(tmp_path)
    db = sqlite3.connect(directory / DB_NAME)
    with db:
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    db.close()
    before = (directory / DB_NAME).read_bytes()
    with pytest.raises(libdm.StateError) as caught:
        Store(directory)
    said = str(caught.value)
    assert str(directory / DB_NAME) in said and "newer libdm" in said
    assert f"schema {SCHEMA_VERSION + 1}" in said
    assert (directory / DB_NAME).read_bytes() == before
    assert not (directory / LOG_NAME).exists()


# -- schema 2: the log in front of SQLite ------------------------------------------------


def rows_of(directory: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table, read with sqlite3 alone."""
    db = sqlite3.connect(directory / DB_NAME)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    finally:
        db.close()


def test_the_v2_fixture_is_a_schema_2_store_with_changes_only_in_its_log() -> None:
    want = expected(DATA2)
    assert want["schema_version"] == 2 and schema_version(DATA2) == 2
    db = sqlite3.connect(f"file:{DATA2 / DB_NAME}?mode=ro&immutable=1", uri=True)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM devices ORDER BY name")]
        log_seq = int(db.execute("SELECT value FROM meta WHERE key = 'log_seq'").fetchone()[0])
    finally:
        db.close()
    # state.db alone lacks what the log holds.
    assert "layer2" not in names and "layer2" in [r["name"] for r in want["devices"]]
    records = want["log"]["records"]
    assert records[0]["seq"] == log_seq + 1 and len(records) == 10
    assert want["log"]["size"] > records[-1]["end"]  # the torn tail
    assert (DATA2 / LOG_NAME).stat().st_size == want["log"]["size"]


def test_a_schema_2_store_is_upgraded_at_its_first_open(tmp_path: Path) -> None:
    directory = copy_of_v2(tmp_path)
    want = expected(DATA2)
    store = Store(directory)
    try:
        # Folded, checked and removed at the open, not at the close.
        assert not (directory / LOG_NAME).exists()
        assert schema_version(directory) == SCHEMA_VERSION
        check_every_field(store, want)
        assert [r[0] for r in rows_of(directory)["devices"]] == sorted(
            r["name"] for r in want["devices"]
        )
        # The thin ids go on where they were (6 is the intent's, 4 foreign).
        with store.transaction():
            assert store.allocate_id(2**24 - 1) == int(want["next_id"])
    finally:
        store.close()
    assert not (directory / LOG_NAME).exists()
    again = Store(directory)
    try:
        check_every_field(again, want)
    finally:
        again.close()


def test_an_upgrade_killed_before_the_log_went_finishes_at_the_next_open(
    tmp_path: Path,
) -> None:
    """The fold is committed, then the log removed: a kill between the two
    leaves a log whose records state.db holds already."""
    directory = copy_of_v2(tmp_path)
    log = (directory / LOG_NAME).read_bytes()
    Store(directory).close()
    before = rows_of(directory)
    (directory / LOG_NAME).write_bytes(log)
    os.chmod(directory / LOG_NAME, 0o600)
    store = Store(directory)
    try:
        assert not (directory / LOG_NAME).exists()
        check_every_field(store, expected(DATA2))
    finally:
        store.close()
    assert rows_of(directory) == before  # nothing applied twice


def test_a_damaged_byte_in_the_log_is_refused_and_nothing_is_removed(tmp_path: Path) -> None:
    """A byte changed in the middle of the log (valid records after it) is
    not a torn tail: the open refuses, naming the log, and keeps it and
    state.db as they were."""
    directory = copy_of_v2(tmp_path)
    records = expected(DATA2)["log"]["records"]
    at = records[4]["end"] - 5  # inside the fifth record's payload
    data = bytearray((directory / LOG_NAME).read_bytes())
    data[at] ^= 0x20
    (directory / LOG_NAME).write_bytes(bytes(data))
    before = rows_of(directory)
    with pytest.raises(libdm.StateError) as caught:
        Store(directory)
    said = str(caught.value)
    assert str(directory / LOG_NAME) in said and "damaged" in said, said
    assert "another program" not in said
    assert f"record {records[4]['seq']}" in said, said
    assert (directory / LOG_NAME).read_bytes() == bytes(data)
    assert rows_of(directory) == before
    assert schema_version(directory) == 2


def test_a_log_of_another_store_is_refused_at_the_upgrade(tmp_path: Path) -> None:
    directory = copy_of_v2(tmp_path)
    data = bytearray((directory / LOG_NAME).read_bytes())
    data[16] ^= 0xFF  # the store id in the header (its CRC then fails too)
    (directory / LOG_NAME).write_bytes(bytes(data))
    with pytest.raises(libdm.StateError) as caught:
        Store(directory)
    assert str(directory / LOG_NAME) in str(caught.value)
    assert (directory / LOG_NAME).read_bytes() == bytes(data)
    assert schema_version(directory) == 2


def test_an_older_libdm_with_the_pool_open_holds_off_the_upgrade(tmp_path: Path) -> None:
    """A process of the older libdm holds the log (a shared lock on it)
    while it has the pool open: the upgrade waits for none and refuses."""
    import fcntl
    import struct

    directory = copy_of_v2(tmp_path)
    fd = os.open(directory / LOG_NAME, os.O_RDWR)
    try:
        request = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
        with pytest.raises(libdm.StateError) as caught:
            Store(directory)
        said = str(caught.value)
        assert str(directory / LOG_NAME) in said and "older libdm" in said, said
        assert (directory / LOG_NAME).exists() and schema_version(directory) == 2
    finally:
        os.close(fd)
    Store(directory).close()
    assert not (directory / LOG_NAME).exists()


@pytest.mark.parametrize("keep", [0, 20], ids=["empty", "header-cut-short"])
def test_a_log_holding_no_record_is_removed_at_the_upgrade(tmp_path: Path, keep: int) -> None:
    """A log whose header's write a crash cut short holds no change."""
    directory = copy_of_v2(tmp_path)
    (directory / LOG_NAME).write_bytes((DATA2 / LOG_NAME).read_bytes()[:keep])
    before = rows_of(directory)
    Store(directory).close()
    assert not (directory / LOG_NAME).exists()
    after = rows_of(directory)
    assert after["devices"] == before["devices"] and schema_version(directory) == SCHEMA_VERSION


def test_a_foreign_short_file_named_like_the_log_is_refused_and_kept(tmp_path: Path) -> None:
    directory = copy_of_v2(tmp_path)
    (directory / LOG_NAME).write_bytes(b"not a log of ours")
    with pytest.raises(libdm.StateError) as caught:
        Store(directory)
    assert str(directory / LOG_NAME) in str(caught.value)
    assert (directory / LOG_NAME).read_bytes() == b"not a log of ours"
    assert schema_version(directory) == 2
