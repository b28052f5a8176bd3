"""Extending block pools with more devices, online."""

import subprocess

import pytest
from support import witness
from support.blockio import attach, devno, read_at, write_at

import libdm
from libdm.thin.label import RESERVED

pytestmark = pytest.mark.kernel

MiB = 1 << 20
R = int(RESERVED)  # sectors before a labelled device's first mapped one


@pytest.fixture
def block_pool(tmp_path, make_pool):
    data = attach(tmp_path, "data.img", 64 * MiB)
    meta = attach(tmp_path, "meta.img", 4 * MiB)
    pool = make_pool(data, meta, min_free_space=0)
    return pool, data, meta


def test_extend_with_a_second_device_while_written(block_pool, tmp_path):
    pool, data, _meta = block_pool
    vol = pool.create_thin("vol", "256M")
    write_at(vol.path, 0, b"\x01" * (60 * MiB))  # nearly fills the 64 MiB pool
    extra = attach(tmp_path, "extra.img", 128 * MiB)
    st = pool.extend(extra)
    assert int(st.total_data) == (190 * MiB) // (64 << 10)
    tdata = witness.table(f"{pool.name}-tdata")
    assert tdata == [
        f"0 {64 * MiB // 512 - R} linear {devno(data)} {R}",
        f"{64 * MiB // 512 - R} {128 * MiB // 512 - R} linear {devno(extra)} {R}",
    ]
    assert witness.table(pool.name)[0].split()[1] == str(190 * MiB // 512)
    # Write past the old end: the new blocks come from the new device.
    write_at(vol.path, 60 * MiB, b"\x02" * (100 * MiB))
    assert witness.pool_status(pool.name)[2].split("/")[0] == str(160 * MiB // (64 << 10))
    # It survives a deactivate/activate of the device and a full teardown.
    vol.deactivate()
    vol.activate()
    assert read_at(vol.path, 150 * MiB, 4096) == b"\x02" * 4096
    name = pool.name
    pool.close()
    for dev in (f"{name}-vol", name, f"{name}-tdata", f"{name}-tmeta"):
        witness.dmsetup("remove", dev)
    again = libdm.Pool.open(pool.directory)
    try:
        assert witness.table(f"{name}-tdata") == tdata
        assert read_at(again.device("vol").path, 159 * MiB, 4096) == b"\x02" * 4096
        assert read_at(again.device("vol").path, 0, 4096) == b"\x01" * 4096
    finally:
        again.close()


def test_extend_metadata_with_a_region(block_pool, tmp_path):
    pool, _data, _meta = block_pool
    spare = attach(tmp_path, "spare.img", 64 * MiB)
    before = int(witness.pool_status(pool.name)[1].split("/")[1])
    pool.extend(spare, metadata=True, start="8M", length="4M")
    after = int(witness.pool_status(pool.name)[1].split("/")[1])
    assert (before, after) == (768, 1792)  # 4 KiB metadata blocks
    assert witness.table(f"{pool.name}-tmeta")[1] == (
        f"{3 * MiB // 512} {4 * MiB // 512} linear {devno(spare)} {8 * MiB // 512}"
    )


def test_extend_refuses_bad_devices_and_changes_nothing(block_pool, tmp_path, dm_name):
    pool, data, _meta = block_pool
    table = witness.table(f"{pool.name}-tdata")
    with pytest.raises(libdm.RefusedError, match="already part of pool"):
        pool.extend(data)
    used = attach(tmp_path, "used.img", 32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", used], check=True)
    with pytest.raises(libdm.DeviceNotBlankError, match="ext2/ext3/ext4"):
        pool.extend(used)
    held = attach(tmp_path, "held.img", 32 * MiB)
    witness.dmsetup("create", dm_name("holder"), "--table", f"0 2048 linear {devno(held)} 0")
    with pytest.raises(libdm.DeviceBusyError, match="in use"):
        pool.extend(held)
    small = attach(tmp_path, "small.img", 1 * MiB)
    with pytest.raises(ValueError, match="does not fit"):
        pool.extend(small, start="2M")
    assert witness.table(f"{pool.name}-tdata") == table
    assert libdm.Pool.open(pool.directory).close() is None  # the store still matches


def test_loop_pools_grow_with_resize_not_extend(tmp_path, make_pool):
    pool = make_pool(directory=tmp_path / "p", data_size="64M")
    with pytest.raises(libdm.RefusedError, match="resize"):
        pool.extend("/dev/null")


def test_refresh_picks_up_a_grown_device(block_pool, tmp_path):
    pool, data, _meta = block_pool
    with open(tmp_path / "data.img", "r+b") as fh:
        fh.truncate(96 * MiB)
    subprocess.run(["losetup", "-c", data], check=True)
    st = pool.refresh()
    assert int(st.total_data) == (95 * MiB) // (64 << 10)
    assert witness.table(f"{pool.name}-tdata") == [
        f"0 {96 * MiB // 512 - R} linear {devno(data)} {R}"
    ]


def test_extend_pins_earlier_segments(block_pool, tmp_path):
    pool, data, _meta = block_pool
    extra = attach(tmp_path, "extra.img", 32 * MiB)
    pool.extend(extra)
    before = witness.table(f"{pool.name}-tdata")
    # The first device grows: taking that into the middle of the
    # concatenation would shift the second device's blocks, so it is not.
    with open(tmp_path / "data.img", "r+b") as fh:
        fh.truncate(96 * MiB)
    subprocess.run(["losetup", "-c", data], check=True)
    pool.refresh()
    assert witness.table(f"{pool.name}-tdata") == before
