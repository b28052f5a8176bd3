"""Recovery settles what was interrupted, and only that.

The one recovery path (the pool's bring-up) runs at ``Pool.open`` and at
any change that finds a mark a kill left.  It must not undo a change that
finished (a deactivation whose removal the kernel defers to the device's
last user), a refusal must leave no mark behind (or the next change
reports an interruption that never happened), ``Pool.settle`` must report
only what it settled under the lock, and what a create killed past its
activation made is listed, readable and taken down by ``destroy``.
Witnesses: dmsetup through :mod:`support.witness`, the store read by a
store of its own, the CLI's exit status and output.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from support import witness
from support.blockio import MiB, write_pattern
from support.children import run_child
from support.cli import run_cli
from test_pool_crash import assert_consistent

import libdm
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel


def stored(directory):
    """(the activation mark, {name: recorded active}) from the store."""
    store = Store(directory)
    try:
        return store.activation_intent(), {row.name: row.active for row in store.devices()}
    finally:
        store.close()


def test_a_finished_deferred_deactivation_stays_done(make_pool, tmp_path):
    """With deferred removal, deactivating an open device succeeds and its
    removal waits for the last user.  A later bring-up (``pool open``)
    must not take that back: not record it active, not cancel the
    removal."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    dev = pool.create_thin("a", "8M")
    dm_name = pool.device_dm_name("a")
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        dev.deactivate()
        assert witness.info(dm_name) is not None  # still open: removal deferred
        assert stored(directory) == (None, {"a": False})
        proc = run_cli("pool", "open", directory)
        assert proc.returncode == 0, proc.stderr
        assert stored(directory) == (None, {"a": False})
    finally:
        os.close(fd)
    # The last user gone, the kernel finishes the removal it was asked for.
    deadline = time.monotonic() + 10
    while dm_name in witness.names() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dm_name not in witness.names()


def test_a_refused_deactivation_leaves_no_mark(make_pool, tmp_path, caplog):
    """Without deferred removal a busy device's deactivation is refused:
    nothing changed, so nothing is left for the next change to settle."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    pool.configure(deferred_removal=False)
    dev = pool.create_thin("a", "8M")
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(libdm.DeviceBusyError):
            dev.deactivate()
        assert stored(directory) == (None, {"a": True})
        assert pool.settle() is None
        with caplog.at_level("WARNING", logger="libdm"):
            pool.create_thin("b", "8M")
        assert not [r for r in caplog.records if "interrupted" in r.getMessage()]
    finally:
        os.close(fd)
    assert pool.device_dm_name("a") in witness.names()


def test_settle_reports_only_what_it_settled(make_pool, tmp_path):
    """A mark read before the lock may be another process's change under
    way; once it has the lock and nothing is left, settle says nothing."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    pool.create_thin("a", "8M")
    other = libdm.Pool.load(directory)
    said = []
    try:
        with pool._core.changing("activate"):  # another change, holding the lock
            pool._core.mark_activation("a")
            watcher = threading.Thread(target=lambda: said.append(other.settle()))
            watcher.start()
            time.sleep(1)  # it has read the mark and waits for the lock
            pool._core.drop_activation_intent()
        watcher.join(timeout=60)
    finally:
        other.close()
    assert said == [None]


@pytest.mark.parametrize("point", ["create:transaction", "create:activated"])
def test_a_create_killed_past_its_kernel_step_is_listed(dm_name, tmp_path, point):
    """The kernel has the new device, the store not yet: every listing
    shows it (as the next change will record it), and reading it works."""
    directory = tmp_path / "pool"
    held = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    try:
        proc = run_child(directory, "p.create_thin('new', '8M')\n", crash_at=point)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        with libdm.Pool.load(directory) as pool:
            listed = {d.name: d.active for d in pool.devices()}
            assert listed == {"new": point == "create:activated"}
        for args in (["thin", "ls"], ["thin", "ls", "--json"], ["thin", "ls", "--tree"]):
            out = run_cli(*args, "--pool", directory)
            assert out.returncode == 0, out.stderr
            assert "new" in out.stdout
        rows = json.loads(run_cli("thin", "ls", "--json", "--pool", directory).stdout)
        assert [r["name"] for r in rows] == ["new"]
    finally:
        held.close()


def test_destroy_takes_down_what_a_killed_create_made(dm_name, tmp_path):
    """A create killed after its activation left a live device no record
    names yet: destroy takes it down too (it would hold the pool busy for
    good), and open brings the pool back with the device recorded."""
    directory = tmp_path / "pool"
    name = dm_name("pool")
    libdm.Pool.create_loop(name, directory, data_size="64M").close()
    proc = run_child(directory, "p.create_thin('new', '8M')\n", crash_at="create:activated")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert f"{name}-new" in witness.names()
    out = run_cli("pool", "destroy", "--pool", directory)
    assert out.returncode == 0, out.stderr
    assert not {n for n in witness.names() if n == name or n.startswith(f"{name}-")}
    pool = libdm.Pool.open(directory)
    try:
        assert_consistent(pool)
        assert {d.name: d.active for d in pool.devices()} == {"new": True}
    finally:
        pool.close()


def test_a_pool_not_brought_up_says_to_open_it(make_pool, tmp_path):
    """After a reboot, before ``Pool.open``: a change or a device's use
    says the pool is not active and what brings it up, in the library's
    words (the CLI says it as its command)."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    write_pattern(pool.create_thin("vol", "8M").path, 0x21, 0, MiB)
    pool.destroy()  # a reboot: nothing live, files and store kept
    later = libdm.Pool.load(directory)
    try:
        for call in (lambda: later.device("vol").activate(), lambda: later.create_thin("x", "8M")):
            with pytest.raises(libdm.NoSuchDeviceError) as caught:
                call()
            assert "is not active" in str(caught.value), caught.value
            assert caught.value.remedy == libdm.RemedyCall(
                "open", "brings it up", str(directory)
            ), caught.value
    finally:
        later.close()


def test_a_live_device_without_its_node_gets_one_when_used(make_pool, tmp_path):
    pool = make_pool(directory=tmp_path / "pool", data_size="64M")
    dev = pool.create_thin("vol", "8M")
    os.unlink(dev.path)  # as a kill between the create ioctl and the node leaves it
    path = pool.ready_device("vol")
    assert os.path.exists(path)
    dev.format()  # a use that needs the node


def test_a_table_another_program_loaded_on_the_pool_is_left_alone(make_pool, tmp_path):
    """No change of libdm's leaves the pool carrying an inactive table (its
    growths finish from their intents first): every change, and
    ``Pool.open`` too, refuses such a pool, naming its state, instead of
    dropping another program's table; with or without a kill's mark."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    pool.create_thin("a", "8M")
    pool.create_thin("b", "8M").deactivate()
    name = pool.name
    # (The child opens the pool with Pool.open: the other program loads
    # its table after the kill.)
    proc = run_child(directory, "p.device('b').activate()\n", crash_at="activate:made")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    fields = witness.table(name)[0].split()
    fields[6] = "100"  # another low water mark
    theirs = " ".join(fields)
    witness.dmsetup("reload", name, "--table", theirs)
    for attempt in (
        lambda p: p.create_thin("z", "8M"),  # with the kill's mark
        lambda p: p.create_thin("y", "8M"),  # and again
        lambda p: p.resize(data_size="96M"),  # a growth would load its own
        lambda p: libdm.Pool.open(directory),
    ):
        with (
            libdm.Pool.load(directory) as later,
            pytest.raises(libdm.StateError, match="carrying an inactive table") as caught,
        ):
            attempt(later)
        assert "another program" in str(caught.value) and caught.value.remedy is None
        assert witness.info(name)["attr"][1] == "I"  # its inactive table is still there
        assert witness.table(name, inactive=True)[0] == theirs
    assert {"z", "y"}.isdisjoint(d.name for d in libdm.Pool.load(directory).devices())
    # Once the other program is done, the pool works again.
    witness.dmsetup("clear", name)
    libdm.Pool.open(directory).create_thin("z", "8M")


def test_a_pool_another_program_suspended_is_refused_at_once(make_pool, tmp_path):
    """A change on a pool another program suspended is refused before it
    sends anything: a message would fail half way, and a snapshot would
    wait on the suspended pool holding the pool's lock."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    dev = pool.create_thin("a", "8M")
    write_pattern(dev.path, 0x3C, 0, MiB)
    tx = witness.transaction_id(pool.name)
    witness.dmsetup("suspend", pool.name)
    try:
        for args in (("thin", "create", "d", "8M"), ("thin", "snapshot", "a", "s")):
            proc = run_cli(*args, "--pool", directory, timeout=60)
            assert proc.returncode == 1, proc.stderr
            assert "is suspended" in proc.stderr and "another program" in proc.stderr
        with pytest.raises(libdm.StateError, match="is suspended"):
            libdm.Pool.open(directory)
        with (
            libdm.Pool.load(directory) as later,
            pytest.raises(libdm.ChangedByAnotherError, match="is suspended"),
        ):
            later.resize(data_size="96M")  # a growth would resume it
        assert witness.info(pool.name)["attr"][2] == "s"  # still as they left it
    finally:
        witness.dmsetup("resume", pool.name)
    assert witness.transaction_id(pool.name) == tx
    assert stored(directory) == (None, {"a": True})
    pool.create_thin("d", "8M")


def test_a_length_another_program_loaded_is_not_undone(make_pool, tmp_path):
    """Only a resize of libdm's, marked in the store, is finished by the
    bring-up: a device another program grew is left as it is (and said
    unavailable), not cut back to its recorded length."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    dev = pool.create_thin("a", "16M")
    dm_name = dev.dm_name
    fields = witness.table(dm_name)[0].split()
    fields[1] = str(32 * MiB // 512)
    witness.dmsetup("reload", dm_name, "--table", " ".join(fields))
    witness.dmsetup("resume", dm_name)
    write_pattern(dev.path, 0x5A, 20 * MiB, MiB)
    proc = run_cli("pool", "open", directory)
    assert witness.table(dm_name)[0].split()[1] == str(32 * MiB // 512), proc.stderr
    # Said, not silently undone; and its data being fine, deleting it is
    # not what the user is told to do.
    assert proc.returncode == 1, proc.stderr
    assert "device a could not be activated" in proc.stderr, proc.stderr
    assert "another program" in proc.stderr and "thin delete" not in proc.stderr, proc.stderr
    with libdm.Pool.load(directory) as later:
        later.device("a")  # still recorded
    with open(dev.path, "rb") as fh:
        fh.seek(20 * MiB)
        assert fh.read(MiB) == bytes([0x5A]) * MiB


def test_recovery_resumes_only_the_origin_a_killed_snapshot_suspended(make_pool, tmp_path):
    """libdm suspends a thin device only around a snapshot of it, under the
    snapshot's intent: the recovery resumes that origin, and leaves alone
    a device another program suspended (reported unavailable, not to be
    deleted)."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    for name in ("a", "b", "o"):
        pool.create_thin(name, "8M")
    theirs, origin = pool.device_dm_name("a"), pool.device_dm_name("o")
    witness.dmsetup("suspend", theirs)
    try:
        proc = run_cli("thin", "snapshot", "o", "s", "--pool", directory,
                       env={"LIBDM_CRASH_AT": "snapshot:suspended"})  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert witness.info(origin)["attr"][2] == "s"  # the kill left it suspended
        proc = run_cli("thin", "create", "c", "8M", "--pool", directory)
        assert proc.returncode == 0, proc.stderr
        assert witness.info(origin)["attr"][2] != "s"  # libdm's suspend: resumed
        assert witness.info(theirs)["attr"][2] == "s"  # theirs: left as it is
        with libdm.Pool.load(directory) as later:
            assert {d.name for d in later.devices()} == {"a", "b", "o", "c"}
        proc = run_cli("pool", "open", directory)
        assert proc.returncode == 1, proc.stderr
        assert f"{theirs} is suspended" in proc.stderr and "thin delete" not in proc.stderr
        assert witness.info(theirs)["attr"][2] == "s"
    finally:
        witness.dmsetup("resume", theirs)


@pytest.mark.parametrize("how", ["lazy-open", "killed-open"])
def test_recovery_leaves_a_lazy_pool_lazy(make_pool, tmp_path, how):
    """A pool opened lazily, or whose eager open was killed, has devices
    recorded active but down until their first use.  The recovery a later
    change runs (here after a killed deactivation) settles what the kill
    left and brings no other device up: in a pool of thousands, that is
    the open's work, not a ``thin create``'s.  The next eager open brings
    them all up."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    for name in ("a", "b", "c"):
        pool.create_thin(name, "8M")
    down = [pool.device_dm_name(name) for name in ("a", "b", "c")]
    pool.destroy()  # a reboot: nothing live, files and store kept
    if how == "lazy-open":
        libdm.Pool.open(directory, lazy=True).close()
    else:
        # Killed as it is about to activate the second device.
        killed = (
            "import os, signal, libdm\n"
            f"libdm.Pool.open({str(directory)!r}, progress=lambda done, total: "
            "done == 2 and os.kill(os.getpid(), signal.SIGKILL))\n"
        )
        proc = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        down = [name for name in down if name not in witness.names()]
        assert len(down) == 2, witness.names()
    with libdm.Pool.load(directory) as later:
        d = later.create_thin("d", "8M")
        e_name = later.device_dm_name("e")
    proc = run_cli("thin", "deactivate", "d", "--pool", directory,
                   env={"LIBDM_CRASH_AT": "deactivate:removed"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert stored(directory)[0] == "d"  # the kill's mark
    proc = run_cli("thin", "create", "e", "8M", "--pool", directory)
    assert proc.returncode == 0, proc.stderr
    mark, active = stored(directory)
    assert mark is None
    names = witness.names()
    assert not set(down) & names, names  # still down, still recorded active
    assert active["a"] and active["b"] and active["c"]
    assert d.dm_name not in names and active["d"]  # the kill's record stands
    assert e_name in names
    # The next eager open brings every recorded-active device up.
    libdm.Pool.open(directory).close()
    assert set(down) | {d.dm_name} <= witness.names()
    store = Store(directory)
    try:
        assert not store.lazy()
    finally:
        store.close()


def test_a_long_lived_pool_follows_the_pool_device_brought_up_again(make_pool, tmp_path):
    """A process that keeps a pool (a service) caches the pool device's
    number.  Another process takes the pool down and opens it again, and
    another program's device gets the old number: the kept pool must find
    its own devices, not call them foreign, and name no other device as
    the pool."""
    directory = tmp_path / "pool"
    pool = make_pool(directory=directory, data_size="64M")
    pool.create_thin("a", "8M")
    other = f"{pool.name}x"
    held = libdm.Pool.load(directory)
    try:
        assert held.device("a").active and held.ready_device("a")
        assert run_cli("pool", "destroy", "--pool", directory).returncode == 0
        witness.dmsetup("create", other, "--table", "0 8 zero")  # takes the old number
        assert run_cli("pool", "open", directory).returncode == 0
        assert held.device("a").active
        assert held.ready_device("a") == f"/dev/mapper/{pool.device_dm_name('a')}"
    finally:
        held.close()
        witness.dmsetup("remove", other)
