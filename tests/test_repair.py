"""Repairing a pool's metadata (lvconvert --repair's part): the devices
come back with their data, the damaged copy is kept.

Witnesses: thin_check on the swapped-in metadata, thin_dump (through a
metadata snapshot), dmsetup, and the devices' contents.
"""

import mmap
import os
import subprocess
import sys

import pytest
from support import witness
from support.blockio import MiB, read_at, write_at, write_pattern

import libdm

pytestmark = pytest.mark.kernel


def used_pool(name, directory):
    pool = libdm.Pool.create_loop(name, directory, data_size="128M")
    for n in range(3):
        write_pattern(pool.create_thin(f"vol{n}", "8M").path, 0x30 + n)
    pool.device("vol2").deactivate()
    pool.destroy()  # a reboot: nothing live, files and store kept
    return directory / "metadata"


def through_flakey(path, dm_name, byte):
    """Rewrite the superblock of the metadata file ``path`` through a
    dm-flakey device that corrupts byte ``byte`` (1-based) of every write,
    as a failing disk would."""
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = dm_name("flakey")
    try:
        sectors = os.stat(path).st_size // 512
        witness.dmsetup(
            "create",
            name,
            "--table",
            f"0 {sectors} flakey {loop} 0 0 1 5 corrupt_bio_byte {byte} w 255 0",
        )
        witness.dmsetup("mknodes", name)
        block = mmap.mmap(-1, 4096)
        fd = os.open(loop, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [block], 0)
        finally:
            os.close(fd)
        fd = os.open(f"/dev/mapper/{name}", os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwrite(fd, block, 0)
        finally:
            os.close(fd)
    finally:
        witness.dmsetup("remove", name, check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.mark.parametrize(
    "how", ["zeroed superblock", "bad superblock checksum", "dm-flakey corrupted the superblock"]
)
def test_repair_brings_every_device_back(dm_name, tmp_path, how):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    meta = used_pool(name, directory)
    if how == "zeroed superblock":
        write_at(meta, 0, bytes(4096))
    elif how == "bad superblock checksum":
        write_at(meta, 0, b"\xde\xad\xbe\xef")  # the superblock's checksum
    else:
        through_flakey(meta, dm_name, 33)  # a byte of the magic number
    with pytest.raises(libdm.PoolFailedError):
        libdm.Pool.open(directory)
    assert witness.info(name) is None

    pool = libdm.Pool.load(directory)
    try:
        damaged = pool.repair()
        # The damaged copy is kept, the repaired one checks clean.
        assert os.path.basename(damaged).startswith("metadata.damaged-")
        with open(damaged, "rb") as fh:
            head = fh.read(40)
        assert {
            "zeroed superblock": head == bytes(40),
            "bad superblock checksum": head[:4] == b"\xde\xad\xbe\xef",
            "dm-flakey corrupted the superblock": head[32] == 0xFF,
        }[how]
        assert witness.thin_ids(name) == {0, 1, 2}
        assert witness.transaction_id(name) == 3
        for n in range(2):
            assert read_at(pool.device(f"vol{n}").path, 0, MiB) == bytes([0x30 + n]) * MiB
        assert witness.info(f"{name}-vol2") is None  # it was inactive: it stays so
        pool.device("vol2").activate()
        assert read_at(pool.device("vol2").path, 0, MiB) == bytes([0x32]) * MiB
        fields = witness.pool_status(name)
        assert fields[4] == "rw" and "needs_check" not in fields
        pool.create_thin("after", "4M")
        pool.destroy()  # and it reopens as any pool does
    finally:
        pool.close()
    again = libdm.Pool.open(directory)
    try:
        assert {d.name for d in again.devices()} == {"vol0", "vol1", "vol2", "after"}
    finally:
        again.close()


def test_repair_refuses_while_a_device_is_open(make_pool):
    pool = make_pool(data_size="64M")
    dev = pool.create_thin("vol", "4M")
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(libdm.DeviceBusyError, match="in use"):
            pool.repair()
    finally:
        os.close(fd)
    assert witness.info(dev.dm_name) is not None  # nothing was taken down
    assert not [f for f in os.listdir(pool.directory) if f.startswith("metadata.")]


def test_a_repair_thin_repair_cannot_do_changes_nothing(dm_name, tmp_path):
    directory = tmp_path / "pool"
    meta = used_pool(dm_name("pool"), directory)
    write_at(meta, 0, os.urandom(64 * 4096))  # superblock and more: beyond repair
    before = subprocess.run(["sha256sum", str(meta)], capture_output=True, text=True).stdout
    pool = libdm.Pool.load(directory)
    try:
        with pytest.raises(libdm.PoolFailedError, match="nothing was swapped in") as err:
            pool.repair()
        assert "lost: vol0, vol1, vol2" in str(err.value)
    finally:
        pool.close()
    after = subprocess.run(["sha256sum", str(meta)], capture_output=True, text=True).stdout
    assert before == after
    assert sorted(os.listdir(directory)) == ["data", "lock", "metadata", "state.db"]


def test_pool_repair_at_a_shell(dm_name, tmp_path):
    directory = tmp_path / "pool"
    meta = used_pool(dm_name("pool"), directory)
    write_at(meta, 0, bytes(4096))
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", "pool", "repair", "--pool", str(directory)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "metadata repaired" in proc.stdout
    pool = libdm.Pool.load(directory)
    try:
        assert read_at(pool.device("vol0").path, 0, MiB) == bytes([0x30]) * MiB
    finally:
        pool.close()
