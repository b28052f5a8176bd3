"""A provisioning process killed (SIGKILL) at each step of a change, then
``Pool.open`` in this process: the store, the kernel's table/status and
the thin ids thin_dump reads must agree, with no leaked id."""

import os
import signal
import subprocess
import sys

import pytest
from support import reliability, witness
from support.blockio import write_pattern
from support.children import run_child
from support.cli import run_cli as cli

import libdm
from libdm.thin import crash
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel

# What the child does before the change under test, and the change.
SETUP = {
    "create": "",
    "snapshot": "p.create_thin('origin', '8M')\n",
    "delete": "p.create_thin('victim', '8M')\n",
}
CHANGE = {
    "create": "p.create_thin('new', '8M')\n",
    "snapshot": "p.device('origin').snapshot('new')\n",
    "delete": "p.device('victim').delete()\n",
}
CASES = [
    ("create", "create:intent"),
    ("create", "create:message"),
    ("create", "create:transaction"),
    ("create", "create:recorded"),
    ("snapshot", "create:intent"),
    ("snapshot", "snapshot:suspended"),
    ("snapshot", "create:message"),
    ("create", "create:activated"),
    ("snapshot", "create:activated"),
    ("snapshot", "create:transaction"),
    ("delete", "delete:deactivated"),
    ("delete", "delete:intent"),
    ("delete", "delete:message"),
    ("delete", "delete:transaction"),
]


def assert_consistent(pool):
    """The three views agree: store, kernel status, thin ids on disk."""
    store = Store(pool.directory)
    try:
        assert store.intents() == []
        assert store.transaction_id() == witness.transaction_id(pool.name)
        recorded = {row.thin_id for row in store.devices()}
        queued = {queued.thin_id for queued in store.deferred_deletes()}
        assert witness.thin_ids(pool.name) == recorded | queued
        for row in store.devices():
            dm_name = pool.device_dm_name(row.name)
            assert (dm_name in witness.names()) == row.active, row
            if row.active:
                assert witness.sysfs(dm_name, "suspended") == "0"
                assert witness.table(dm_name)[0].split()[-1] == str(row.thin_id)
    finally:
        store.close()


def test_every_crash_point_is_covered():
    from test_pool_trust import CASES as GROWTH_CASES

    covered = {point for _, point in CASES + GROWTH_CASES} | {
        "pool:made",
        "pool:created",
        "resize_device:recorded",
        "activate:made",
        "deactivate:removed",
    }  # resize_device in test_thin_resize.py, the (de)activations in test_recovery.py
    assert covered == set(crash.POINTS)


@pytest.mark.parametrize("change, point", CASES)
def test_crash_at_each_step_leaves_nothing_inconsistent(dm_name, tmp_path, change, point):
    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M").close()
    if SETUP[change]:
        assert run_child(directory, SETUP[change]).returncode == 0
    proc = run_child(directory, CHANGE[change], crash_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # it really died there
    pool = libdm.Pool.open(directory)
    try:
        assert_consistent(pool)
        names = {d.name for d in pool.devices()}
        # The change either happened completely or not at all.
        if change == "delete":
            assert names in ({"victim"}, set())
        else:
            assert "new" in names or witness.thin_ids(pool.name) == (
                {0} if change == "snapshot" else set()
            )
        # The pool still works after recovery.
        pool.create_thin("after", "4M")
        assert_consistent(pool)
        reliability.record("named crash points", trials=1, crash_points=1, disagreements=0)
    finally:
        pool.close()


def test_crash_after_the_pool_device_is_made(dm_name, tmp_path):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    code = f"import libdm\nlibdm.Pool.create_loop({name!r}, {str(directory)!r}, data_size='64M')\n"
    env = dict(os.environ, LIBDM_CRASH_AT="pool:created")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pool = libdm.Pool.open(directory)
    try:
        pool.create_thin("vol", "4M")
        assert_consistent(pool)
    finally:
        pool.close()


def test_a_creation_killed_before_its_record_is_taken_back_by_the_next(dm_name, tmp_path):
    """Killed after its store and files were made, before it recorded the
    pool: open says what to run, the same creation run again takes back
    what was left (nothing in the kernel; the files it recorded making, by
    inode) and makes the pool; a file put in their place is refused."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    create = ["pool", "create", name, "--loop", str(directory), "--data-size", "64M"]
    proc = cli(*create, env={"LIBDM_CRASH_AT": "pool:made"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert witness.info(name) is None
    proc = cli("pool", "open", directory)
    assert proc.returncode == 1 and "run again takes back" in proc.stderr, proc.stderr
    # A data file put there meanwhile (another file under the name) is
    # not the one the creation made: refused, and kept.
    data = directory / "data"
    data.rename(directory / "moved")
    data.write_bytes(b"precious")
    proc = cli(*create)
    assert proc.returncode == 1 and str(data) in proc.stderr, proc.stderr
    assert data.read_bytes() == b"precious"
    data.unlink()
    (directory / "moved").rename(data)
    # Its own file back: the creation runs again and takes back what was left.
    proc = cli(*create)
    assert proc.returncode == 0, proc.stderr
    pool = libdm.Pool.open(directory)
    try:
        pool.create_thin("vol", "4M")
        assert_consistent(pool)
    finally:
        pool.destroy(remove_files=True)


def test_a_crash_loop_in_the_same_change_is_idempotent(dm_name, tmp_path):
    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M").close()
    for _ in range(3):
        proc = run_child(directory, CHANGE["create"], crash_at="create:message")
        assert proc.returncode == -signal.SIGKILL
    pool = libdm.Pool.open(directory)
    try:
        assert_consistent(pool)
        assert pool.devices() == [] and witness.thin_ids(pool.name) == set()
    finally:
        pool.close()


def test_a_device_left_without_its_node_gets_one_at_open(dm_name, tmp_path):
    """A kill between the ioctl that made a thin device and libdevmapper
    making its /dev/mapper node (no udev here) leaves it live without a
    node: open makes the node, so the device's path works again."""
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    dev = pool.create_thin("vol", "4M")
    write_pattern(dev.path, 0x6B)
    path = dev.path
    pool.close()
    os.unlink(path)  # as the kill left it: live, no node
    pool = libdm.Pool.open(directory)
    try:
        assert os.path.exists(path)
        assert witness.checksum(pool.device("vol").path) == witness.checksum(path)
        assert_consistent(pool)
    finally:
        pool.close()


def test_a_half_made_device_is_made_again(dm_name, tmp_path):
    # A create killed between its create and load ioctls leaves a device
    # with no table; Pool.open must replace it, not trip over it.
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    dev = pool.create_thin("vol", "4M")
    table = witness.table(dev.dm_name)
    uuid = witness.info(dev.dm_name)["uuid"]  # set by the create ioctl, before the load
    pool.close()
    witness.dmsetup("remove", dev.dm_name)
    witness.dmsetup("create", dev.dm_name, "--notable", "--uuid", uuid)
    assert witness.info(dev.dm_name)["attr"].startswith("-")  # no live table
    again = libdm.Pool.open(directory)
    try:
        assert witness.table(dev.dm_name) == table
        assert_consistent(again)
    finally:
        again.close()


def test_only_the_testing_package_arms_crash_points():
    # Production code never reads LIBDM_CRASH_AT: a process without the
    # harness's bootstrap on PYTHONPATH is not armed by it.
    code = (
        "from libdm.thin import crash\n"
        "crash.point('create:intent')\n"
        "print('alive', crash._armed)\n"
    )
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bare["LIBDM_CRASH_AT"] = "create:intent"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=bare, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout == "alive None\n", proc.stderr
    # With the bootstrap (as every child of this test session has), it is.
    armed = dict(os.environ, LIBDM_CRASH_AT="create:intent")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=armed, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL
