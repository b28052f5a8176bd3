"""Giving space back to a loop pool's file: discard before delete
(Docker's dm.blkdiscard) and pool.trim() (fstrim on the devices).

The pool's directory is on a tmpfs mounted by the test inside the test
kernel: a loop device over a tmpfs file turns discards into holes (the
host filesystem seen by the test kernel does not).  Witness: the data
file's allocated blocks (stat's st_blocks) and the pool's used blocks
(dmsetup status).
"""

import os
import subprocess

import pytest
from support import witness
from support.blockio import MiB, write_pattern

pytestmark = pytest.mark.kernel


@pytest.fixture
def tmpfs(tmp_path):
    where = tmp_path / "tmpfs"
    where.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", str(where)], check=True
    )
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def allocated(path):
    return os.stat(path).st_blocks * 512


def used_blocks(pool_name):
    return int(witness.pool_status(pool_name)[2].split("/")[0])


def test_delete_gives_the_space_back_to_the_data_file(tmpfs, make_pool):
    pool = make_pool(directory=tmpfs / "pool", data_size="256M")
    assert pool.discard_on_delete  # the default for loop pools
    assert "no_discard_passdown" not in witness.pool_status(pool.name)
    dev = pool.create_thin("vol", "64M")
    write_pattern(dev.path, 0x5C, length=48 * MiB)
    data = tmpfs / "pool" / "data"
    before = allocated(data)
    assert before >= 48 * MiB
    dev.delete()
    assert used_blocks(pool.name) == 0
    assert allocated(data) < before - 40 * MiB


def test_an_inactive_device_is_discarded_too(tmpfs, make_pool):
    pool = make_pool(directory=tmpfs / "pool", data_size="256M")
    dev = pool.create_thin("vol", "64M")
    write_pattern(dev.path, 0x5D, length=32 * MiB)
    dev.deactivate()
    before = allocated(tmpfs / "pool" / "data")
    pool.device("vol").delete()
    assert allocated(tmpfs / "pool" / "data") < before - 24 * MiB
    assert witness.info(dev.dm_name) is None


def test_a_snapshot_keeps_the_blocks_its_deleted_origin_shared(tmpfs, make_pool):
    pool = make_pool(directory=tmpfs / "pool", data_size="256M")
    origin = pool.create_thin("origin", "32M")
    write_pattern(origin.path, 0x61, length=16 * MiB)
    snap = origin.snapshot("snap")
    origin.delete()
    with open(snap.path, "rb") as fh:
        assert fh.read(16 * MiB) == bytes([0x61]) * (16 * MiB)
    assert used_blocks(pool.name) == 16 * MiB // (64 << 10)


def test_without_discard_the_file_keeps_its_blocks(tmpfs, make_pool):
    pool = make_pool(directory=tmpfs / "pool", data_size="256M")
    pool.configure(discard_on_delete=False)
    dev = pool.create_thin("vol", "64M")
    write_pattern(dev.path, 0x5E, length=32 * MiB)
    before = allocated(tmpfs / "pool" / "data")
    dev.delete()
    assert used_blocks(pool.name) == 0  # the pool freed them...
    assert allocated(tmpfs / "pool" / "data") >= before - MiB  # ...the file did not


def test_trim_gives_back_what_a_filesystem_freed(tmpfs, make_pool):
    pool = make_pool(directory=tmpfs / "pool", data_size="256M")
    dev = pool.create_thin("vol", "128M").format("ext4")
    with dev.mount() as root:
        big = os.path.join(root, "big")
        with open(big, "wb") as fh:
            fh.write(os.urandom(40 * MiB))
            os.fsync(fh.fileno())
        os.unlink(big)
        os.sync()
        before_used = used_blocks(pool.name)
        before = allocated(tmpfs / "pool" / "data")
        trimmed = pool.trim()
        assert int(trimmed) >= 40 * MiB
        assert used_blocks(pool.name) < before_used - 30 * MiB // (64 << 10)
        assert allocated(tmpfs / "pool" / "data") < before - 30 * MiB
