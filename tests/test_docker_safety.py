"""The Docker plugin against hostile layer tars and a second plugin or
dockerd on the same pool: nothing outside the layer being written and
nothing another plugin is working on is touched, checked with the files'
own contents and times, thin_dump and /proc/self/mountinfo."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import threading
import time

import pytest
from support import witness
from support.docker.plugin_util import DockerPlugin, base_device

from libdm.docker.driver import TEMP_MOUNT_POINTS

pytestmark = pytest.mark.kernel

MTIME = 1700000000


def _tar(*entries: tuple[str, str, object]) -> bytes:
    """A layer tar of (name, kind, data or link target) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = (0o755 if kind == "dir" else 0o644), MTIME
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def pool(make_pool):
    return make_pool(data_size="1G")


@pytest.fixture
def plugin(pool, tmp_path):
    p = DockerPlugin(pool.directory, str(tmp_path / "p.sock"), log=str(tmp_path / "plugin.log"))
    p.start()
    yield p
    if p.proc is not None:
        p.client.call("GraphDriver.Cleanup")
        p.stop()


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def test_whiteouts_of_dot_and_dotdot_are_refused(pool, plugin):
    """A whiteout of ``..`` once removed the plugin's mount directory, the
    mounted roots of every other layer and container in it; of ``.`` or of
    nothing, the layer's own root.  Each is refused, naming the entry, and
    nothing is removed anywhere."""
    c = plugin.client
    c.ok("GraphDriver.Init", Home="", Opts=[])
    victims = {}
    for name in ("victim1", "victim2"):
        c.ok("GraphDriver.CreateReadWrite", ID=name, Parent="")
        root = c.ok("GraphDriver.Get", ID=name)["Dir"]
        os.mkdir(os.path.join(root, "data"))
        with open(os.path.join(root, "data", "precious"), "wb") as fh:
            fh.write(name.encode())
        victims[name] = root
    c.ok("GraphDriver.Create", ID="evil", Parent="")
    assert c.apply_diff("evil", "", _tar(("d", "dir", None), ("d/keep", "file", b"k")))[
        "Size"
    ] == len(b"k")
    for name in (".wh...", ".wh..", ".wh.", "d/.wh...", "d/.wh..", "d/.wh."):
        c.ok("GraphDriver.Create", ID=f"evil-{name}", Parent="evil")
        reply = c.apply_diff(f"evil-{name}", "evil", _tar((name, "file", b"")))
        assert "whiteout" in reply["Err"] and repr(name) in reply["Err"], reply
        root = c.ok("GraphDriver.Get", ID=f"evil-{name}")["Dir"]
        try:
            assert _files(root) == {"d/keep": b"k"}
        finally:
            c.ok("GraphDriver.Put", ID=f"evil-{name}")
        for victim, vroot in victims.items():
            assert _files(vroot) == {"data/precious": victim.encode()}, name
    # An opaque directory still hides only what is below it.
    c.ok("GraphDriver.Create", ID="opaque", Parent="evil")
    layer = _tar(("d", "dir", None), ("d/.wh..wh..opq", "file", b""), ("d/new", "file", b"n"))
    assert not c.apply_diff("opaque", "evil", layer)["Err"]
    root = c.ok("GraphDriver.Get", ID="opaque")["Dir"]
    assert _files(root) == {"d/new": b"n"}
    c.ok("GraphDriver.Put", ID="opaque")
    for victim, vroot in victims.items():
        assert _files(vroot) == {"data/precious": victim.encode()}


def test_directory_times_never_set_through_a_symlink(pool, plugin, tmp_path):
    """A directory the tar made, then replaced by a symbolic link out of
    the layer (itself, or a directory above it): the times ApplyDiff sets
    on its directories last land on nothing outside the layer."""
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    witness_file = tmp_path / "witness"
    witness_file.write_text("w")
    for path in (outside, outside / "b", witness_file):
        os.utime(path, (1000, 1000))
    c = plugin.client
    c.ok("GraphDriver.Init", Home="", Opts=[])
    c.ok("GraphDriver.Create", ID="l", Parent="")
    layer = _tar(
        ("d", "dir", None),
        ("d", "sym", str(witness_file)),
        ("a", "dir", None),
        ("a/b", "dir", None),
        ("a", "sym", str(outside)),
    )
    assert not c.apply_diff("l", "", layer)["Err"]
    for path in (outside, outside / "b", witness_file):
        assert os.lstat(path).st_mtime == 1000, path
    root = c.ok("GraphDriver.Get", ID="l")["Dir"]
    assert os.readlink(os.path.join(root, "d")) == str(witness_file)
    c.ok("GraphDriver.Put", ID="l")


def _slow_body(data: bytes, go: threading.Event):
    yield data[:512]
    go.wait(120)
    yield data[512:]


def test_a_second_plugin_on_the_pool_is_refused_before_recovery(pool, plugin, tmp_path):
    """A second plugin on the same pool (another socket, or the same one)
    once ran its start-up recovery and deleted the layer the first was
    applying.  It is refused before it touches anything, naming the
    first's pid, and the first's ApplyDiff completes."""
    c = plugin.client
    c.ok("GraphDriver.Init", Home="", Opts=[])
    c.ok("GraphDriver.Create", ID="busy", Parent="")
    data = _tar(("f", "file", b"x" * 4096), ("g", "file", b"y"))
    go, replies = threading.Event(), []
    applying = threading.Thread(
        target=lambda: replies.append(c.apply_diff("busy", "", _slow_body(data, go)))
    )
    applying.start()
    try:
        deadline = time.monotonic() + 60
        while "applying" not in _states(pool):
            assert time.monotonic() < deadline, "the ApplyDiff never started"
            time.sleep(0.1)
        ids = witness.thin_ids(pool.name)
        assert plugin.proc is not None
        for sock in (str(tmp_path / "other.sock"), plugin.socket_path):
            second = DockerPlugin(pool.directory, sock, log=str(tmp_path / "second.log"))
            with pytest.raises(RuntimeError, match=f"pid {plugin.proc.pid}"):
                second.start()
            assert witness.thin_ids(pool.name) == ids
        assert "undoing" not in (tmp_path / "second.log").read_text()
    finally:
        go.set()
        applying.join(120)
    assert replies == [{"Err": "", "Size": 4097}]
    root = c.ok("GraphDriver.Get", ID="busy")["Dir"]
    assert _files(root) == {"f": b"x" * 4096, "g": b"y"}
    c.ok("GraphDriver.Put", ID="busy")
    # Once the first has stopped, the pool is served again.
    plugin.stop()
    plugin.start()
    assert plugin.client.call("GraphDriver.Exists", ID="busy")["Exists"]


def _states(pool) -> set[str]:
    import sqlite3

    db = sqlite3.connect(
        f"file:{os.path.join(pool.directory, 'docker', 'docker.db')}?mode=ro", uri=True
    )
    try:
        return {row[0] for row in db.execute("SELECT state FROM layers")}
    finally:
        db.close()


def _short_mounts() -> list[str]:
    """Mount points of the plugin's short mounts (and where they once were)."""
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if "/docker/tmp/" in p or "/libdm-grow-" in p or "/libdm-mnt-" in p]


@pytest.mark.parametrize("point", TEMP_MOUNT_POINTS)
def test_kill_inside_a_short_mount(pool, tmp_path, point):
    """Killed while a container's size grow or the base device's first
    preparation has the device mounted, the plugin once left the mount
    behind: the device stayed open, its deletion failed at every start (or
    every Init failed on the half-made base).  The restarted plugin
    unmounts it first, undoes the call, and serves."""
    sock, log = str(tmp_path / "k.sock"), tmp_path / "plugin.log"
    p = DockerPlugin(pool.directory, sock, log=str(log), env={"LIBDM_CRASH_AT": point})
    p.start()
    c = p.client
    try:
        c.call("GraphDriver.Init", Home="", Opts=[])
        c.call("GraphDriver.Create", ID="img", Parent="")
        c.call("GraphDriver.CreateReadWrite", ID="c1", Parent="img", StorageOpt={"size": "96M"})
    except (ConnectionError, OSError, AssertionError, ValueError):
        pass
    assert p.wait(timeout=120) == -9, f"the plugin was not killed at {point}"
    assert len(_short_mounts()) == 1
    p.env.pop("LIBDM_CRASH_AT")
    p.start()
    try:
        assert _short_mounts() == []
        c.ok("GraphDriver.Init", Home="", Opts=[])
        if point == "docker:init:base-mounted":
            c.ok("GraphDriver.Create", ID="img", Parent="")
        assert not c.call("GraphDriver.Exists", ID="c1")["Exists"]
        c.ok("GraphDriver.CreateReadWrite", ID="c1", Parent="img", StorageOpt={"size": "96M"})
        root = c.ok("GraphDriver.Get", ID="c1")["Dir"]
        assert os.statvfs(root).f_blocks * os.statvfs(root).f_frsize > 80 << 20
        assert os.listdir(root) == []
        c.ok("GraphDriver.Put", ID="c1")
        ids = {
            int(c.ok("GraphDriver.GetMetadata", ID=layer)["Metadata"]["DeviceId"])
            for layer in ("img", "c1")
        }
        assert witness.thin_ids(pool.name) == ids | {pool.device(base_device(pool)).thin_id}
        c.ok("GraphDriver.Cleanup")
    finally:
        p.stop()
    assert "left by an interrupted call" in log.read_text()
    assert _short_mounts() == []


def test_a_second_dockerd_leaves_the_first_ones_layers_mounted(pool, plugin, tmp_path):
    """A second dockerd (another home) once sent Init, which voided the
    first one's counts, then Cleanup, which unmounted the layer under the
    first one's container.  Its Init is refused (dockerd then stops without
    a driver), naming the first's home and layer; the first one's layer
    stays mounted with its data, and its Put works."""
    c = plugin.client
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    c.ok("GraphDriver.Init", Home=first, Opts=[])
    c.ok("GraphDriver.CreateReadWrite", ID="c1", Parent="")
    root = c.ok("GraphDriver.Get", ID="c1")["Dir"]
    with open(os.path.join(root, "data"), "w") as fh:
        fh.write("the first dockerd's\n")
    reply = c.call("GraphDriver.Init", Home=second, Opts=[])
    assert first in reply["Err"] and "c1" in reply["Err"], reply
    with open("/proc/self/mountinfo") as fh:
        assert root in [line.split()[4] for line in fh]
    assert _files(root) == {"data": b"the first dockerd's\n"}
    # The first dockerd carries on; once it has put its layers back,
    # another may take over.
    c.ok("GraphDriver.Put", ID="c1")
    c.ok("GraphDriver.Init", Home=first, Opts=[])
    c.ok("GraphDriver.Init", Home=second, Opts=[])


def _deep(root: str, depth: int, name: str = "d") -> None:
    """Directories ``depth`` deep under ``root`` (made through descriptors:
    the whole path may be longer than a path may be)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(b"leaf\n")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_deep_trees_are_walked(pool, plugin):
    """A container 1100 directories deep: Changes and DiffSize once failed
    with RecursionError and Diff sent a cut tar; all three answer."""
    c = plugin.client
    c.ok("GraphDriver.Init", Home="", Opts=[])
    c.ok("GraphDriver.Create", ID="img", Parent="")
    c.ok("GraphDriver.CreateReadWrite", ID="deep", Parent="img")
    root = c.ok("GraphDriver.Get", ID="deep")["Dir"]
    _deep(root, 1100)
    changes = c.ok("GraphDriver.Changes", ID="deep", Parent="img")["Changes"]
    assert len(changes) == 1101
    assert changes[-1] == {"Path": "/d" * 1100 + "/leaf", "Kind": 1}
    assert c.ok("GraphDriver.DiffSize", ID="deep", Parent="img")["Size"] == len(b"leaf\n")
    with tarfile.open(fileobj=io.BytesIO(c.diff("deep", "img"))) as tar:
        names = tar.getnames()
    assert len(names) == 1101 and names[-1] == "d/" * 1100 + "leaf"
    c.ok("GraphDriver.Put", ID="deep")


def test_a_diff_that_fails_midway_reaches_the_client_as_an_error(pool, plugin):
    """A Diff that fails after its 200 (here a path longer than PATH_MAX)
    once closed the connection cleanly, and dockerd took the cut tar for a
    whole one; the body is cut inside its chunked encoding now."""
    import http.client

    c = plugin.client
    c.ok("GraphDriver.Init", Home="", Opts=[])
    c.ok("GraphDriver.CreateReadWrite", ID="long", Parent="")
    root = c.ok("GraphDriver.Get", ID="long")["Dir"]
    with open(os.path.join(root, "first"), "wb") as fh:
        fh.write(b"f" * 100000)
    _deep(root, 24, "x" * 200)
    resp = c._post("/GraphDriver.Diff", b'{"ID": "long", "Parent": ""}', {})
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    c.ok("GraphDriver.Put", ID="long")


def test_applydiff_that_fills_the_pool_says_so(make_pool, tmp_path):
    """An ApplyDiff larger than the pool's free space once answered a bare
    EIO or EROFS; it says the pool is full, how full, and what to run."""
    # Small, so that filling it is quick in the test kernel, and failing
    # writes at once rather than after the kernel's 60 s of queueing.
    small = make_pool(data_size="40M", features=["error_if_no_space"])
    p = DockerPlugin(
        small.directory,
        str(tmp_path / "f.sock"),
        options=("dm.basesize=128M",),
        log=str(tmp_path / "plugin.log"),
    ).start()
    try:
        c = p.client
        c.ok("GraphDriver.Init", Home="", Opts=[])
        c.ok("GraphDriver.Create", ID="big", Parent="")
        size = 64 << 20

        def body():
            info = tarfile.TarInfo("big")
            info.size = size
            yield info.tobuf(format=tarfile.USTAR_FORMAT)
            chunk = bytes(range(1, 256)) * 4112  # no zeros: every block is written
            left = size
            while left:
                yield chunk[: min(left, len(chunk))]
                left -= min(left, len(chunk))
            yield bytes(1024)

        err = c.apply_diff("big", "", body())["Err"]
        assert "is full" in err and "libdm pool resize" in err, err
        used, total = witness.pool_status(small.name)[2].split("/")
        assert int(used) == int(total)  # dmsetup's word: the pool is full
    finally:
        p.stop()


def test_records_of_another_pool_are_refused(make_pool, tmp_path):
    """Records a destroyed pool left in its directory once served a new
    pool there: the old layers "existed", every Create failed on a base
    that was gone.  Records are bound to the pool they were made on: a
    plugin on another pool refuses them before it touches anything and
    says what to do; with them moved away it serves afresh."""
    old = make_pool(data_size="512M")
    p = DockerPlugin(old.directory, str(tmp_path / "o.sock"), log=str(tmp_path / "old.log"))
    p.start()
    p.client.ok("GraphDriver.Init", Home="", Opts=[])
    p.client.ok("GraphDriver.Create", ID="L1", Parent="")
    p.stop()
    old.destroy(remove_files=True)
    new = make_pool(name="again", directory=old.directory, data_size="512M")
    records = os.path.join(new.directory, "docker")
    assert os.path.isdir(records)  # the plugin's, left by the destroy
    before = witness.thin_ids(new.name)
    log = tmp_path / "new.log"
    q = DockerPlugin(new.directory, str(tmp_path / "n.sock"), log=str(log))
    with pytest.raises(RuntimeError, match=f"made on another pool \\(uuid {old.uuid}\\)"):
        q.start()
    assert f"Move {records} away" in log.read_text()
    assert witness.thin_ids(new.name) == before
    os.rename(records, str(tmp_path / "moved-away"))
    q.start()
    try:
        q.client.ok("GraphDriver.Init", Home="", Opts=[])
        assert not q.client.call("GraphDriver.Exists", ID="L1")["Exists"]
        q.client.ok("GraphDriver.Create", ID="L2", Parent="")
    finally:
        q.stop()


def test_a_deleted_base_is_made_again(pool, plugin):
    """The base device deleted outside the plugin once made every Create
    fail for good.  It is made again (no layer needs it: a thin snapshot
    keeps its blocks), and the layers keep their data."""
    c = plugin.client
    c.ok("GraphDriver.Init", Home="", Opts=[])
    c.ok("GraphDriver.Create", ID="L1", Parent="")
    assert not c.apply_diff("L1", "", _tar(("f", "file", b"kept\n")))["Err"]
    plugin.stop()
    base = base_device(pool)
    pool.delete_device(base)
    plugin.start()
    c = plugin.client
    c.ok("GraphDriver.Init", Home="", Opts=[])
    c.ok("GraphDriver.Create", ID="L2", Parent="")
    root = c.ok("GraphDriver.Get", ID="L2")["Dir"]
    assert os.listdir(root) == []
    c.ok("GraphDriver.Put", ID="L2")
    root = c.ok("GraphDriver.Get", ID="L1")["Dir"]
    assert _files(root) == {"f": b"kept\n"}
    c.ok("GraphDriver.Put", ID="L1")
    ids = {
        int(c.ok("GraphDriver.GetMetadata", ID=layer)["Metadata"]["DeviceId"])
        for layer in ("L1", "L2")
    }
    assert witness.thin_ids(pool.name) == ids | {pool.device(base_device(pool)).thin_id}


def test_a_handed_over_pool_says_so(pool, tmp_path):
    """On a pool handed to Docker's own driver, Init said the base device
    was missing; it says the pool was handed over."""
    pool.hand_over("docker")
    p = DockerPlugin(pool.directory, str(tmp_path / "h.sock"), log=str(tmp_path / "h.log"))
    p.start()
    try:
        err = p.client.call("GraphDriver.Init", Home="", Opts=[])["Err"]
        assert "was handed over to docker" in err, err
    finally:
        p.stop()
    assert witness.thin_ids(pool.name) == set()


def test_pool_destroy_names_the_busy_device_and_its_mount(pool, tmp_path):
    """``pool destroy`` with a layer still mounted once said only "Device
    or resource busy" with a Python call as advice; it names the device,
    where it is mounted, and what to run."""
    import subprocess
    import sys

    p = DockerPlugin(pool.directory, str(tmp_path / "d.sock"), log=str(tmp_path / "d.log"))
    p.start()
    p.client.ok("GraphDriver.Init", Home="", Opts=[])
    p.client.ok("GraphDriver.Create", ID="L1", Parent="")
    root = p.client.ok("GraphDriver.Get", ID="L1")["Dir"]
    dm_name = p.client.ok("GraphDriver.GetMetadata", ID="L1")["Metadata"]["DeviceName"]
    p.stop()  # mounted layers stay mounted for the dockerd using them
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "libdm", "pool", "destroy", "--pool", pool.directory],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0
        assert dm_name in proc.stderr and f"mounted on {root}" in proc.stderr, proc.stderr
        assert "libdm pool destroy again" in proc.stderr
        assert "deferred=True" not in proc.stderr
    finally:
        subprocess.run(["umount", root], check=False)
