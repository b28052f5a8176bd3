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

import pytest
from support import witness
from support.blockio import MiB, attach, write_pattern

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
