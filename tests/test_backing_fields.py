"""The backing's stored fields read into typed values and written back
unchanged (no kernel): a configuration of each kind, as earlier releases
stored it, goes through the store and the backing it records and comes
out byte for byte the same; a damaged field the kind needs is refused
by name."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import libdm
from libdm.thin import backing as backings
from libdm.thin.config import BackingFields, PoolConfig, PoolKind, RecordedDevice, Segment
from libdm.thin.label import LabelRef, Role
from libdm.thin.store import DB_NAME, Store
from libdm.thin.units import Bytes, Sectors

BASE: dict[str, Any] = {
    "block_size": 128,
    "low_water_mark": 0,
    "features": ["skip_block_zeroing"],
    "min_free_space": 10,
    "deferred_removal": True,
    "deferred_deletion": True,
    "base_device": None,
    "token": "0123456789abcdef0123456789abcdef",
    "made_directory": True,
}

GiB = 1 << 30


def label(role: str, index: int) -> dict[str, Any]:
    return {"role": role, "index": index}


#: Configurations as earlier releases stored them, each with its kind.
RECORDS: dict[str, tuple[PoolKind, dict[str, Any]]] = {
    "loop": (
        PoolKind.LOOP,
        dict(
            BASE,
            data_size=100 * GiB,
            metadata_size=2 * GiB,
            data_file="data",
            metadata_file="metadata",
            file_inodes={"data": 12, "metadata": 13},
        ),
    ),
    # A repair between writing its spare and swapping it in.
    "loop repairing": (
        PoolKind.LOOP,
        dict(
            BASE,
            data_size=100 * GiB,
            metadata_size=2 * GiB,
            data_file="data",
            metadata_file="metadata",
            file_inodes={"data": 12, "metadata": 14, "metadata.repair": 14},
            repair={"damaged": "metadata.damaged-20260101T000000Z"},
        ),
    ),
    # A store made before files were identified by inode.
    "loop without inodes": (
        PoolKind.LOOP,
        dict(
            BASE,
            data_size=1 << 20,
            metadata_size=2 << 20,
            data_file="data",
            metadata_file="metadata",
        ),
    ),
    # Extended by a second device, with a repair's spare recorded and the
    # metadata an earlier repair swapped out kept.
    "block": (
        PoolKind.BLOCK,
        dict(
            BASE,
            meta_segments=[["/dev/vdb", 2048, 16384]],
            data_segments=[["/dev/vdb", 18432, 1000000], ["/dev/vdc", 2048, None]],
            meta_segment_devices=[{"path": "/dev/vdb", "size": GiB, "label": label("meta", 0)}],
            data_segment_devices=[
                {"path": "/dev/vdb", "size": GiB, "label": label("data", 0)},
                {"path": "/dev/vdc", "size": 2 * GiB, "label": label("data", 1)},
            ],
            spare_segments=[["/dev/vdd", 2048, 16384]],
            spare_segment_devices=[{"path": "/dev/vdd", "size": GiB, "label": label("spare", 0)}],
            damaged_meta_segments=[["/dev/vde", 2048, 16384], ["/dev/vde", 20480, 8]],
        ),
    ),
    # After a repair swapped its spare in: the spare's fields are null.
    "block repaired": (
        PoolKind.BLOCK,
        dict(
            BASE,
            meta_segments=[["/dev/vdd", 2048, 16384]],
            data_segments=[["/dev/vdb", 18432, None]],
            meta_segment_devices=[{"path": "/dev/vdd", "size": GiB, "label": label("spare", 0)}],
            data_segment_devices=[{"path": "/dev/vdb", "size": GiB, "label": label("data", 0)}],
            spare_segments=None,
            spare_segment_devices=None,
            damaged_meta_segments=[["/dev/vdb", 2048, 16384]],
        ),
    ),
    # Made before labels (devices known by path and size), and before that
    # before devices were recorded at all; a device record with a field
    # this libdm does not know, and an explicit null label.
    "block before labels": (
        PoolKind.BLOCK,
        dict(
            BASE,
            meta_segments=[["/dev/sdb", 0, 8192]],
            data_segments=[["/dev/sdb", 8192, None], ["/dev/sdc", 0, None]],
            data_segment_devices=[
                {"path": "/dev/sdb", "size": GiB},
                {"path": "/dev/sdc", "size": GiB, "label": None, "serial": "x"},
            ],
        ),
    ),
    "adopted": (PoolKind.ADOPTED, dict(BASE)),
}


def stored_text(directory: Path) -> str:
    db = sqlite3.connect(directory / DB_NAME)
    try:
        text: str = db.execute("SELECT config FROM pool").fetchone()[0]
        return text
    finally:
        db.close()


def store_with(directory: Path, kind: PoolKind, text: str) -> Store:
    """A store holding a pool of ``kind`` whose configuration is ``text``,
    written with sqlite3 as an earlier release left it."""
    store = Store(str(directory), create=True)
    store.init_pool("p", "LIBDM-POOL-x", kind, PoolConfig.from_record(BASE))
    db = sqlite3.connect(directory / DB_NAME)
    with db:
        db.execute("UPDATE pool SET config = ?", (text,))
    db.close()
    return store


@pytest.mark.parametrize("name", RECORDS)
def test_a_stored_configuration_round_trips_byte_for_byte(tmp_path: Path, name: str) -> None:
    kind, record = RECORDS[name]
    text = json.dumps(record, sort_keys=True)  # as the store writes it
    directory = tmp_path / "state"
    store = store_with(directory, kind, text)
    try:
        config = store.pool().config
        assert config.to_record() == record
        # Unchanged, through the store: the same bytes.
        store.set_config(config)
        assert stored_text(directory) == text
        # Through the backing it records: the backing writes back what it read.
        backing = backings.from_config(kind, store.statedir, "p", config)
        store.set_config(config.with_backing(**backing.config()))
        assert stored_text(directory) == text
    finally:
        store.close()


def test_the_fields_are_typed() -> None:
    fields = PoolConfig.from_record(RECORDS["block"][1]).backing
    assert fields.data_segments == (
        Segment("/dev/vdb", Sectors(18432), Sectors(1000000)),
        Segment("/dev/vdc", Sectors(2048), None),
    )
    assert fields.meta_segment_devices == (
        RecordedDevice("/dev/vdb", Bytes(GiB), LabelRef(Role.META, 0)),
    )
    assert isinstance(fields.data_segment_devices[1].size, Bytes)  # type: ignore[index]
    assert fields.spare_segments == (Segment("/dev/vdd", Sectors(2048), Sectors(16384)),)
    assert fields.kept == {}
    loop = PoolConfig.from_record(RECORDS["loop"][1]).backing
    assert loop.file_inodes == {"data": 12, "metadata": 13}
    assert loop.data_size == Bytes(100 * GiB) and isinstance(loop.data_size, Bytes)
    # What would not be written back the same is kept as stored.
    repaired = PoolConfig.from_record(RECORDS["block repaired"][1]).backing
    assert repaired.spare_segments is None and repaired.kept == {
        "spare_segments": None,
        "spare_segment_devices": None,
    }
    old = PoolConfig.from_record(RECORDS["block before labels"][1]).backing
    assert old.meta_segment_devices is None
    assert old.data_segment_devices == (
        RecordedDevice("/dev/sdb", Bytes(GiB)),
        RecordedDevice("/dev/sdc", Bytes(GiB)),
    )
    assert list(old.kept) == ["data_segment_devices"]


def test_a_change_writes_only_its_fields_in_the_stored_form() -> None:
    config = PoolConfig.from_record(RECORDS["block repaired"][1])
    spare = [Segment("/dev/vdf", Sectors(2048), Sectors(16384))]
    device = RecordedDevice("/dev/vdf", Bytes(GiB), LabelRef(Role.SPARE, 0))
    changed = config.with_backing(spare_segments=spare, spare_segment_devices=[device])
    assert changed.to_record() == dict(
        RECORDS["block repaired"][1],
        spare_segments=[["/dev/vdf", 2048, 16384]],
        spare_segment_devices=[{"path": "/dev/vdf", "size": GiB, "label": label("spare", 0)}],
    )
    # None clears a field: it is no longer stored.
    cleared = changed.with_backing(spare_segments=None, spare_segment_devices=None)
    assert "spare_segments" not in cleared.to_record()
    assert cleared.backing.spare_segments is None and cleared.backing.kept == {}


@pytest.mark.parametrize(
    "kind, changes, field, said",
    [
        ("block", {"meta_segments": None}, "meta_segments", "is missing"),
        ("block", {"data_segments": []}, "data_segments", "is [], not a list of segments"),
        ("block", {"data_segments": [["/dev/x", -1, None]]}, "data_segments", "holds"),
        ("block", {"meta_segment_devices": [{"path": 7}]}, "meta_segment_devices", "records"),
        ("block", {"spare_segment_devices": "x"}, "spare_segment_devices", "records"),
        ("block", {"spare_segments": [[1, 2]]}, "spare_segments", "holds [1, 2]"),
        ("block", {"damaged_meta_segments": "x"}, "damaged_meta_segments", "is 'x'"),
        ("loop", {"file_inodes": {"data": "12"}}, "file_inodes", "not a map of names to inodes"),
        ("loop", {"file_inodes": [12]}, "file_inodes", "is [12]"),
    ],
)
def test_a_damaged_field_the_kind_needs_is_refused_by_name(
    tmp_path: Path, kind: str, changes: dict[str, Any], field: str, said: str
) -> None:
    name = {"loop": "loop", "block": "block"}[kind]
    pool_kind, record = RECORDS[name]
    damaged = {**record, **changes}
    if changes.get(field, 0) is None:
        del damaged[field]
    text = json.dumps(damaged, sort_keys=True)
    directory = tmp_path / "state"
    store = store_with(directory, pool_kind, text)
    try:
        config = store.pool().config  # read: the field is kept as stored
        with pytest.raises(libdm.StateError) as caught:
            backings.from_config(pool_kind, store.statedir, "p", config)
        text_said = str(caught.value)
        assert os.path.join(directory, DB_NAME) in text_said
        assert f"the {kind!r} pool's field {field!r} " in text_said and said in text_said
        # Nothing else is refused, and the damaged value is written back as it was.
        store.set_config(config)
        assert stored_text(directory) == text
    finally:
        store.close()


def test_a_field_another_kind_needs_is_kept_but_not_refused(tmp_path: Path) -> None:
    record = dict(RECORDS["loop"][1], meta_segments="left by hand")
    fields = BackingFields.from_record(record)
    assert fields.damage(backings.FIELD_CHECKS[PoolKind.LOOP]) is None
    assert fields.damage(backings.FIELD_CHECKS[PoolKind.BLOCK]) == (
        "meta_segments",
        "is 'left by hand', not a list of segments",
    )
    assert fields.to_record()["meta_segments"] == "left by hand"
    # A size of the wrong type is named when it is asked for.
    sized = PoolConfig.from_record(dict(record, data_size="big"))
    with pytest.raises(libdm.StateError, match="'data_size' is 'big', not an integer"):
        _ = sized.data_size
