"""Faulty devices under a pool: the metadata or the data device starts
failing (dm-error, dm-flakey).  libdm must say what happened and what to
run, refuse changes, lose nothing from its store, and open the pool again
once the fault is gone."""

import errno
import os
import subprocess

import pytest
from support import reliability, witness

import libdm
from libdm.thin.label import RESERVED
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel

MiB = 1 << 20


LABEL = int(RESERVED.bytes())  # a block pool's device starts with its label


@pytest.fixture
def faulty_pool(dm_name, tmp_path, make_pool):
    """A pool whose metadata and data devices are linear devices over loops,
    so the test can swap their tables for failing ones."""
    loops = {}
    for part, size in (("meta", 8 * MiB), ("data", 64 * MiB)):
        path = tmp_path / part
        with open(path, "wb") as fh:
            fh.truncate(size)
        loops[part] = subprocess.run(
            ["losetup", "-f", "--show", str(path)], check=True, capture_output=True, text=True
        ).stdout.strip()
    lower = {part: dm_name(part) for part in loops}
    sizes = {"meta": 8 * MiB // 512, "data": 64 * MiB // 512}
    for part, name in lower.items():
        libdm.create(name, [libdm.Target(0, sizes[part], "linear", f"{loops[part]} 0")])
    pool = make_pool(libdm.device_path(lower["data"]), libdm.device_path(lower["meta"]))
    dev = pool.create_thin("vol", "16M")
    fd = os.open(dev.path, os.O_WRONLY)
    os.pwrite(fd, b"\x42" * MiB, 0)
    os.fsync(fd)
    os.close(fd)

    def swap(part, kind):
        table = {
            "linear": f"0 {sizes[part]} linear {loops[part]} 0",
            "error": f"0 {sizes[part]} error",
            # Up for 0 s, down for an hour: every write fails, reads pass.
            "flakey": f"0 {sizes[part]} flakey {loops[part]} 0 0 3600 1 error_writes",
        }[kind]
        witness.dmsetup("suspend", "--noflush", lower[part])
        witness.dmsetup("reload", lower[part], "--table", table)
        witness.dmsetup("resume", lower[part])

    return pool, dev, lower, swap


def read_first_mib(path):
    with open(path, "rb") as fh:
        return fh.read(MiB)


@pytest.mark.parametrize("fault", ["error", "flakey"])
def test_metadata_fault_fails_the_pool_and_open_recovers(faulty_pool, fault, tmp_path):
    pool, dev, _lower, swap = faulty_pool
    swap("meta", fault)
    with pytest.raises((libdm.PoolFailedError, libdm.PoolReadOnlyError)) as caught:
        pool.create_thin("new", "4M")
    text = str(caught.value)
    assert "thin_check" in text and "thin_repair" in text
    assert (
        witness.status(pool.name)[0].split()[3] in ("Fail", "Error")
        or "needs_check" in witness.status(pool.name)[0]
        or " ro " in witness.status(pool.name)[0]
    )
    for attempt in (
        lambda: dev.snapshot("snap"),
        lambda: dev.delete(),
        lambda: pool.create_thin("other", "1M"),
    ):
        with pytest.raises((libdm.PoolFailedError, libdm.PoolReadOnlyError)):
            attempt()
    assert pool.info().state in ("Fail", "Error", "ro", "needs_check")
    store = Store(pool.directory)
    assert [r.name for r in store.devices()] == ["vol"] and store.intents() == []
    store.close()
    # Remove the fault, take the failed pool down, check its metadata, reopen.
    swap("meta", "linear")
    for name in (dev.dm_name, pool.name, f"{pool.name}-tdata", f"{pool.name}-tmeta"):
        witness.dmsetup("remove", name)
    # The pool's metadata as the pool maps it: after the device's label.
    meta = subprocess.run(
        ["losetup", "-f", "--show", "-r", "-o", str(LABEL), str(tmp_path / "meta")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        check = subprocess.run(["thin_check", meta], capture_output=True, text=True)
    finally:
        subprocess.run(["losetup", "-d", meta], check=False)
    assert check.returncode == 0, check.stderr
    again = libdm.Pool.open(pool.directory)
    try:
        assert read_first_mib(again.device("vol").path) == b"\x42" * MiB
        again.create_thin("after", "4M")
        assert witness.thin_ids(again.name) == {0, 1}
    finally:
        again.close()
    reliability.record("faults", faults=1, losses=0)


def test_data_fault_surfaces_eio_and_loses_nothing(faulty_pool):
    pool, dev, _lower, swap = faulty_pool
    swap("data", "error")
    fd = os.open(dev.path, os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, MiB)
        buf.write(b"\x17" * MiB)
        with pytest.raises(OSError) as caught:
            os.pwritev(fd, [buf], 4 * MiB)
        assert caught.value.errno == errno.EIO
    finally:
        os.close(fd)
    swap("data", "linear")
    assert read_first_mib(dev.path) == b"\x42" * MiB
    st = pool.status()
    if not st.failed and st.mode == "rw" and not st.needs_check:
        pool.create_thin("after", "4M")
    store = Store(pool.directory)
    assert "vol" in [r.name for r in store.devices()]
    store.close()
    reliability.record("faults", faults=1, losses=0)


def test_thin_check_failure_blocks_open_with_a_clear_error(faulty_pool):
    pool, dev, lower, _swap = faulty_pool
    name = pool.name
    for gone in (dev.dm_name, name, f"{name}-tdata", f"{name}-tmeta"):
        witness.dmsetup("remove", gone)
    # Scribble over the metadata superblock's checksum (after the label).
    fd = os.open(libdm.device_path(lower["meta"]), os.O_WRONLY)
    os.pwrite(fd, b"\xff" * 4, LABEL)
    os.fsync(fd)
    os.close(fd)
    with pytest.raises(libdm.PoolFailedError) as caught:
        libdm.Pool.open(pool.directory)
    assert "is damaged; thin_check says: " in str(caught.value)
    assert "; Pool.repair() repairs it" in str(caught.value)
    assert name not in witness.names()  # nothing was loaded on bad metadata
    store = Store(pool.directory)
    assert [r.name for r in store.devices()] == ["vol"]
    store.close()
    reliability.record("faults", faults=1, losses=0)
