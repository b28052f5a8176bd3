"""A change a kill (or a full state filesystem) interrupted is finished by
whichever entry point changes the pool next, not only by ``Pool.open``:
the library (a ``Pool`` however it was obtained, the one whose own change
failed included), the CLI, the monitor service and the snapshotter.  Until
then, a device whose delete is pending is neither listed nor activatable,
and a pool left suspended is not reported writable.  Witnesses: dmsetup,
sysfs and thin_dump, through :mod:`support.witness`.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from support import witness
from support.blockio import MiB, read_at, write_pattern
from support.children import run_child
from support.cli import monitor_status, run_cli, start_monitor, stop_monitor
from support.poll import until
from test_pool_crash import assert_consistent

import libdm
from libdm.thin.records import Op
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel

SETUP = {"create": "", "delete": "p.create_thin('victim', '8M')\n"}
CHANGE = {"create": "p.create_thin('new', '8M')\n", "delete": "p.device('victim').delete()\n"}
KILLS = [
    ("create", "create:intent"),
    ("create", "create:transaction"),
    ("create", "create:activated"),
    # Once recorded, a device is live: no entry point but Pool.open
    # activates devices, so a record must never run ahead of the kernel.
    ("create", "create:recorded"),
    ("delete", "delete:deactivated"),
]


def killed(directory, change, point):
    """Run ``change`` in a child killed at ``point``."""
    if SETUP[change]:
        assert run_child(directory, SETUP[change]).returncode == 0
    proc = run_child(directory, CHANGE[change], crash_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # it really died there


def pending(directory):
    """The intents the store holds (read by a store of its own)."""
    store = Store(directory)
    try:
        return store.intents(), store.growth_intent()
    finally:
        store.close()


def check_outcome(pool, change, point):
    """The interrupted change happened completely, or not at all, and the
    three views (store, kernel, thin_dump) agree."""
    assert_consistent(pool)
    names = {d.name for d in pool.devices()}
    if change == "delete":
        # Past its discard, a delete must finish: its data may be gone.
        assert "victim" not in names
        assert pool.device_dm_name("victim") not in witness.names()
    elif point in ("create:transaction", "create:activated", "create:recorded"):
        # The kernel had it: recorded, and active as a create leaves it.
        assert "new" in names
        assert pool.device_dm_name("new") in witness.names()
    else:
        assert "new" not in names


def create_after(entry, held, directory):
    """Create device "after" through ``entry``: ``held``, a Pool this
    process had open all along; a Pool loaded as the CLI loads it (nothing
    activated, nothing recovered); or the CLI."""
    if entry == "library":
        assert held.create_thin("after", "4M").active
    elif entry == "load":
        with libdm.Pool.load(directory) as pool:
            pool.create_thin("after", "4M")
    else:
        proc = run_cli("thin", "create", "--pool", directory, "after", "4M")
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("change, point", KILLS)
@pytest.mark.parametrize("entry", ["library", "load", "cli"])
def test_the_next_change_finishes_an_interrupted_one(dm_name, tmp_path, entry, change, point):
    directory = tmp_path / "pool"
    held = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    try:
        killed(directory, change, point)
        if point != "create:recorded":  # the one point past the intent
            assert pending(directory)[0], "the kill left no intent to recover"
        create_after(entry, held, directory)
        assert pending(directory) == ([], None)
        with libdm.Pool.load(directory) as pool:
            check_outcome(pool, change, point)
            assert "after" in {d.name for d in pool.devices()}
    finally:
        held.close()


@pytest.mark.parametrize("change", ["activate", "deactivate"])
@pytest.mark.parametrize("entry", ["library", "load", "cli"])
def test_the_next_change_settles_an_interrupted_activation(dm_name, tmp_path, entry, change):
    """An activation killed between its kernel step and its record left the
    device live but recorded inactive (a deactivation: gone but recorded
    active).  The next change through any entry point, not only Pool.open,
    makes the record and the kernel agree again."""
    directory = tmp_path / "pool"
    held = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    try:
        victim = held.create_thin("victim", "8M")
        if change == "activate":
            victim.deactivate()
        point = f"{change}:{'made' if change == 'activate' else 'removed'}"
        proc = run_child(directory, f"p.device('victim').{change}()\n", crash_at=point)
        assert proc.returncode == -signal.SIGKILL, proc.stderr  # it really died there
        live = held.device_dm_name("victim") in witness.names()
        assert live == (change == "activate")  # the kernel step was done
        create_after(entry, held, directory)
        with libdm.Pool.load(directory) as pool:
            assert_consistent(pool)
            assert "after" in {d.name for d in pool.devices()}
    finally:
        held.close()


@pytest.mark.parametrize("entry", ["library", "load", "cli"])
def test_the_next_change_finishes_an_interrupted_resize(dm_name, tmp_path, entry):
    """A resize killed between its record and its reload left the live
    device at its old length; the next change through any entry point
    (not only Pool.open, which reactivates) brings it to the recorded one.
    Found by the crowded-host state machine at its full count."""
    directory = tmp_path / "pool"
    held = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    try:
        vol = held.create_thin("vol", "16M")
        proc = run_child(
            directory, "p.device('vol').resize('24M')\n", crash_at="resize_device:recorded"
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert witness.table(vol.dm_name)[0].split()[1] == str(16 * MiB // 512)
        create_after(entry, held, directory)
        assert witness.table(vol.dm_name)[0].split()[1] == str(24 * MiB // 512)
        with libdm.Pool.load(directory) as pool:
            assert int(pool.device("vol").size) == 24 * MiB
            assert_consistent(pool)
    finally:
        held.close()


@pytest.mark.parametrize("entry", ["library", "load", "cli"])
def test_an_interrupted_shrink_gives_back_what_it_cut_off(dm_name, tmp_path, entry):
    """A shrink killed after its record, before its discard and reload:
    the next change gives the blocks past the new end back, so a later
    growth reads zeros there, never the old data."""
    directory = tmp_path / "pool"
    held = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    try:
        vol = held.create_thin("vol", "16M")
        write_pattern(vol.path, 7, length=16 * MiB)
        proc = run_child(
            directory,
            "p.device('vol').resize('8M', force=True)\n",
            crash_at="resize_device:recorded",
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        create_after(entry, held, directory)
        assert witness.table(vol.dm_name)[0].split()[1] == str(8 * MiB // 512)
        grown = held.device("vol").resize("16M")
        assert read_at(grown.path, 8 * MiB, 8 * MiB) == bytes(8 * MiB)
        assert read_at(grown.path, 0, 8 * MiB) == bytes([7]) * (8 * MiB)
    finally:
        held.close()


def test_a_shrink_whose_record_fails_discards_nothing(dm_name, tmp_path, monkeypatch):
    """The store refuses the new size (a full state filesystem, say): the
    error says nothing changed, and nothing did.  Found by an outside
    review: the blocks past the new end were discarded first."""
    pool = libdm.Pool.create_loop(dm_name("pool"), tmp_path / "pool", data_size="64M")
    try:
        vol = pool.create_thin("vol", "16M")
        write_pattern(vol.path, 9, length=16 * MiB)

        def refused(self, name, old=None):
            raise libdm.StateError("could not write the pool state (test)", "change", None)

        monkeypatch.setattr(Store, "set_resize_intent", refused)
        with pytest.raises(libdm.StateError):
            vol.resize("8M", force=True)
        monkeypatch.undo()
        assert int(pool.device("vol").size) == 16 * MiB
        assert witness.table(vol.dm_name)[0].split()[1] == str(16 * MiB // 512)
        assert read_at(vol.path, 0, 16 * MiB) == bytes([9]) * (16 * MiB)
    finally:
        pool.close()


@pytest.mark.parametrize("entry", ["library", "cli"])
def test_an_interrupted_shrink_of_a_device_opened_since_keeps_its_live_size(
    dm_name, tmp_path, entry
):
    """A shrink killed between its record and its reload, then the device
    opened: the next change must not cut it under its user (a shrink
    itself refuses an open device).  It keeps the size it has live, and
    the record follows.  Found by an outside review."""
    directory = tmp_path / "pool"
    held = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    try:
        vol = held.create_thin("vol", "16M")
        write_pattern(vol.path, 7, length=8 * MiB)
        proc = run_child(
            directory,
            "p.device('vol').resize('8M', force=True)\n",
            crash_at="resize_device:recorded",
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        with open(vol.path, "rb") as opener:
            create_after(entry, held, directory)
            assert witness.table(vol.dm_name)[0].split()[1] == str(16 * MiB // 512)
            assert opener.read(8 * MiB) == bytes([7]) * (8 * MiB)
        with libdm.Pool.load(directory) as pool:
            assert int(pool.device("vol").size) == 16 * MiB
            assert_consistent(pool)
    finally:
        held.close()


def test_a_device_whose_delete_is_pending_is_neither_listed_nor_activated(dm_name, tmp_path):
    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M").close()
    killed(directory, "delete", "delete:deactivated")
    listing = run_cli("thin", "ls", "--json", "--pool", directory)
    assert listing.returncode == 0, listing.stderr
    assert [row["name"] for row in json.loads(listing.stdout)] == []
    with libdm.Pool.load(directory) as pool:
        assert pool.devices() == []
        with pytest.raises(libdm.NoSuchDeviceError):
            pool.device("victim")
    proc = run_cli("thin", "activate", "--pool", directory, "victim")
    assert proc.returncode != 0, proc.stdout
    assert "victim" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(name.endswith("-victim") for name in witness.names())
    # Pool.open has nothing left to delete behind the user's back.
    with libdm.Pool.open(directory) as pool:
        assert_consistent(pool)
        assert pool.devices() == []


def test_the_pool_whose_own_change_failed_recovers(dm_name, tmp_path):
    """A delete whose set_transaction_id the kernel refused leaves its
    intent (a kill at the same point would too): the same Pool object
    finishes it at its next change instead of refusing every change."""
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    try:
        pool.create_thin("victim", "8M")
        # Another program moves the kernel's transaction id for a moment,
        # so the delete's set_transaction_id is refused.
        txid = witness.transaction_id(pool.name)
        witness.dmsetup("message", pool.name, "0", f"set_transaction_id {txid} {txid + 7}")
        with pytest.raises(libdm.DMError):
            pool.delete_device("victim")
        witness.dmsetup("message", pool.name, "0", f"set_transaction_id {txid + 7} {txid}")
        assert pending(directory)[0]
        pool.create_thin("after", "4M")
        assert pending(directory) == ([], None)
        assert {d.name for d in pool.devices()} == {"after"}
        assert_consistent(pool)
    finally:
        pool.close()


def test_a_pool_left_suspended_mid_resize_is_not_reported_writable(dm_name, tmp_path):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    libdm.Pool.create_loop(name, directory, data_size="64M").close()
    proc = run_child(directory, "p.resize(data_size='96M')\n", crash_at="grow:loaded")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert witness.sysfs(name, "suspended") == "1"
    status = run_cli("pool", "status", "--json", "--pool", directory)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["mode"] != "rw"
    human = run_cli("pool", "status", "--pool", directory)
    assert human.returncode == 0, human.stderr
    mode = [line for line in human.stdout.splitlines() if line.startswith("Mode")]
    assert mode and "rw" not in mode[0] and "suspended" in mode[0], human.stdout
    info = run_cli("pool", "info", "--json", "--pool", directory)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["state"] != "rw"
    # The next change finishes the growth (the pool is resumed on it).
    with libdm.Pool.load(directory) as pool:
        pool.set_low_water_mark(16)
        assert witness.sysfs(name, "suspended") == "0"
        assert int(witness.table(name)[0].split()[1]) == 96 * MiB // 512
        assert pool.config.data_size == 96 * MiB
    assert pending(directory) == ([], None)


def test_a_restarting_monitor_finishes_an_interrupted_growth(dm_name, tmp_path, monkeypatch):
    env = {
        "LIBDM_MONITOR_DIR": str(tmp_path / "monitor.d"),
        "LIBDM_RUN_DIR": str(tmp_path / "run"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    directory = tmp_path / "pool"
    name = dm_name("pool")
    with libdm.Pool.create_loop(name, directory, data_size="64M", min_free_space=0) as pool:
        dev = pool.create_thin("vol", "128M")
        write_pattern(dev.path, 0x5A, length=40 * MiB)  # 62% of 64 MiB
        before = witness.checksum(dev.path, 40 * MiB)
    assert (
        run_cli("monitor", "register", "--pool", directory, "--threshold", 50, env=env).returncode
        == 0
    )
    # The monitor that was growing it was killed with the pool suspended.
    proc = run_child(directory, "p.resize(data_size='96M')\n", crash_at="grow:loaded")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert witness.sysfs(name, "suspended") == "1"
    service = start_monitor(env, "--rescan", 0.2, "--interval", 0.3)

    def watching():
        return monitor_status(env["LIBDM_RUN_DIR"]).get(str(directory), {}).get("running", False)

    try:
        until(watching, "the service to watch the pool", 90)
        until(lambda: witness.sysfs(name, "suspended") == "0", "the pool to be resumed", 90)
        time.sleep(1.5)  # a few of the monitor's checks
        assert watching()
    finally:
        err = stop_monitor(service)
    assert "cannot shrink" not in err, err
    assert int(witness.table(name)[0].split()[1]) >= 96 * MiB // 512, err
    assert pending(directory) == ([], None)
    with libdm.Pool.open(directory) as pool:
        assert pool.config.data_size >= 96 * MiB
        assert witness.checksum(pool.device("vol").path, 40 * MiB) == before


@pytest.mark.parametrize("change, point", KILLS)
def test_the_snapshotter_finishes_a_change_another_process_left(dm_name, tmp_path, change, point):
    from support.containerd.snapshotter_util import Plugin, write_config

    from libdm.snapshotter.client import Client

    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="512M").close()
    config = write_config(
        tmp_path / "config.toml", base_image_size="32M", monitor={"enabled": False}
    )
    sock = str(tmp_path / "snap.sock")
    plugin = Plugin(directory, sock, config, log=tmp_path / "plugin.log").start()
    client = Client(sock, namespace="recovery", timeout=120)
    try:
        client.wait_ready()
        # Another program's change killed while the snapshotter serves the pool.
        killed(directory, change, point)
        if point != "create:recorded":
            assert pending(directory)[0]
        client.prepare("a-1", "")
        client.commit("a", "a-1")
        client.prepare("b-1", "a")
        assert pending(directory) == ([], None)
        with libdm.Pool.load(directory) as pool:
            check_outcome(pool, change, point)
    finally:
        client.close()
        plugin.stop()


@pytest.mark.parametrize("kind", ["loop", "block"])
def test_open_leaves_nothing_live_when_it_refuses(dm_name, tmp_path, kind):
    directory = tmp_path / "pool"
    name = dm_name("pool")
    loops = []
    if kind == "loop":
        pool = libdm.Pool.create_loop(name, directory, data_size="64M")
        files = [directory / "data", directory / "metadata"]
    else:
        files = [tmp_path / "data.img", tmp_path / "meta.img"]
        loops = [_attach(files[0], 128 * MiB), _attach(files[1], 16 * MiB)]
        pool = libdm.Pool.create(name, loops[0], loops[1], state_dir=directory)
    try:
        with pool:
            pool.create_thin("vol", "8M")
            txid = witness.transaction_id(name)
            # Another program moves the transaction id behind the store's back.
            witness.dmsetup("message", name, "0", f"set_transaction_id {txid} {txid + 5}")
            pool.destroy()
        assert not any(n.startswith(name) for n in witness.names())
        with pytest.raises(libdm.StateError, match="another program"):
            libdm.Pool.open(directory)
        # Nothing of the pool is left live: no pool, thin or linear device...
        assert not any(n.startswith(name) for n in witness.names()), witness.names()
        if kind == "loop":
            # ...and no loop device over its files.
            for path in files:
                attached = subprocess.run(
                    ["losetup", "-j", str(path)], capture_output=True, text=True, check=True
                ).stdout
                assert attached == "", attached
    finally:
        if loops:
            subprocess.run(["losetup", "-d", *loops], check=False)


def _attach(path, size):
    with open(path, "wb") as fh:
        fh.truncate(size)
    return subprocess.run(
        ["losetup", "-f", "--show", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_full_state_filesystem_interrupts_nothing_for_good(dm_name, tmp_path):
    """The state directory on a small tmpfs, filled up: a create whose
    outcome cannot be recorded after the kernel made the device fails
    with a libdm error naming the state, and once there is room again the
    same Pool object records it (the device is there, active) and goes on."""
    name = dm_name("pool")
    data = _attach(tmp_path / "data.img", 256 * MiB)
    meta = _attach(tmp_path / "meta.img", 16 * MiB)
    small = tmp_path / "small"
    small.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", small], check=True
    )
    pool = None
    try:
        pool = libdm.Pool.create(name, data, meta, state_dir=small / "state")
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, b"x" * 4096)
            assert full.value.errno == errno.ENOSPC
            size = os.fstat(fd).st_size
            made = None
            for i in range(64):
                try:
                    pool.create_thin(f"v{i}", "4M")
                    continue
                except Exception as exc:
                    error = exc
                if witness.transaction_id(name) != stored_txid(small / "state"):
                    made = f"v{i}"
                    break
                # Refused before the kernel saw it: a little more room, again.
                size -= 1024
                os.ftruncate(fd, size)
            assert made is not None, "no create met a full filesystem after the kernel's step"
            assert isinstance(error, libdm.StateError), repr(error)
            assert str(small / "state") in str(error) and made in str(error)
            os.ftruncate(fd, 0)  # room again
        finally:
            os.close(fd)
        pool.create_thin("after", "4M")
        names = {d.name for d in pool.devices()}
        assert {made, "after"} <= names
        assert pool.device_dm_name(made) in witness.names()
        assert pending(small / "state") == ([], None)
        assert_consistent(pool)
    finally:
        if pool is not None:
            pool.destroy()
        subprocess.run(["umount", small], check=False)
        subprocess.run(["losetup", "-d", data, meta], check=False)


def _fill(fd):
    """Write to ``fd`` until its filesystem is full."""
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC


def _recorded_active(directory, name):
    store = Store(directory)
    try:
        row = store.device(name)
        return None if row is None else row.active
    finally:
        store.close()


@pytest.mark.parametrize("change", ["deactivate", "activate"])
def test_a_change_a_full_state_filesystem_refuses_leaves_the_kernel_as_recorded(
    change, dm_name, tmp_path
):
    """Activation is not journalled: a deactivate (or activate) whose
    record cannot be written takes its kernel step back, so that its
    StateError means nothing changed, and kernel and records agree
    without waiting for a recovery."""
    name = dm_name("pool")
    data = _attach(tmp_path / "data.img", 256 * MiB)
    meta = _attach(tmp_path / "meta.img", 16 * MiB)
    small = tmp_path / "small"
    small.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", small], check=True
    )
    state = small / "state"
    pool = None
    try:
        pool = libdm.Pool.create(name, data, meta, state_dir=state)
        pool.create_thin("a", "4M")
        dm = pool.device_dm_name("a")
        want_live = change == "deactivate"
        refused = None
        for _ in range(8):
            # Before each try, "a" as the change finds it.
            if (dm in witness.names()) != want_live:
                getattr(pool, "activate_device" if want_live else "deactivate_device")("a")
            fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _fill(fd)
                try:
                    getattr(pool, f"{change}_device")("a")
                except libdm.StateError as exc:
                    refused = exc
            finally:
                os.close(fd)
                os.unlink(small / "filler")
            if refused is not None:
                break
            # SQLite found room in pages it already had: again, from the start.
        assert refused is not None, f"no {change} met the full filesystem"
        assert str(state) in str(refused)
        assert (dm in witness.names()) == want_live, f"{change} was refused but done"
        assert _recorded_active(state, "a") is want_live
        # Room again: the change goes through, and kernel and records agree.
        getattr(pool, f"{change}_device")("a")
        assert (dm in witness.names()) != want_live
        assert _recorded_active(state, "a") is not want_live
        assert_consistent(pool)
    finally:
        if pool is not None:
            pool.destroy()
        subprocess.run(["umount", small], check=False)
        subprocess.run(["losetup", "-d", data, meta], check=False)


def stored_txid(directory):
    store = Store(directory)
    try:
        return store.transaction_id()
    finally:
        store.close()


# -- a model: kills at every crash point of a change, then any entry point --------------

POINTS_OF = {
    "create": (
        "create:intent",
        "create:message",
        "create:transaction",
        "create:activated",
        "create:recorded",
    ),
    "delete": ("delete:intent", "delete:deactivated", "delete:message", "delete:transaction"),
}
ENTRIES = ("held", "load", "open", "cli")
MACHINE = {}  # dm_name and tmp_path of the running test


def settled_names(directory, pool_name):
    """The devices the pool must hold once what a kill left is settled,
    from the store's records and intents and the kernel's transaction id
    (read by dmsetup): a create the kernel committed is kept, one it did
    not is undone, and a delete is always finished."""
    store = Store(directory)
    try:
        names = {record.name for record in store.devices()}
        kernel = witness.transaction_id(pool_name)
        for intent in store.intents():
            if intent.op is Op.DELETE:
                names.discard(intent.name)
            elif intent.txid == kernel:
                names.add(intent.name)
        return names
    finally:
        store.close()


class EntryPointMachine(RuleBasedStateMachine):
    """A change killed at a crash point in a child that loaded the pool as
    the CLI does (its own recovery of an earlier kill may be where it
    dies), then changes through any entry point: the pool settles to the
    devices the model names, with store, kernel and thin_dump agreeing."""

    def __init__(self):
        super().__init__()
        n = MACHINE["examples"] = MACHINE.get("examples", 0) + 1
        self.name = MACHINE["dm_name"](f"m{n}")
        self.directory = MACHINE["tmp_path"] / f"m{n}"
        self.held = libdm.Pool.create_loop(
            self.name, self.directory, data_size="128M", min_free_space=0
        )
        self.names = set()
        self.counter = 0

    def teardown(self):
        self.held.destroy(remove_files=True)

    def fresh(self, prefix):
        self.counter += 1
        return f"{prefix}{self.counter}"

    @rule(kind=st.sampled_from(sorted(POINTS_OF)), data=st.data())
    def kill_a_change(self, kind, data):
        point = data.draw(st.sampled_from(POINTS_OF[kind]))
        if kind == "delete" and self.names:
            victim = data.draw(st.sampled_from(sorted(self.names)))
            code = f"p.delete_device({victim!r})\n"
        else:
            code = f"p.create_thin({self.fresh('k')!r}, '4M')\n"
        env = dict(os.environ, LIBDM_CRASH_AT=point)
        script = f"import libdm\np = libdm.Pool.load({str(self.directory)!r})\n{code}"
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
        self.names = settled_names(self.directory, self.name)

    @rule(entry=st.sampled_from(ENTRIES), delete=st.booleans(), data=st.data())
    def change_through(self, entry, delete, data):
        if delete and self.names:
            victim = data.draw(st.sampled_from(sorted(self.names)))
            self.change(entry, "delete", victim)
            self.names.discard(victim)
        else:
            name = self.fresh("e")
            self.change(entry, "create", name)
            self.names.add(name)
        assert pending(self.directory) == ([], None)
        with libdm.Pool.load(self.directory) as pool:
            assert {d.name for d in pool.devices()} == self.names
            assert_consistent(pool)

    def change(self, entry, op, name):
        if entry == "cli":
            args = ("create", name, "4M") if op == "create" else ("delete", name)
            proc = run_cli("thin", args[0], "--pool", self.directory, *args[1:])
            assert proc.returncode == 0, proc.stderr
            return
        if entry == "held":
            pool, owned = self.held, False
        elif entry == "load":
            pool, owned = libdm.Pool.load(self.directory), True
        else:
            pool, owned = libdm.Pool.open(self.directory), True
        try:
            if op == "create":
                pool.create_thin(name, "4M")
            else:
                pool.delete_device(name)
        finally:
            if owned:
                pool.close()

    @invariant()
    def nothing_pending_is_handed_out(self):
        with libdm.Pool.load(self.directory) as pool:
            listed = {d.name for d in pool.devices()}
        intents, _ = pending(self.directory)
        assert not listed & {intent.name for intent in intents if intent.op is Op.DELETE}


def test_kills_then_any_entry_point(dm_name, tmp_path):
    MACHINE.update(dm_name=dm_name, tmp_path=tmp_path, examples=0)
    run_state_machine_as_test(
        EntryPointMachine,
        settings=settings(
            max_examples=int(os.environ.get("LIBDM_RECOVERY_EXAMPLES", "2")),
            stateful_step_count=10,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=(Phase.explicit, Phase.generate),
        ),
    )
