"""Removing and deleting thin devices that are still in use.

Docker's ``dm.use_deferred_removal`` and ``dm.use_deferred_deletion``: a
busy device is removed by the kernel when its last user closes it, and a
delete the kernel refuses with EBUSY is queued and retried later.  With
both off, busy devices make the call fail and nothing is lost.

Witnesses: ``dmsetup info`` (DEFERRED REMOVE), ``dmsetup ls``, the pool's
transaction id from ``dmsetup status`` and the thin ids thin_dump reads.
"""

import os
import subprocess
import sys

import pytest
from support import witness
from support.blockio import write_pattern
from support.poll import until

import libdm
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel

MiB = 1 << 20


@pytest.fixture
def pool(make_pool):
    return make_pool(data_size="128M")


@pytest.fixture
def strict_pool(make_pool):
    return make_pool(data_size="128M", deferred_removal=False, deferred_deletion=False)


def deferred_remove_pending(dm_name):
    out = witness.dmsetup("info", dm_name)
    state = next(line for line in out.splitlines() if line.startswith("State:"))
    return "DEFERRED REMOVE" in state


def wait_gone(dev, limit=30.0):
    """The kernel removes a deferred device from a work queue after the
    last close: wait (bounded) until dmsetup stops listing it and its
    sysfs node is gone too.  The name leaves the list before the table is
    destroyed (and the thin device closed in the pool); the sysfs node
    only after."""
    sysfs = f"/sys/dev/block/{_devnos[dev.dm_name]}"
    until(
        lambda: dev.dm_name not in witness.names() and not os.path.exists(sysfs),
        f"{dev.dm_name} to go after its last close",
        limit,
    )


_devnos = {}


def busy(dev):
    """Record the device number of ``dev`` (for :func:`wait_gone`) while it is live."""
    info = witness.info(dev.dm_name)
    _devnos[dev.dm_name] = f"{info['major']}:{info['minor']}"
    return dev


class Holder:
    """Keeps a device busy: an open file descriptor, or a mount."""

    def __init__(self, how, path, mnt):
        self.how, self.path, self.mnt = how, path, mnt
        if how == "fd":
            self.fd = os.open(path, os.O_RDONLY)
        else:
            os.makedirs(mnt, exist_ok=True)
            subprocess.run(["mount", path, str(mnt)], check=True)

    def release(self):
        if self.how == "fd":
            os.close(self.fd)
        else:
            subprocess.run(["umount", str(self.mnt)], check=True)


# -- deferred removal -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fd", "mount"])
def test_deactivate_of_a_busy_device_is_deferred(pool, tmp_path, how):
    dev = pool.create_thin("vol", "64M")
    if how == "mount":
        dev.format("ext4")
    holder = Holder(how, busy(dev).path, tmp_path / "mnt")
    try:
        dev.deactivate()  # returns at once
        assert dev.dm_name in witness.names()
        assert deferred_remove_pending(dev.dm_name)
        assert witness.info(dev.dm_name)["open"] >= 1
        assert not Store(pool.directory).device("vol").active
    finally:
        holder.release()
    wait_gone(dev)
    assert not pool.device("vol").active
    assert witness.thin_ids(pool.name) == {0}  # data stays in the pool
    # And it comes back with its data.
    pool.device("vol").activate()
    assert dev.dm_name in witness.names() and not deferred_remove_pending(dev.dm_name)


def test_activate_cancels_a_pending_deferred_removal(pool):
    dev = pool.create_thin("vol", "16M")
    write_pattern(dev.path, 0x31)
    fd = os.open(busy(dev).path, os.O_RDONLY)
    try:
        dev.deactivate()
        assert deferred_remove_pending(dev.dm_name)
        dev.activate()  # the user wants it back while it is still open
        assert dev.active
        # Docker's activateDeviceIfNeeded cancels the deferred removal;
        # otherwise the device vanishes at the close below although the
        # pool records it as active.
        assert not deferred_remove_pending(dev.dm_name)
    finally:
        os.close(fd)
    assert dev.dm_name in witness.names()
    assert pool.device("vol").active
    with open(dev.path, "rb") as fh:
        assert fh.read(MiB) == b"\x31" * MiB


# -- deferred deletion ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fd", "mount"])
@pytest.mark.parametrize("retry_by", ["create_thin", "open"])
def test_delete_of_a_busy_device_is_queued_then_retried(pool, tmp_path, how, retry_by):
    keep = pool.create_thin("keep", "8M")
    dev = pool.create_thin("vol", "64M")
    write_pattern(dev.path, 0x5E)
    if how == "mount":
        dev.format("ext4")
    tx = witness.transaction_id(pool.name)
    assert (keep.thin_id, dev.thin_id, tx) == (0, 1, 2)
    holder = Holder(how, busy(dev).path, tmp_path / "mnt")
    try:
        dev.delete()  # the kernel answers EBUSY to "delete 1": queued
        assert deferred_remove_pending(dev.dm_name)
        info = pool.info()
        assert info.deferred_deleted_count == 1
        assert info.as_dict()["Deferred Deleted Device Count"] == "1"
        assert [d.name for d in pool.devices()] == ["keep"]
        with pytest.raises(libdm.NoSuchDeviceError):
            pool.device("vol")
        assert witness.thin_ids(pool.name) == {0, 1}
        assert witness.transaction_id(pool.name) == tx
        # Still busy: another change retries, meets EBUSY again, goes on.
        other = pool.create_thin("other", "8M")
        assert other.thin_id == 2
        assert witness.thin_ids(pool.name) == {0, 1, 2}
        assert pool.info().deferred_deleted_count == 1
        tx = witness.transaction_id(pool.name)
    finally:
        holder.release()
    wait_gone(dev)
    assert witness.thin_ids(pool.name) == {0, 1, 2}  # nothing happens by itself
    if retry_by == "create_thin":
        pool.create_thin("more", "8M")
        retried = pool
    else:
        retried = libdm.Pool.open(pool.directory)
    try:
        assert retried.info().deferred_deleted_count == 0
        if retry_by == "create_thin":
            # delete 1, then create_thin: two transactions.  The retried
            # delete freed id 1 and the new device got it, empty.
            assert witness.transaction_id(pool.name) == tx + 2
            more = retried.device("more")
            assert more.thin_id == 1
            assert witness.table(more.dm_name)[0].split()[-1] == "1"
            assert witness.thin_ids(pool.name) == {0, 1, 2}
            with open(more.path, "rb") as fh:
                assert fh.read(MiB) == bytes(MiB)  # not the deleted device's blocks
        else:
            assert witness.transaction_id(pool.name) == tx + 1
            assert witness.thin_ids(pool.name) == {0, 2}
        assert retried.info().transaction_id == witness.transaction_id(pool.name)
        assert sorted(d.name for d in retried.devices()) == sorted(
            ["keep", "other"] + (["more"] if retry_by == "create_thin" else [])
        )
    finally:
        if retried is not pool:
            retried.close()


def test_delete_after_a_deferred_deactivate_is_queued(pool):
    dev = pool.create_thin("vol", "8M")
    fd = os.open(busy(dev).path, os.O_RDONLY)
    try:
        dev.deactivate()
        assert deferred_remove_pending(dev.dm_name)
        dev.delete()
        assert pool.info().deferred_deleted_count == 1
        assert pool.devices() == []
        assert witness.thin_ids(pool.name) == {0}
    finally:
        os.close(fd)
    wait_gone(dev)
    again = libdm.Pool.open(pool.directory)
    try:
        assert witness.thin_ids(pool.name) == set()
        assert again.info().deferred_deleted_count == 0
        assert witness.transaction_id(pool.name) == 2
    finally:
        again.close()


def test_a_queued_id_is_not_reused_until_its_delete_succeeded(pool):
    a = pool.create_thin("a", "8M")
    b = pool.create_thin("b", "8M")
    assert (a.thin_id, b.thin_id) == (0, 1)
    fd = os.open(busy(b).path, os.O_RDONLY)
    try:
        b.delete()
        assert witness.thin_ids(pool.name) == {0, 1}
        c = pool.create_thin("c", "8M")
        assert c.thin_id not in (0, 1)
        assert witness.thin_ids(pool.name) == {0, 1, c.thin_id}
        assert witness.table(c.dm_name)[0].split()[-1] == str(c.thin_id)
    finally:
        os.close(fd)
    wait_gone(b)
    # Once the delete goes through, id 1 is free again and handed out: it
    # was held back for the queued delete, never taken for the kernel's.
    d = pool.create_thin("d", "8M")
    assert d.thin_id == 1
    assert witness.thin_ids(pool.name) == {0, 1, c.thin_id}
    assert witness.table(d.dm_name)[0].split()[-1] == "1"
    assert pool.info().deferred_deleted_count == 0


def test_a_name_freed_by_a_queued_delete_is_taken_once_its_device_is_gone(pool):
    dev = pool.create_thin("vol", "8M")
    write_pattern(dev.path, 0x44)
    fd = os.open(busy(dev).path, os.O_RDONLY)
    try:
        dev.delete()
        # The old device-mapper device still exists until the close.
        with pytest.raises(libdm.DeviceExistsError, match="exists already"):
            pool.create_thin("vol", "8M")
        assert pool.info().deferred_deleted_count == 1
    finally:
        os.close(fd)
    wait_gone(dev)
    new = pool.create_thin("vol", "8M")
    assert pool.info().deferred_deleted_count == 0
    assert witness.thin_ids(pool.name) == {new.thin_id}
    with open(new.path, "rb") as fh:
        assert fh.read(MiB) == bytes(MiB)  # a new device, not the old data


def test_a_queued_delete_waits_while_the_pool_is_read_only(pool):
    keep = pool.create_thin("keep", "8M")
    dev = pool.create_thin("vol", "8M")
    fd = os.open(busy(dev).path, os.O_RDONLY)
    try:
        dev.delete()
    finally:
        os.close(fd)
    wait_gone(dev)
    assert pool.info().deferred_deleted_count == 1
    table = witness.table(pool.name)[0].split()
    witness.dmsetup("suspend", pool.name)
    witness.dmsetup("reload", pool.name, "--table", " ".join([*table[:7], "1", "read_only"]))
    witness.dmsetup("resume", pool.name)
    # A read-only pool refuses changes with the reason and what to run
    # (the kernel refuses every message now, the queued delete included:
    # it must wait, not turn into a bare EOPNOTSUPP).
    for attempt in (
        lambda: pool.create_thin("x", "1M"),
        lambda: keep.snapshot("s"),
        lambda: keep.delete(),
    ):
        with pytest.raises(libdm.PoolReadOnlyError, match="thin_repair"):
            attempt()
    assert keep.active
    witness.dmsetup("suspend", pool.name)
    witness.dmsetup("reload", pool.name, "--table", " ".join(table))
    witness.dmsetup("resume", pool.name)
    # Read-write again: the same Pool object drains the queue and changes work.
    x = pool.create_thin("x", "1M")
    assert x.thin_id == 1  # the id freed by the retried delete
    assert witness.thin_ids(pool.name) == {0, 1}
    assert pool.info().deferred_deleted_count == 0
    assert witness.transaction_id(pool.name) == 4  # keep, vol, delete vol, x
    assert sorted(d.name for d in pool.devices()) == ["keep", "x"]


# -- both off: busy devices make the call fail, nothing is lost ------------------------


def test_deactivate_of_a_busy_device_fails_without_deferred_removal(strict_pool):
    dev = strict_pool.create_thin("vol", "8M")
    write_pattern(dev.path, 0x66)
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(libdm.DeviceBusyError, match="still busy after") as caught:
            dev.deactivate()
        # The remedy is the pool's setting, not the device call's own
        # ``deferred=True``, which a pool's caller cannot pass.
        assert caught.value.remedy == libdm.RemedyCall(
            "configure",
            "removes a busy device when its last user closes it",
            strict_pool.directory,
            (("deferred_removal", True),),
        )
        assert "Pool.configure(deferred_removal=True)" in str(caught.value)
        proc = subprocess.run(
            [sys.executable, "-m", "libdm", "thin", "deactivate", "vol",
             "--pool", strict_pool.directory],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert (
            f"libdm pool set --pool {strict_pool.directory} --deferred-removal on "
            "removes a busy device" in proc.stderr
        ), proc.stderr
        assert dev.dm_name in witness.names()
        assert not deferred_remove_pending(dev.dm_name)
        assert strict_pool.device("vol").active
    finally:
        os.close(fd)
    assert dev.dm_name in witness.names()
    dev.deactivate()  # not busy any more
    assert dev.dm_name not in witness.names()
    assert witness.thin_ids(strict_pool.name) == {0}


def test_delete_of_a_busy_device_fails_without_deferred_deletion(strict_pool):
    dev = strict_pool.create_thin("vol", "8M")
    write_pattern(dev.path, 0x67)
    tx = witness.transaction_id(strict_pool.name)
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(libdm.DeviceBusyError) as caught:
            dev.delete()
        assert caught.value.remedy.arguments == (("deferred_removal", True),)
        assert dev.dm_name in witness.names()
        assert not deferred_remove_pending(dev.dm_name)
        assert [d.name for d in strict_pool.devices()] == ["vol"]
        assert strict_pool.device("vol").active
        assert witness.thin_ids(strict_pool.name) == {0}
        assert witness.transaction_id(strict_pool.name) == tx
        assert strict_pool.info().deferred_deleted_count == 0
        with open(dev.path, "rb") as fh:
            assert fh.read(MiB) == b"\x67" * MiB
    finally:
        os.close(fd)
    dev.delete()
    assert dev.dm_name not in witness.names()
    assert witness.thin_ids(strict_pool.name) == set()
    assert witness.transaction_id(strict_pool.name) == tx + 1


def test_deferred_removal_without_deferred_deletion(make_pool):
    p = make_pool(data_size="64M", deferred_removal=True, deferred_deletion=False)
    dev = p.create_thin("vol", "8M")
    fd = os.open(busy(dev).path, os.O_RDONLY)
    try:
        with pytest.raises(libdm.DeviceBusyError) as caught:
            dev.delete()
        assert caught.value.remedy == libdm.RemedyCall(
            "configure",
            "deletes a busy device when its last user closes it",
            p.directory,
            (("deferred_deletion", True),),
        )
        # The removal was deferred, the delete was not queued.
        assert deferred_remove_pending(dev.dm_name)
        assert [d.name for d in p.devices()] == ["vol"]
        assert p.info().deferred_deleted_count == 0
        assert witness.thin_ids(p.name) == {0}
    finally:
        os.close(fd)
    wait_gone(dev)
    assert not p.device("vol").active
    p.device("vol").delete()
    assert witness.thin_ids(p.name) == set()
    assert p.devices() == []


@pytest.mark.parametrize("change", ["snapshot", "resize"])
def test_a_change_leaves_no_node_for_a_device_whose_removal_is_pending(pool, change):
    """A deferred deactivation drops the device's node while its holder
    keeps it.  A snapshot of it (which suspends and resumes it) or a
    resize (a reload and a resume) must not make the node again: the node
    would outlive the device and name the device number the kernel hands
    to the pool's next device, so writing to the old path would write
    there."""
    dev = pool.create_thin("a", "16M")
    path = dev.path
    fd = os.open(busy(dev).path, os.O_RDONLY)
    try:
        dev.deactivate()
        assert deferred_remove_pending(dev.dm_name) and not os.path.lexists(path)
        if change == "snapshot":
            dev.snapshot("s")
        else:
            dev.resize("32M")
        assert not os.path.lexists(path)
    finally:
        os.close(fd)
    wait_gone(dev)
    c = pool.create_thin("c", "16M")
    write_pattern(c.path, 0x4D, 0, MiB)
    assert not os.path.lexists(path)
