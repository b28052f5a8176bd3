"""The containerd snapshotter (libdm.snapshotter) through its gRPC API, in
a real kernel: containerd's semantics, the devices behind them, restart
and Cleanup."""

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from support.containerd.snapshotter_util import (
    Plugin,
    base_device,
    make_pool,
    owner_token,
    write_config,
)

import libdm
from libdm.snapshotter.client import KIND_NAMES, Client

pytestmark = pytest.mark.kernel

PREFIX = "ctrd-"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snap")
    name = f"libdmtest-snap-{os.getpid()}"
    pool = make_pool(tmp / "pool", name, "1G")
    # The pool's monitor runs in the plugin, as configured by default.
    config = write_config(
        tmp / "config.toml",
        base_image_size="64M",
        monitor={"threshold": 85, "percent": 25, "interval": 1.0, "max_data_size": "2G"},
    )
    plugin = Plugin(tmp / "pool", tmp / "snap.sock", config, log=tmp / "plugin.log").start()
    client = Client(str(tmp / "snap.sock"), namespace="t")
    try:
        yield pool, plugin, client, tmp
    finally:
        client.close()
        plugin.stop()
        subprocess.run(["umount", "-R", "-l", str(tmp / "mnt")], capture_output=True)
        pool.destroy(remove_files=True)


def code(exc_info):
    return exc_info.value.code()


def mount(mounts, target):
    os.makedirs(target, exist_ok=True)
    m = mounts[0]
    argv = ["mount", "-t", m.type]
    if m.options:
        argv += ["-o", ",".join(m.options)]
    subprocess.run([*argv, m.source, str(target)], check=True, capture_output=True)


def umount(target):
    subprocess.run(["umount", str(target)], check=True, capture_output=True)


def test_layers_are_thin_snapshots_and_mounts_are_stable(served):
    pool, _, c, tmp = served
    mounts = c.prepare("l1-active")
    assert len(mounts) == 1 and mounts[0].type == "ext4" and list(mounts[0].options) == []
    assert c.mounts("l1-active") == mounts
    mnt = tmp / "mnt" / "l1"
    mount(mounts, mnt)
    (mnt / "hello").write_text("one")
    os.chmod(mnt / "hello", 0o640)
    os.chown(mnt / "hello", 1234, 5678)
    umount(mnt)
    c.commit("l1", "l1-active", labels={"a": "b"})
    info = c.stat("l1")
    assert (info.name, info.parent, KIND_NAMES[info.kind]) == ("l1", "", "committed")
    assert dict(info.labels) == {"a": "b"}
    with pytest.raises(grpc.RpcError) as e:
        c.stat("l1-active")
    assert code(e) == grpc.StatusCode.NOT_FOUND
    # The committed device is inactive; it lives on as a thin device of the pool.
    devices = {d.name: d for d in libdm.Pool.load(pool.directory).devices()}
    base = base_device(pool.directory)
    committed = [d for d in devices.values() if d.name.startswith(PREFIX) and d.name != base]
    assert len(committed) == 1 and not committed[0].active
    assert committed[0].parent.name == base

    view = c.view("l1-view", "l1")
    assert "ro" in view[0].options and c.mounts("l1-view") == view
    mnt = tmp / "mnt" / "view"
    mount(view, mnt)
    st = os.stat(mnt / "hello")
    assert (mnt / "hello").read_text() == "one"
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    with pytest.raises(OSError):
        (mnt / "new").write_text("x")
    umount(mnt)
    assert KIND_NAMES[c.stat("l1-view").kind] == "view"
    with pytest.raises(grpc.RpcError) as e:
        c.commit("nope", "l1-view")
    assert code(e) == grpc.StatusCode.FAILED_PRECONDITION
    c.remove("l1-view")
    c.remove("l1")


def test_error_codes(served):
    _, _, c, _ = served
    c.prepare("e-a")
    with pytest.raises(grpc.RpcError) as e:
        c.prepare("e-a")
    assert code(e) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        c.prepare("e-b", "missing")
    assert code(e) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        c.prepare("e-b", "e-a")  # parents must be committed
    assert code(e) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        c.mounts("missing")
    assert code(e) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        c.remove("missing")
    assert code(e) == grpc.StatusCode.NOT_FOUND
    c.commit("e-c", "e-a")
    with pytest.raises(grpc.RpcError) as e:
        c.mounts("e-c")
    assert code(e) == grpc.StatusCode.FAILED_PRECONDITION
    c.prepare("e-d", "e-c")
    with pytest.raises(grpc.RpcError) as e:
        c.commit("e-c", "e-d")  # names and keys share one namespace
    assert code(e) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        c.remove("e-c")
    assert code(e) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as e:
        c.update("e-c", {"x": "y"}, ["kind"])
    assert code(e) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        c.prepare("")
    assert code(e) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        c.list("name==")
    assert code(e) == grpc.StatusCode.INVALID_ARGUMENT
    c.remove("e-d")
    c.remove("e-c")


def test_namespaces_are_separate(served):
    _, _, c, tmp = served
    other = Client(c_socket(tmp), namespace="other")
    try:
        c.prepare("ns-key")
        other.prepare("ns-key")  # the same key in another namespace
        assert [i.name for i in other.list()] == ["ns-key"]
        other.remove("ns-key")
        assert "ns-key" in [i.name for i in c.list()]
        c.remove("ns-key")
    finally:
        other.close()


def c_socket(tmp):
    return str(tmp / "snap.sock")


def test_update_and_list_filters(served):
    _, _, c, _ = served
    c.prepare("f-a", labels={"x": "1", "keep": "k"})
    c.commit("f-b", "f-a", labels={"x": "1", "y.z": "2"})
    c.prepare("f-c", "f-b", labels={"x": "3"})
    c.view("f-v", "f-b")
    names = lambda *f: sorted(i.name for i in c.list(*f))  # noqa: E731
    assert names() == ["f-b", "f-c", "f-v"]
    assert names("kind==committed") == ["f-b"]
    assert names("kind==view", "kind==active") == ["f-c", "f-v"]
    assert names("parent==f-b") == ["f-c", "f-v"]
    assert names("labels.x==1") == ["f-b"]
    assert names('labels."y.z"==2') == ["f-b"]
    assert names("labels.x") == ["f-b", "f-c"]
    assert names("labels.x!=1") == ["f-c", "f-v"]
    assert names("name~=^f-[cv]$,kind==active") == ["f-c"]
    before = c.stat("f-c")
    info = c.update("f-c", {"x": "4", "new": "n"}, ["labels.x"])
    assert dict(info.labels) == {"x": "4"}
    assert info.updated_at.ToNanoseconds() >= before.updated_at.ToNanoseconds()
    assert info.created_at == before.created_at
    info = c.update("f-c", {"a": "1"}, ["labels.a", "labels.x"])  # x not given: removed
    assert dict(info.labels) == {"a": "1"}
    info = c.update("f-c", {"b": "2"})  # no mask: all labels replaced
    assert dict(info.labels) == {"b": "2"}
    info = c.update("f-c", {"c": "3"}, ["labels"])
    assert dict(c.stat("f-c").labels) == {"c": "3"} == dict(info.labels)
    for key in ("f-v", "f-c", "f-b"):
        c.remove(key)
    assert names() == []


def test_usage_counts_the_layers_own_bytes(served):
    _, _, c, tmp = served
    mounts = c.prepare("u-a")
    mnt = tmp / "mnt" / "u"
    mount(mounts, mnt)
    with open(mnt / "blob", "wb") as fh:
        fh.write(os.urandom(4 << 20))
        os.fsync(fh.fileno())
    umount(mnt)
    size, _ = c.usage("u-a")
    assert 4 << 20 <= size < 16 << 20
    c.commit("u-b", "u-a")
    assert c.usage("u-b")[0] == size
    mounts = c.prepare("u-c", "u-b")
    assert c.usage("u-c")[0] < 1 << 20  # shares its parent's blocks
    # Rewriting 2 MiB of the parent's file in place maps no more blocks
    # than the parent did, but the layer owns them: thin_delta counts them.
    mount(mounts, mnt)
    with open(mnt / "blob", "r+b") as fh:
        fh.write(os.urandom(2 << 20))
        os.fsync(fh.fileno())
    umount(mnt)
    size, _ = c.usage("u-c")
    assert 2 << 20 <= size < 4 << 20, size
    c.commit("u-d", "u-c")
    assert c.usage("u-d")[0] == size
    c.remove("u-d")
    c.remove("u-b")


def test_restart_keeps_everything_and_cleanup_leaves_unrecorded_devices(served):
    pool, plugin, c, _ = served
    c.prepare("r-a")
    c.commit("r-b", "r-a")
    c.prepare("r-c", "r-b")
    plugin.stop()
    base = base_device(pool.directory)
    # Devices no snapshot owns: one whose name carries the snapshotter's
    # mark (the user's too: only the snapshotter's records prove a device
    # its own, and no step of it leaves one of its own unrecorded), and one
    # named with its prefix.
    leftover = f"{PREFIX}{owner_token(pool.directory)}-stray"
    p = libdm.Pool.open(pool.directory)
    p.snapshot_device(base, leftover)
    p.snapshot_device(base, PREFIX + "users")
    p.close()
    plugin.start()
    c.wait_ready()
    assert sorted(i.name for i in c.list()) == ["r-b", "r-c"]
    names = {d.name for d in libdm.Pool.load(pool.directory).devices()}
    assert leftover in names and PREFIX + "users" in names
    c.cleanup()
    c.remove("r-c")
    c.remove("r-b")
    left = {d.name for d in libdm.Pool.load(pool.directory).devices()}
    assert left == {base, leftover, PREFIX + "users"}
    p = libdm.Pool.open(pool.directory)
    p.delete_device(PREFIX + "users")
    p.delete_device(leftover)
    p.close()


def test_deep_chain(served):
    _, _, c, _ = served
    parent = ""
    for i in range(130):
        c.prepare(f"d-{i}-a", parent)
        c.commit(f"d-{i}", f"d-{i}-a")
        parent = f"d-{i}"
    assert c.stat("d-129").parent == "d-128"
    for i in reversed(range(130)):
        c.remove(f"d-{i}")


def test_xfs_async_remove_and_discard(tmp_path):
    """fs_type xfs (mounts carry nouuid), async_remove (Remove returns, the
    device goes in the background) and discard_blocks."""
    name = f"libdmtest-snapx-{os.getpid()}"
    pool = make_pool(tmp_path / "pool", name, "1G")
    config = write_config(
        tmp_path / "c.toml",
        base_image_size="300M",
        fs_type="xfs",
        async_remove=True,
        discard_blocks=True,
        monitor={"enabled": False},
    )
    plugin = Plugin(
        tmp_path / "pool", tmp_path / "x.sock", config, log=tmp_path / "plugin.log"
    ).start()
    c = Client(str(tmp_path / "x.sock"))
    try:
        mounts = c.prepare("x-a")
        assert mounts[0].type == "xfs" and "nouuid" in mounts[0].options
        mount(mounts, tmp_path / "m")
        (tmp_path / "m" / "f").write_text("xfs")
        umount(tmp_path / "m")
        c.commit("x", "x-a")
        view = c.view("x-v", "x")
        assert list(view[0].options) == ["nouuid", "ro"]
        mount(view, tmp_path / "m")
        assert (tmp_path / "m" / "f").read_text() == "xfs"
        umount(tmp_path / "m")
        c.remove("x-v")
        c.remove("x")
        assert c.list() == []

        def gone():
            p = libdm.Pool.load(pool.directory)
            try:
                return {d.name for d in p.devices()} == {base_device(pool.directory)}
            finally:
                p.close()

        from support.poll import wait_for

        assert wait_for(gone, timeout=60)
    finally:
        c.close()
        plugin.stop()
        subprocess.run(["umount", "-l", str(tmp_path / "m")], capture_output=True)
        pool.destroy(remove_files=True)


def test_bad_config_is_refused(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('fs_type = "btrfs"\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "libdm.snapshotter",
            "serve",
            "--pool",
            str(tmp_path),
            "--socket",
            str(tmp_path / "s.sock"),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "fs_type must be ext4 or xfs" in proc.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_filling_pool_grows_instead_of_failing_writes(tmp_path):
    """The monitor in the plugin grows a pool that a container's writes
    fill: a 96 MiB pool under a 256 MiB layer takes 120 MiB of writes."""
    name = f"libdmtest-snapgrow-{os.getpid()}"
    pool = make_pool(tmp_path / "pool", name, "96M")
    before = int(pool.status().total_data)
    config = write_config(
        tmp_path / "c.toml",
        base_image_size="256M",
        monitor={"threshold": 60, "percent": 50, "interval": 0.5},
    )
    plugin = Plugin(
        tmp_path / "pool", tmp_path / "g.sock", config, log=tmp_path / "plugin.log"
    ).start()
    c = Client(str(tmp_path / "g.sock"))
    try:
        mounts = c.prepare("g-a")
        mount(mounts, tmp_path / "m")
        chunk = os.urandom(1 << 20)
        with open(tmp_path / "m" / "big", "wb") as fh:
            for _ in range(120):
                fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        umount(tmp_path / "m")
        c.commit("g", "g-a")
        p = libdm.Pool.load(pool.directory)
        try:
            after = int(p.status().total_data)
        finally:
            p.close()
        assert after > before * 1.5, (before, after)
        assert c.usage("g")[0] >= 120 << 20
        c.remove("g")
    finally:
        c.close()
        plugin.stop()
        subprocess.run(["umount", "-l", str(tmp_path / "m")], capture_output=True)
        libdm.Pool.open(pool.directory).destroy(remove_files=True)


def test_libdm_snapshotter_serve_stops_cleanly_on_sigterm(tmp_path):
    name = f"libdmtest-snapcli-{os.getpid()}"
    pool = make_pool(tmp_path / "pool", name, "256M")
    sock = tmp_path / "cli.sock"
    config = write_config(tmp_path / "c.toml", base_image_size="32M", monitor={"enabled": False})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "libdm",
            "snapshotter",
            "serve",
            "--pool",
            str(tmp_path / "pool"),
            "--socket",
            str(sock),
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("serving on")
        with Client(str(sock)) as c:
            c.prepare("cli-a")
            c.commit("cli", "cli-a")
        # A second signal while it stops (Ctrl-C twice) does not cut the stop short.
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        pool.destroy(remove_files=True)


def test_a_refused_prepare_leaves_its_key_free(served):
    """The pool refuses a Prepare (here: the kernel already has a device of
    the name the layer's device would get); the key is not left taken."""
    import sqlite3

    pool, _, c, _ = served
    db = sqlite3.connect(f"file:{pool.directory}/snapshotter.db?mode=ro", uri=True)
    (seq,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name='snapshots'").fetchone()
    db.close()
    squatter = f"{pool.name}-{PREFIX}{owner_token(pool.directory)}-{seq + 1}"
    libdm.create(squatter, [libdm.Target(0, 8, "zero")])
    try:
        with pytest.raises(grpc.RpcError):
            c.prepare("refused-a")
    finally:
        libdm.remove(squatter)
    assert "refused-a" not in [i.name for i in c.list()]
    c.prepare("refused-a")  # no "already exists"
    c.remove("refused-a")
