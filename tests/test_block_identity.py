"""A block pool's devices and linear pieces carry an identity of libdm's own.

A block pool sits on ``<pool>-tmeta`` / ``<pool>-tdata`` linear pieces over
block devices given by path.  Neither a name nor a path is an identity:
pool ``a``'s thin device ``b-tdata`` and pool ``a-b``'s data piece share a
device-mapper name, and after a reboot a path may name another disk.  So
libdm gives each piece a uuid of its own and writes a label at the start of
each block device a pool uses, and acts only on what carries them.

Witnesses: dmsetup (info, table), SHA-256 of the devices' contents, the
label bytes read from the device directly.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from support import witness
from support.blockio import MiB, attach, devno, read_at, write_at, write_pattern

import libdm

pytestmark = pytest.mark.kernel


# -- (8) the linear pieces: a uuid libdm sets ------------------------------------------


def test_destroy_leaves_another_pools_device_named_like_a_piece(dm_name, tmp_path):
    """Block pool ``a-b`` is down; loop pool ``a`` has thin device
    ``b-tdata`` (device-mapper name ``a-b-tdata``): destroying ``a-b``
    leaves it, its table and its contents as they were."""
    data, meta = attach(tmp_path, "data.img", 64 * MiB), attach(tmp_path, "meta.img", 8 * MiB)
    ab = libdm.Pool.create(dm_name("a-b"), data, meta, state_dir=tmp_path / "ab")
    assert witness.info(f"{ab.name}-tdata")["uuid"].startswith("LIBDM-")
    ab.destroy()  # down, its state kept
    a = libdm.Pool.create_loop(dm_name("a"), tmp_path / "a", data_size="64M")
    try:
        theirs = a.create_thin("b-tdata", "16M")
        assert theirs.dm_name == f"{ab.name}-tdata"
        write_pattern(theirs.path, 0x3C, 0, 2 * MiB)
        before = (witness.info(theirs.dm_name)["uuid"], witness.table(theirs.dm_name))
        digest = witness.checksum(theirs.path)
        down = libdm.Pool(str(tmp_path / "ab"))
        down.destroy()
        assert witness.info(theirs.dm_name) is not None, "pool a's device was removed"
        assert (witness.info(theirs.dm_name)["uuid"], witness.table(theirs.dm_name)) == before
        assert witness.checksum(theirs.path) == digest
        # Opening a-b does not take a's device as its data piece either.
        with pytest.raises(libdm.StateError, match=theirs.dm_name):
            libdm.Pool.open(tmp_path / "ab")
        assert witness.table(theirs.dm_name) == before[1]
    finally:
        a.close()


def test_pieces_made_before_uuids_get_theirs_at_open(dm_name, tmp_path):
    """A piece with no uuid whose table is exactly the recorded one (a pool
    brought up by an older libdm) is the pool's: open gives it its uuid and
    the data stays; one with no uuid and another table is not touched."""
    data, meta = attach(tmp_path, "data.img", 64 * MiB), attach(tmp_path, "meta.img", 8 * MiB)
    pool = libdm.Pool.create(dm_name("old"), data, meta, state_dir=tmp_path / "st")
    dev = pool.create_thin("v", "16M")
    write_pattern(dev.path, 0x7E, 0, 4 * MiB)
    digest = witness.checksum(dev.path)
    pieces = {p: witness.table(f"{pool.name}-{p}") for p in ("tmeta", "tdata")}
    uuids = {p: witness.info(f"{pool.name}-{p}")["uuid"] for p in pieces}
    pool.close()
    for name in (dev.dm_name, pool.name, f"{pool.name}-tdata", f"{pool.name}-tmeta"):
        witness.dmsetup("remove", name)
    for piece, table in pieces.items():  # as an older libdm made them: no uuid
        witness.dmsetup("create", f"{pool.name}-{piece}", "--table", "\n".join(table))
    reopened = libdm.Pool.open(tmp_path / "st")
    try:
        for piece, table in pieces.items():
            assert witness.info(f"{pool.name}-{piece}")["uuid"] == uuids[piece]
            assert witness.table(f"{pool.name}-{piece}") == table
        assert witness.checksum(reopened.device("v").path) == digest
    finally:
        reopened.destroy()
    # A piece with no uuid and a table the record does not name: foreign.
    witness.dmsetup("create", f"{pool.name}-tdata", "--table", f"0 2048 linear {data} 0")
    with pytest.raises(libdm.StateError, match="not a linear piece"):
        libdm.Pool.open(tmp_path / "st")
    assert witness.table(f"{pool.name}-tdata")[0].startswith("0 2048 linear")
    assert witness.info(f"{pool.name}-tmeta") is None  # what the refused open made went


# -- (4) a device another pool uses carries that pool's label -----------------------------


def reboot(*names: str) -> None:
    """Take the devices down as a reboot would (no teardown by libdm)."""
    for name in names:
        witness.dmsetup("remove", name)


def test_create_refuses_another_pools_data_device(dm_name, tmp_path):
    """After a reboot, before pool ``first`` is opened again, a new pool on
    its data device is refused (naming ``first``) unless forced, and
    ``first`` opens with its data intact."""
    data = attach(tmp_path, "data.img", 64 * MiB)
    meta1, meta2 = attach(tmp_path, "m1.img", 8 * MiB), attach(tmp_path, "m2.img", 8 * MiB)
    first = libdm.Pool.create(dm_name("first"), data, meta1, state_dir=tmp_path / "s1")
    v = first.create_thin("v", "32M")
    write_pattern(v.path, 0xD4, 0, 8 * MiB)
    digest = witness.checksum(v.path)
    first.close()
    reboot(v.dm_name, first.name, f"{first.name}-tdata", f"{first.name}-tmeta")
    with pytest.raises(libdm.DeviceNotBlankError, match=f"pool {first.name!r}") as caught:
        libdm.Pool.create(dm_name("second"), data, meta2, state_dir=tmp_path / "s2")
    assert data in str(caught.value)
    assert not (tmp_path / "s2").exists()
    assert read_at(meta2, 0, 4096) == bytes(4096)  # nothing written on the other device
    again = libdm.Pool.open(tmp_path / "s1")
    try:
        assert witness.checksum(again.device("v").path) == digest
    finally:
        again.close()


# -- (3) a device found by its label, not by its path ---------------------------------------


def detach(*loops: str) -> None:
    for loopdev in loops:
        subprocess.run(["losetup", "-d", loopdev], check=True)


def reattach(path: Path) -> str:
    return subprocess.run(
        ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_open_after_devices_came_up_in_another_order(dm_name, tmp_path, caplog):
    """Another program's disk of the same size comes up at the path of the
    pool's data device: open never maps it; it finds the device carrying
    the pool's label and records its new path.  With the pool's device
    gone, open refuses, naming the path and what it holds."""
    data, meta = attach(tmp_path, "data.img", 64 * MiB), attach(tmp_path, "meta.img", 8 * MiB)
    pool = libdm.Pool.create(dm_name("swap"), data, meta, state_dir=tmp_path / "st")
    v = pool.create_thin("v", "32M")
    write_pattern(v.path, 0x91, 0, 4 * MiB)
    digest = witness.checksum(v.path)
    pool.close()
    reboot(v.dm_name, pool.name, f"{pool.name}-tdata", f"{pool.name}-tmeta")
    detach(data, meta)
    with open(tmp_path / "theirs.img", "wb") as fh:
        fh.write(os.urandom(64 * MiB))
    theirs = reattach(tmp_path / "theirs.img")
    new_meta = reattach(tmp_path / "meta.img")
    new_data = reattach(tmp_path / "data.img")
    assert theirs == data  # the pool's recorded path now names their disk
    theirs_sum = witness.checksum(theirs)
    caplog.set_level(logging.WARNING, logger="libdm")
    reopened = libdm.Pool.open(tmp_path / "st")
    try:
        tdata = witness.table(f"{pool.name}-tdata")[0].split()
        assert tdata[3] == devno(new_data), tdata
        assert witness.table(f"{pool.name}-tmeta")[0].split()[3] == devno(new_meta)
        assert witness.checksum(reopened.device("v").path) == digest
        write_pattern(reopened.device("v").path, 0x00, 0, 8 * MiB)
        assert new_data in caplog.text
        recorded = [seg.path for seg in reopened.config.backing.data_segments]
        assert recorded == [new_data]
    finally:
        reopened.close()
    assert witness.checksum(theirs) == theirs_sum
    # The pool's data device gone: refused, naming the path and what it holds.
    reboot(f"{pool.name}-v", pool.name, f"{pool.name}-tdata", f"{pool.name}-tmeta")
    detach(new_data)
    with pytest.raises(libdm.ForeignDeviceError, match="no block device carries its label"):
        libdm.Pool.open(tmp_path / "st")
    assert witness.checksum(theirs) == theirs_sum
    assert not any(n.startswith(pool.name) for n in witness.names())


# -- pools made before labels and piece uuids -------------------------------------------------


def test_a_pool_made_before_labels_still_opens(dm_name, tmp_path, monkeypatch, caplog):
    """A block pool as an older libdm made it (pieces from sector 0, no
    labels, pieces without uuids) opens with its data, and the log says
    its devices are known by path and size only."""
    import libdm.thin.creation as creation

    data, meta = attach(tmp_path, "data.img", 64 * MiB), attach(tmp_path, "meta.img", 8 * MiB)
    with monkeypatch.context() as old:
        old.setattr(creation, "RESERVED", libdm.Sectors(0))
        old.setattr(creation, "write_label", lambda path, label: None)
        pool = libdm.Pool.create(dm_name("old"), data, meta, state_dir=tmp_path / "st")
    assert witness.table(f"{pool.name}-tdata")[0].split()[3:] == [devno(data), "0"]
    assert [d.label for d in pool.config.backing.data_segment_devices] == [None]
    v = pool.create_thin("v", "16M")
    write_pattern(v.path, 0x42, 0, 4 * MiB)
    digest = witness.checksum(v.path)
    pieces = {p: witness.table(f"{pool.name}-{p}") for p in ("tmeta", "tdata")}
    pool.close()
    reboot(v.dm_name, pool.name, f"{pool.name}-tdata", f"{pool.name}-tmeta")
    for piece, table in pieces.items():
        witness.dmsetup("create", f"{pool.name}-{piece}", "--table", "\n".join(table))
    caplog.set_level(logging.WARNING, logger="libdm")
    reopened = libdm.Pool.open(tmp_path / "st")
    try:
        assert "identified by path and size only" in caplog.text
        assert witness.checksum(reopened.device("v").path) == digest
        assert witness.info(f"{pool.name}-tdata")["uuid"].startswith("LIBDM-PIECE-")
    finally:
        reopened.close()


# -- (5) the repair spare: its label, not its path --------------------------------------------


def test_a_recorded_spare_is_found_by_its_label_not_its_path(dm_name, tmp_path):
    """A repair that found losses keeps its copy on the spare given, and
    records it.  After a reboot in which another program's disk comes up
    at the spare's path, the next repair never writes to that disk."""
    data, meta = attach(tmp_path, "data.img", 64 * MiB), attach(tmp_path, "meta.img", 8 * MiB)
    pool = libdm.Pool.create(dm_name("sp"), data, meta, state_dir=tmp_path / "st")
    v = pool.create_thin("v", "16M")
    write_pattern(v.path, 0x66, 0, 4 * MiB)
    pool.close()
    reboot(v.dm_name, pool.name)
    # The superblock's tree roots, magic kept: thin_repair has to scan.
    write_at(f"/dev/mapper/{pool.name}-tmeta", 320, b"\xff" * 16)
    spare = attach(tmp_path, "spare.img", 8 * MiB)
    down = libdm.Pool.load(tmp_path / "st")
    try:
        with pytest.raises(libdm.MetadataLossError):  # losses: nothing swapped in
            down.repair(spare=spare)
        assert [s.path for s in down.config.backing.spare_segments] == [spare]
    finally:
        down.close()
    names = [n for n in witness.names() if n.startswith(pool.name)]
    reboot(*names)
    detach(data, meta, spare)
    with open(tmp_path / "theirs.img", "wb") as fh:
        fh.write(os.urandom(8 * MiB))
    order = {}
    for what in ("data", "meta", "theirs", "spare"):
        order[what] = reattach(tmp_path / f"{what}.img")
    assert order["theirs"] == spare  # their disk at the recorded spare's path
    theirs_sum = witness.checksum(order["theirs"])
    down = libdm.Pool.load(tmp_path / "st")
    try:
        with pytest.raises(libdm.MetadataLossError):  # into the spare, found by its label
            down.repair()
        recorded = [s.path for s in down.config.backing.spare_segments]
    finally:
        down.close()
    assert witness.checksum(order["theirs"]) == theirs_sum, "their disk was written"
    assert recorded == [order["spare"]]
