"""Full pools: fail fast or queue, refuse new devices first, come back
with a resize."""

import errno
import os

import pytest
from support import witness
from support.blockio import read_at

import libdm
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def test_error_if_no_space_fails_writes_at_once(make_pool):
    pool = make_pool(data_size="16M", features=["error_if_no_space"], min_free_space=0)
    dev = pool.create_thin("vol", "64M")
    fd = os.open(dev.path, os.O_WRONLY | os.O_DIRECT)
    import mmap

    buf = mmap.mmap(-1, MiB)
    buf.write(b"\x5a" * MiB)
    written, failure = 0, None
    try:
        for i in range(24):
            os.pwritev(fd, [buf], i * MiB)
            written += 1
    except OSError as exc:
        failure = exc
    finally:
        os.close(fd)
    # The write that found no space failed (no queueing, no hang) ...
    assert failure is not None and failure.errno in (errno.ENOSPC, errno.EIO)
    assert written == 16
    # ... and the kernel says why.
    st = pool.status()
    assert st.mode == "out_of_data_space" and st.no_space == "error_if_no_space"
    assert witness.pool_status(pool.name)[4] == "out_of_data_space"
    # A resize brings it back; what was written before is intact.
    pool.resize(data_size="64M")
    assert pool.status().mode == "rw"
    assert read_at(dev.path, 15 * MiB, 4096) == b"\x5a" * 4096
    fd = os.open(dev.path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x5b" * MiB, 20 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_min_free_space_refuses_before_the_pool_is_full(make_pool):
    pool = make_pool(data_size="32M", min_free_space=25)
    dev = pool.create_thin("vol", "64M")
    fd = os.open(dev.path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x01" * (25 * MiB), 0)  # 78% used: 22% free
        os.fsync(fd)
    finally:
        os.close(fd)
    assert pool.status().mode == "rw"  # the pool is fine ...
    with pytest.raises(libdm.PoolFullError, match="below its minimum free space of 25%"):
        pool.create_thin("more", "1M")  # ... but no new device is made
    assert witness.thin_ids(pool.name) == {0}
    pool.resize(data_size="64M")
    pool.create_thin("more", "1M")  # room again


def test_a_failed_pool_cannot_be_resized(dm_name, tmp_path, make_pool):
    from support.blockio import attach, devno

    meta = attach(tmp_path, "meta.img", 8 * MiB)
    data = attach(tmp_path, "data.img", 64 * MiB)
    lower = dm_name("meta")
    libdm.create(lower, [libdm.Target(0, 8 * MiB // 512, "linear", f"{devno(meta)} 0")])
    pool = make_pool(data, libdm.device_path(lower))
    pool.create_thin("vol", "4M")
    witness.dmsetup("suspend", "--noflush", lower)
    witness.dmsetup("reload", lower, "--table", f"0 {8 * MiB // 512} error")
    witness.dmsetup("resume", lower)
    with pytest.raises((libdm.PoolFailedError, libdm.PoolReadOnlyError)):
        pool.create_thin("x", "1M")
    for attempt in (pool.refresh, lambda: pool.extend(attach(tmp_path, "x.img", 8 * MiB))):
        with pytest.raises((libdm.PoolFailedError, libdm.PoolReadOnlyError)) as caught:
            attempt()
        assert "thin_repair" in str(caught.value)
    assert [r.name for r in Store(pool.directory).devices()] == ["vol"]


def test_a_truncated_state_database_is_a_clear_error_and_nothing_is_deleted(dm_name, tmp_path):
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    pool.create_thin("vol", "4M")
    name = pool.name
    pool.close()
    db = directory / "state.db"
    for extra in ("state.db-wal", "state.db-shm"):
        if (directory / extra).exists():
            (directory / extra).unlink()  # as a copy without its journal would be
    size = db.stat().st_size
    with open(db, "r+b") as fh:
        fh.truncate(size // 3)
    before = db.read_bytes()
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.open(directory)
    assert "unreadable" in str(caught.value) or "no pool" in str(caught.value)
    assert db.read_bytes() == before  # nothing rewritten
    assert (directory / "data").stat().st_size == 64 * MiB  # nothing deleted
    assert f"{name}-vol" in witness.names()  # nothing torn down
