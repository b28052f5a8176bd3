"""The snapshotter acts only on what it can prove it made.

Pool devices: it deletes only devices its own records name, or that carry
the mark (its instance's token) it put in their names; devices of the
user, of another snapshotter on the same pool (another ``root_path``) or
of any other program are reported and left alone.  Its ``root_path`` and
``snapshotter.db`` are trusted only on the pool state directory's terms.
Its socket: one another program answers on, or anything that is not a
socket libdm made, is refused and left.  Witnesses: thin_dump (thin ids
in the pool's metadata), dmsetup (tables), SHA-256 of contents, stat.
"""

import contextlib
import json
import logging
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import threading

import pytest
from support import witness
from support.blockio import MiB, write_pattern
from support.children import PluginDied
from support.containerd.snapshotter_util import Plugin, write_config
from support.poll import until

from libdm.snapshotter.config import Config, MonitorConfig
from libdm.snapshotter.core import Snapshotter
from libdm.snapshotter.store import SCHEMA, SocketRecord
from libdm.thin.errors import StateError
from libdm.thin.owner import DeviceOwner

pytestmark = pytest.mark.kernel


def config(**settings):
    return Config(base_image_size="32M", monitor=MonitorConfig(enabled=False), **settings)


def thin_devices(pool_name):
    """The pool's thin devices as its metadata holds them, read by
    thin_dump from a metadata snapshot: id -> (mapped blocks, creation
    time), which a device deleted and made again under its id changes."""
    meta, _ = witness.pool_devices(pool_name)
    witness.dmsetup("message", pool_name, "0", "reserve_metadata_snap")
    try:
        out = subprocess.run(
            ["thin_dump", "-m", meta], capture_output=True, text=True, check=True
        ).stdout
    finally:
        witness.dmsetup("message", pool_name, "0", "release_metadata_snap")
    found = re.findall(
        r'<device dev_id="(\d+)" mapped_blocks="(\d+)"[^>]*creation_time="(\d+)"', out
    )
    return {int(i): (int(m), int(c)) for i, m, c in found}


def kernel_view(pool, names):
    """What the kernel and the pool's metadata hold of devices ``names``:
    their thin_dump records, and each live device's table (dmsetup)."""
    records = thin_devices(pool.name)
    live = witness.names()
    return {
        name: (
            records.get(pool.device(name).thin_id),
            witness.table(pool.device_dm_name(name))
            if pool.device_dm_name(name) in live
            else None,
        )
        for name in names
    }


def test_the_owner_mark_is_the_token_not_the_prefix():
    owner = DeviceOwner.new("ctrd-")
    other = DeviceOwner.new("ctrd-")
    assert owner.token != other.token
    assert owner.name("7") == f"ctrd-{owner.token}-7"
    assert owner.marked(owner.name("base")) and owner.marked(f"new-{owner.token}-3")
    for name in ("ctrd-userdata", "ctrd-base", "ctrd-7", other.name("7"), owner.token, ""):
        assert not owner.marked(name), name
    with pytest.raises(ValueError):
        DeviceOwner("ctrd-", "XYZ")
    with pytest.raises(ValueError):
        owner.name("a-b")


@pytest.fixture
def user_device(make_pool):
    """A pool holding a user's device named like the snapshotter's, with data."""
    pool = make_pool(data_size="512M")
    dev = pool.create_thin("ctrd-userdata", "16M")
    write_pattern(dev.path, 0x5A, length=4 * MiB)
    return pool, dev


def test_a_user_device_named_like_the_snapshotters_survives(user_device, caplog):
    pool, dev = user_device
    seen = kernel_view(pool, [dev.name])
    before = witness.checksum(dev.path)
    with caplog.at_level(logging.WARNING, logger="libdm.snapshotter"):
        snap = Snapshotter(pool, config())  # the first start
        try:
            snap.prepare("ns", "a")
            snap.cleanup()
            snap.remove("ns", "a")
        finally:
            snap.close()
        snap = Snapshotter(pool, config())  # a restart
        try:
            assert kernel_view(pool, [dev.name]) == seen
            assert witness.checksum(dev.path) == before
            # Reported, not touched.
            assert snap.foreign_devices() == ["ctrd-userdata"]
        finally:
            snap.close()
    assert "ctrd-userdata" in caplog.text
    # Listed for the user, by a command that changes nothing.
    argv = [sys.executable, "-m", "libdm", "snapshotter", "foreign", "--pool", pool.directory]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ctrd-userdata\n", proc
    proc = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout) == ["ctrd-userdata"], proc
    assert kernel_view(pool, [dev.name]) == seen


def test_a_device_with_the_snapshotters_token_in_its_name_is_not_its_own(make_pool):
    """The user snapshots a layer with the CLI and names the copies after
    it (``<layer>.bak``, ``keep-<layer>``, even ``<prefix><token>-99``): the
    names carry the snapshotter's token, but its records do not name the
    devices, so its restart and Cleanup leave them and their data alone."""
    pool = make_pool(data_size="512M")
    snap = Snapshotter(pool, config())
    try:
        layer = snap.prepare("ns", "a")[0].source
        write_pattern(layer, 0x3C, offset=8 * MiB, length=2 * MiB)
        snap.commit("ns", "c", "a")
        device = next(r.device for r in snap.store.all() if r.key == "c")
    finally:
        snap.close()
    owner_token = device.split("-")[-2]
    copies = [f"{device}.bak", f"keep-{device}", f"ctrd-{owner_token}-99"]
    for copy in copies:
        pool.snapshot_device(device, copy)
    seen = kernel_view(pool, copies)
    sums = {c: witness.checksum(pool.device(c).activate().path) for c in copies}
    snap = Snapshotter(pool, config())  # a restart
    try:
        snap.cleanup()
        assert sorted(snap.foreign_devices()) == sorted(copies)
    finally:
        snap.close()
    assert kernel_view(pool, copies) == seen
    assert {c: witness.checksum(pool.device(c).path) for c in copies} == sums


def test_a_second_root_path_on_the_pool_deletes_nothing_of_the_first(make_pool, tmp_path):
    pool = make_pool(data_size="512M")
    first = Snapshotter(pool, config(root_path=str(tmp_path / "first")))
    try:
        layer = first.prepare("ns", "layer-a")[0].source
        write_pattern(layer, 0xC3, offset=8 * MiB, length=2 * MiB)
        first.commit("ns", "layer", "layer-a")
        first.prepare("ns", "top", "layer")
        view = first.view("ns", "v", "layer")[0].source
        before = witness.checksum(view)
    finally:
        first.close()
    names = [d.name for d in pool.devices()]
    assert len(names) == 4  # the base, the layer, its two children
    seen = kernel_view(pool, names)
    assert all(record is not None for record, _ in seen.values()), seen

    second = Snapshotter(pool, config(root_path=str(tmp_path / "second")))
    try:
        second.prepare("ns", "layer-a")  # the same key, another snapshotter
        second.cleanup()
        second.remove("ns", "layer-a")
        assert kernel_view(pool, names) == seen
        assert witness.checksum(view) == before
        assert sorted(second.foreign_devices()) == sorted(names)
    finally:
        second.close()

    first = Snapshotter(pool, config(root_path=str(tmp_path / "first")))
    try:
        assert sorted(i.name for i in first.walk("ns")) == ["layer", "top", "v"]
        # The second's base is the second's.
        others = [d.name for d in pool.devices() if d.name not in names]
        assert len(others) == 1 and first.foreign_devices() == others
        assert witness.checksum(first.mounts("ns", "v")[0].source) == before
    finally:
        first.close()


def plant(path, device):
    """A snapshotter.db whose only row asks for device ``device``'s removal."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute(
        "INSERT INTO snapshots(namespace, key, kind, device, state, created, updated) "
        "VALUES ('ns', NULL, 'active', ?, 'removing', 0, 0)",
        (device,),
    )
    db.execute(
        "INSERT INTO meta VALUES ('base_ready', ?)", (json.dumps({"fs_type": "ext4", "size": 1}),)
    )
    db.commit()
    db.close()


def refused(pool, dev, root, match):
    """Starting a snapshotter on ``root`` is refused; ``dev`` keeps its data."""
    records, before = thin_devices(pool.name), witness.checksum(dev.path)
    error = None
    try:
        Snapshotter(pool, config(root_path=str(root))).close()
    except StateError as exc:
        error = exc
    assert thin_devices(pool.name) == records  # no base was made either
    assert witness.checksum(dev.path) == before
    assert error is not None and re.search(match, str(error)), error


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770])
def test_a_planted_database_in_a_shared_root_path_is_refused(user_device, tmp_path, mode):
    pool, dev = user_device
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    plant(shared / "snapshotter.db", dev.name)
    planted = witness.checksum(shared / "snapshotter.db")
    refused(pool, dev, shared, f"{shared}.*mode {mode:o}")
    assert stat.S_IMODE(os.stat(shared).st_mode) == mode
    assert witness.checksum(shared / "snapshotter.db") == planted


def test_a_symlinked_database_is_refused_and_its_target_untouched(user_device, tmp_path):
    pool, dev = user_device
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    plant(tmp_path / "elsewhere.db", dev.name)
    planted = witness.checksum(tmp_path / "elsewhere.db")
    (root / "snapshotter.db").symlink_to(tmp_path / "elsewhere.db")
    refused(pool, dev, root, "symbolic link")
    assert witness.checksum(tmp_path / "elsewhere.db") == planted


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of its own (the test kernel's hostfs shows the host's owners)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", mnt], check=True)
    yield mnt
    subprocess.run(["umount", "-l", mnt], check=False)


def test_a_database_owned_by_another_user_is_refused(user_device, tmpfs):
    pool, dev = user_device
    root = tmpfs / "root"
    root.mkdir(mode=0o700)
    plant(root / "snapshotter.db", dev.name)
    os.chown(root / "snapshotter.db", 65534, 65534)
    refused(pool, dev, root, "owned by")


def test_a_root_path_owned_by_another_user_is_refused(user_device, tmpfs):
    pool, dev = user_device
    root = tmpfs / "root"
    root.mkdir(mode=0o700)
    plant(root / "snapshotter.db", dev.name)
    os.chown(root, 65534, 65534)
    refused(pool, dev, root, "owned by")


def test_a_database_that_is_not_one_is_refused_naming_it(user_device, tmp_path):
    """Found by an outside review: the refusal said only "file is not a
    database", naming neither the file nor what to do."""
    pool, dev = user_device
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    db = root / "snapshotter.db"
    db.write_bytes(b"not a database\n")
    os.chmod(db, 0o600)
    refused(pool, dev, root, re.escape(str(db)) + r" cannot be read .*sqlite3")
    assert db.read_bytes() == b"not a database\n"


def test_a_new_root_path_is_made_private(make_pool, tmp_path):
    pool = make_pool(data_size="256M")
    root = tmp_path / "new" / "root"
    Snapshotter(pool, config(root_path=str(root))).close()
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / "snapshotter.db").st_mode) == 0o600


# -- the socket --------------------------------------------------------------------------


class Foreign:
    """Another program's unix socket server: it answers every connection."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.ino = os.lstat(path).st_ino
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):  # a client that hung up
                conn.sendall(b"foreign\n")

    def answers(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(self.path))
            return c.recv(16) == b"foreign\n"

    def close(self):
        # A close alone leaves the socket listening while the thread is in
        # accept(): the call holds it, and a connect still gets through.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=10)


def serve(tmp_path, pool, path):
    """Start ``libdm snapshotter serve`` on ``path``: the exit status and
    log of a refusal (or the running plugin)."""
    conf = write_config(tmp_path / "c.toml", base_image_size="32M", monitor={"enabled": False})
    log = tmp_path / "plugin.log"
    plugin = Plugin(pool.directory, path, conf, log=log)
    try:
        plugin.start()
    except PluginDied as exc:
        return exc.code, log.read_text(), None
    return None, log.read_text(), plugin


@pytest.fixture
def served_pool(make_pool):
    return make_pool(data_size="256M")


def test_serve_refuses_a_socket_another_program_answers_on(served_pool, tmp_path):
    path = tmp_path / "snap.sock"
    foreign = Foreign(path)
    try:
        code, log, plugin = serve(tmp_path, served_pool, path)
        if plugin is not None:
            plugin.stop()
        assert code == 1, log
        assert f"{path}" in log and "answers" in log, log
        assert os.lstat(path).st_ino == foreign.ino
        assert foreign.answers()
    finally:
        foreign.close()
    # Nothing was made in the pool either.
    assert thin_devices(served_pool.name) == {}


def test_serve_refuses_a_stale_socket_it_did_not_make(served_pool, tmp_path):
    path = tmp_path / "snap.sock"
    Foreign(path).close()  # bound, then the program went away
    ino = os.lstat(path).st_ino
    code, log, plugin = serve(tmp_path, served_pool, path)
    if plugin is not None:
        plugin.stop()
    assert code == 1, log
    assert f"{path}" in log and "did not make" in log, log
    assert os.lstat(path).st_ino == ino and stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.parametrize("what", ["file", "directory", "symlink"])
def test_serve_refuses_what_is_not_a_socket(served_pool, tmp_path, what):
    path = tmp_path / "snap.sock"
    target = tmp_path / "target"
    target.write_text("keep")
    if what == "file":
        path.write_text("keep")
    elif what == "directory":
        path.mkdir()
    else:
        path.symlink_to(target)
    before = os.lstat(path)
    code, log, plugin = serve(tmp_path, served_pool, path)
    if plugin is not None:
        plugin.stop()
    assert code == 1, log
    assert f"{path}" in log and "not a socket" in log, log
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert target.read_text() == "keep"


def test_serve_replaces_its_own_stale_socket(served_pool, tmp_path):
    path = tmp_path / "snap.sock"
    _, log, plugin = serve(tmp_path, served_pool, path)
    assert plugin is not None, log
    plugin.kill()  # no clean stop: its socket stays
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    _, log, plugin = serve(tmp_path, served_pool, path)
    assert plugin is not None, log

    def connects():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            try:
                c.connect(str(path))
            except OSError:
                return False
            return True

    try:
        until(connects, "the new plugin's socket to take a connection", 10)
    finally:
        assert plugin.stop() == 0
    assert not path.exists()


def test_a_database_of_an_older_version_keeps_its_devices(make_pool):
    """Devices named before names carried the mark (``ctrd-base``,
    ``ctrd-<n>``) stay the snapshotter's through its records; an
    unfinished prepare's unmarked device is left alone, as it may be
    anyone's."""
    pool = make_pool(data_size="512M")
    pool.create_thin("ctrd-base", "32M").deactivate()
    layer = pool.snapshot_device("ctrd-base", "ctrd-1")
    write_pattern(layer.path, 0x3C, offset=4 * MiB, length=MiB)
    data = witness.checksum(layer.path)
    layer.deactivate()
    pool.create_thin("ctrd-2", "16M")  # a prepare's, interrupted: or the user's
    db = sqlite3.connect(os.path.join(pool.directory, "snapshotter.db"))
    db.executescript(SCHEMA)
    db.executemany(
        "INSERT INTO snapshots(id, namespace, key, kind, device, state, created, updated) "
        "VALUES (?, 'ns', ?, ?, ?, ?, 0, 0)",
        [(1, "old", "committed", "ctrd-1", "ready"), (2, "new-a", "active", "ctrd-2", "creating")],
    )
    db.execute(
        "INSERT INTO meta VALUES ('base_ready', ?)",
        (json.dumps({"fs_type": "ext4", "size": 32 * MiB}),),
    )
    db.commit()
    db.close()
    seen = kernel_view(pool, ["ctrd-base", "ctrd-1", "ctrd-2"])

    snap = Snapshotter(pool, config())
    try:
        assert kernel_view(pool, ["ctrd-base", "ctrd-1", "ctrd-2"]) == seen
        assert [i.name for i in snap.walk("ns")] == ["old"]
        assert snap.foreign_devices() == ["ctrd-2"]
        view = snap.view("ns", "v", "old")[0].source
        assert witness.checksum(view) == data
        assert pool.device(os.path.basename(view).removeprefix(pool.name + "-")).parent.name == (
            "ctrd-1"
        )
        snap.remove("ns", "v")
        snap.remove("ns", "old")  # its own by its records
        names = {d.name for d in pool.devices()}
        assert names == {"ctrd-base", "ctrd-2"}
        fresh = snap.prepare("ns", "fresh")[0].source
        assert snap.owner.marked(os.path.basename(fresh))
        assert pool.device(os.path.basename(fresh).removeprefix(pool.name + "-")).parent.name == (
            "ctrd-base"
        )
    finally:
        snap.close()


def test_a_socket_left_by_a_kill_before_it_was_recorded_is_replaced(served_pool, tmp_path):
    """Killed between its bind and recording the socket: what it had
    recorded before the bind makes the stale socket its own."""
    path = tmp_path / "snap.sock"
    snap = Snapshotter(served_pool, config())
    try:
        snap.record_socket(SocketRecord.binding(str(path)))
    finally:
        snap.close()
    Foreign(path).close()  # the socket the killed plugin had bound
    _, log, plugin = serve(tmp_path, served_pool, path)
    assert plugin is not None, log
    assert plugin.stop() == 0
    assert not path.exists()
