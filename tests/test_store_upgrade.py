"""A store written by an older libdm opens, keeps every field, and is
upgraded in place (tests/data/make_store_v1.py says how the fixture was
made); a store from a newer libdm is refused."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import libdm
from libdm.thin.store import DB_NAME, LOG_NAME, MIGRATIONS, SCHEMA_VERSION, Store

DATA = Path(__file__).resolve().parent / "data" / "store-v1"


def copy_of_v1(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    shutil.copyfile(DATA / DB_NAME, directory / DB_NAME)
    os.chmod(directory / DB_NAME, 0o600)
    return directory


def expected() -> dict[str, Any]:
    with open(DATA / "expected.json") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def schema_version(directory: Path) -> int:
    db = sqlite3.connect(directory / DB_NAME)
    try:
        return int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    finally:
        db.close()


def check_every_field(store: Store, want: dict[str, Any]) -> None:
    assert store.pool() == want["pool"]
    assert store.transaction_id() == want["transaction_id"]
    assert store.devices() == want["devices"]
    assert store.active_devices() == want["active_devices"]
    assert {r["name"]: store.children(r["name"]) for r in store.devices()} == want["children"]
    assert store.count_devices() == want["count_devices"]
    assert store.intents() == want["intents"]
    assert store.deferred_deletes() == want["deferred_deletes"]
    assert store.foreign_ids() == want["foreign_ids"]
    assert store.growth_intent() == want["growth_intent"]
    for row in want["devices"]:
        assert store.device(row["name"]) == row
        assert store.device_by_id(row["thin_id"]) == row
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
        assert meta["log_seq"] == "0" and len(bytes.fromhex(meta["store_id"])) == 16
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
