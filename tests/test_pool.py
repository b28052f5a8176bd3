"""Thin pools on loop files: create, provision, snapshot, delete, reopen.

Every result is checked against dmsetup and against the thin ids that
thin_dump reads from a metadata snapshot reserved by the test itself.
"""

import os
import stat
import subprocess
import sys

import pytest
from support import witness
from support.blockio import read_at, write_pattern

import libdm
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel


@pytest.fixture
def pool(make_pool):
    return make_pool(data_size="256M")


def test_create_loop_builds_sparse_files_and_a_pool(pool, tmp_path):
    directory = tmp_path / "pool"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(directory / "state.db").st_mode) == 0o600
    data = os.stat(directory / "data")
    assert data.st_size == 256 << 20 and data.st_blocks * 512 < (1 << 20)  # sparse
    # 48 bytes per 64 KiB block is below the 2 MiB floor.
    assert os.stat(directory / "metadata").st_size == 2 << 20
    line = witness.table(pool.name)[0]
    assert line.startswith(f"0 {256 << 11} thin-pool ")
    assert line.split()[5:] == ["128", "0", "0"]
    meta, _data_dev = witness.pool_devices(pool.name)
    listing = subprocess.run(
        ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE,AUTOCLEAR"], capture_output=True, text=True
    ).stdout
    assert f"{meta} {directory / 'metadata'} 1" in " ".join(listing.split()) or any(
        line.split()[:2] == [meta, str(directory / "metadata")] for line in listing.splitlines()
    )
    st = pool.status()
    assert str(st) == " ".join(witness.pool_status(pool.name))
    assert st.transaction_id == 0 and int(st.total_data) == 4096


def test_block_size_and_features_reach_the_table(tmp_path, make_pool):
    p = make_pool(
        directory=tmp_path / "p",
        data_size="64M",
        block_size="256K",
        low_water_mark=7,
        features=["error_if_no_space", "skip_block_zeroing"],
    )
    fields = witness.table(p.name)[0].split()[5:]
    assert fields == ["512", "7", "2", "skip_block_zeroing", "error_if_no_space"]
    assert p.status().no_space == "error_if_no_space"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": "96K"}, "multiple of 128 sectors"),
        ({"data_size": "100"}, "512-byte sectors"),
        ({"data_size": "1M", "block_size": "2M"}, "smaller than one data block"),
        ({"metadata_size": "1M"}, "2 MiB minimum"),
        ({"features": ["fast"]}, "unknown thin-pool feature fast"),
        ({"min_free_space": 100}, "min_free_space"),
    ],
)
def test_create_loop_refuses_bad_options_and_leaves_nothing(dm_name, tmp_path, kwargs, message):
    name = dm_name("pool")
    with pytest.raises(ValueError, match=message):
        libdm.Pool.create_loop(name, tmp_path / "p", **kwargs)
    assert name not in witness.names()
    assert not (tmp_path / "p").exists()


def test_create_loop_refuses_a_taken_name_or_directory(pool, dm_name, tmp_path):
    with pytest.raises(libdm.DeviceExistsError, match="exists already"):
        libdm.Pool.create_loop(pool.name, tmp_path / "other", data_size="64M")
    with pytest.raises(libdm.DeviceExistsError, match="holds a pool already"):
        libdm.Pool.create_loop(dm_name("pool"), tmp_path / "pool", data_size="64M")
    assert not (tmp_path / "other").exists()


class LabelledPool(libdm.Pool):
    """A subclass with state of its own, set up by its __init__."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label = "mine"


def test_a_subclass_is_initialised_by_every_constructor(dm_name, tmp_path):
    directory = tmp_path / "p"
    made = LabelledPool.create_loop(dm_name("pool"), directory, data_size="64M")
    try:
        assert type(made) is LabelledPool and made.label == "mine"
        assert made.create_thin("vol", "4M").pool is made
    finally:
        made.close()
    for opened in (LabelledPool.open(directory), LabelledPool.load(directory)):
        with opened:
            assert type(opened) is LabelledPool and opened.label == "mine"
    libdm.Pool.open(directory).destroy(remove_files=True)


def test_create_thin_sends_messages_and_activates(pool):
    dev = pool.create_thin("vol", "64M")
    assert (dev.name, dev.thin_id, dev.size) == ("vol", 0, 64 << 20)
    assert dev.path == f"/dev/mapper/{pool.name}-vol" and os.path.exists(dev.path)
    info = witness.info(pool.name)
    assert witness.table(dev.dm_name) == [f"0 {64 << 11} thin {info['major']}:{info['minor']} 0"]
    assert witness.thin_ids(pool.name) == {0}
    assert witness.transaction_id(pool.name) == 1
    assert witness.info(dev.dm_name)["uuid"].startswith("LIBDM-THIN-")
    assert str(dev.status()) == "0 -"
    write_pattern(dev.path, 7)
    assert int(dev.status().mapped) == 2048  # 1 MiB written = 2048 sectors


def test_create_thin_refuses_bad_input(pool):
    with pytest.raises(ValueError, match="whitespace"):
        pool.create_thin("a b", "1M")
    with pytest.raises(ValueError, match="512-byte sectors"):
        pool.create_thin("vol", 1000)
    with pytest.raises(ValueError, match="too long"):
        pool.create_thin("x" * 120, "1M")
    pool.create_thin("vol", "1M")
    with pytest.raises(libdm.DeviceExistsError, match="already has a device named 'vol'"):
        pool.create_thin("vol", "1M")
    assert witness.thin_ids(pool.name) == {0}
    assert witness.transaction_id(pool.name) == 1


def test_snapshot_of_an_active_origin_keeps_its_content(pool):
    origin = pool.create_thin("origin", "16M")
    write_pattern(origin.path, 1)
    snap = origin.snapshot("snap")
    write_pattern(origin.path, 2)
    assert read_at(snap.path) == bytes([1]) * (1 << 20)
    assert read_at(origin.path) == bytes([2]) * (1 << 20)
    assert isinstance(snap, libdm.Snapshot) and snap.parent == origin and snap.origin == origin
    assert origin.children() == [snap]
    assert witness.thin_ids(pool.name) == {0, 1}
    assert witness.transaction_id(pool.name) == 2
    assert witness.info(origin.dm_name)["attr"] == "L--w"  # resumed after the snapshot


def test_snapshot_resumes_the_origin_when_the_message_fails(pool):
    origin = pool.create_thin("origin", "16M")
    # The kernel holds id 1 behind libdm's back: the first create_snap,
    # sent while the origin is suspended, fails with EEXIST.  The origin
    # must be resumed after it, and the snapshot made with the next id.
    witness.dmsetup("message", pool.name, "0", "create_thin 1")
    snap = origin.snapshot("snap")
    assert snap.thin_id == 2
    assert witness.sysfs(origin.dm_name, "suspended") == "0"
    assert witness.info(origin.dm_name)["attr"] == "L--w"
    assert witness.thin_ids(pool.name) == {0, 1, 2}
    write_pattern(origin.path, 6)  # I/O flows: the origin is not left suspended


def test_snapshot_chain_and_lineage(pool):
    base = pool.create_thin("base", "8M")
    write_pattern(base.path, 0, length=4096)
    layers = [base]
    for i in range(1, 6):
        layer = layers[-1].snapshot(f"layer{i}")
        write_pattern(layer.path, i, offset=i * 4096, length=4096)
        layers.append(layer)
    top = layers[-1]
    for i in range(1, 6):
        assert read_at(top.path, i * 4096, 4096) == bytes([i]) * 4096
    assert read_at(layers[2].path, 3 * 4096, 4096) == bytes(4096)
    chain, dev = [], top
    while dev is not None:
        chain.append(dev.name)
        dev = dev.parent
    assert chain == ["layer5", "layer4", "layer3", "layer2", "layer1", "base"]
    assert [d.name for d in pool.devices()] == sorted(chain)
    assert witness.thin_ids(pool.name) == set(range(6))


def test_lowest_free_id_is_reused_and_kernel_held_ids_skipped(pool):
    a, b, c = (pool.create_thin(n, "1M") for n in ("a", "b", "c"))
    assert [a.thin_id, b.thin_id, c.thin_id] == [0, 1, 2]
    b.delete()
    assert witness.thin_ids(pool.name) == {0, 2}
    d = pool.create_thin("d", "1M")
    assert d.thin_id == 1
    # An id the kernel holds that libdm never made is skipped, never reused.
    witness.dmsetup("message", pool.name, "0", "create_thin 3")
    e = pool.create_thin("e", "1M")
    assert e.thin_id == 4
    assert witness.thin_ids(pool.name) == {0, 1, 2, 3, 4}


def test_delete_deactivates_and_removes_the_id(pool):
    dev = pool.create_thin("vol", "4M")
    dm_name = dev.dm_name
    dev.delete()
    assert dm_name not in witness.names()
    assert witness.thin_ids(pool.name) == set()
    assert witness.transaction_id(pool.name) == 2
    with pytest.raises(libdm.NoSuchDeviceError):
        pool.device("vol")


def test_an_origin_with_snapshots_can_be_deleted(pool):
    base = pool.create_thin("base", "8M")
    write_pattern(base.path, 0x21)
    child = base.snapshot("child")
    grandchild = child.snapshot("grandchild")
    write_pattern(child.path, 0x22, offset=1 << 20)
    base.delete()
    # The kernel dropped the origin's id; the snapshots keep their data.
    assert witness.thin_ids(pool.name) == {1, 2}
    assert base.dm_name not in witness.names()
    assert read_at(child.path) == bytes([0x21]) * (1 << 20)
    assert read_at(child.path, 1 << 20) == bytes([0x22]) * (1 << 20)
    assert read_at(grandchild.path) == bytes([0x21]) * (1 << 20)
    # The lineage stays true: the child is a root now, the grandchild
    # still its snapshot.
    assert pool.device("child").parent is None
    assert pool.device("grandchild").parent.name == "child"
    assert [d.name for d in pool.children("child")] == ["grandchild"]
    store = Store(pool.directory)
    try:
        assert store.device("child").parent is None
    finally:
        store.close()
    # And a reopen brings back the same tree.
    pool.close()
    again = libdm.Pool.open(pool.directory)
    try:
        assert again.device("child").parent is None
        assert read_at(again.device("grandchild").path) == bytes([0x21]) * (1 << 20)
    finally:
        again.close()


def test_deactivate_and_activate(pool):
    dev = pool.create_thin("vol", "4M")
    write_pattern(dev.path, 9)
    dev.deactivate()
    assert dev.dm_name not in witness.names() and not dev.active
    assert not Store(pool.directory).device("vol").active
    dev.activate()
    assert read_at(dev.path) == bytes([9]) * (1 << 20)
    assert Store(pool.directory).device("vol").active


def test_metadata_snapshot_is_exposed(pool):
    pool.create_thin("vol", "4M")
    meta, _ = witness.pool_devices(pool.name)
    with pool.metadata_snap():
        out = subprocess.run(
            ["thin_ls", "--metadata-snap", meta], capture_output=True, text=True, check=True
        ).stdout
        assert any(line.split()[:1] == ["0"] for line in out.splitlines())
        assert witness.pool_status(pool.name)[3] != "-"  # a held root
    assert witness.pool_status(pool.name)[3] == "-"


def test_open_is_idempotent_on_a_live_pool(pool):
    dev = pool.create_thin("vol", "4M")
    write_pattern(dev.path, 5)
    again = libdm.Pool.open(pool.directory)
    try:
        assert [d.name for d in again.devices()] == ["vol"]
        assert witness.transaction_id(pool.name) == 1
        assert read_at(again.device("vol").path) == bytes([5]) * (1 << 20)
    finally:
        again.close()


def test_open_after_teardown_uses_the_stored_configuration(dm_name, tmp_path):
    name = dm_name("pool")
    p = libdm.Pool.create_loop(
        name, tmp_path / "p", data_size="64M", block_size="128K", features=["skip_block_zeroing"]
    )
    a = p.create_thin("a", "4M")
    b = p.create_thin("b", "4M")
    write_pattern(a.path, 3)
    b.deactivate()
    p.close()
    # Tear everything down by hand, as a reboot would.
    for dev in (f"{name}-a", name):
        witness.dmsetup("remove", dev)
    reopened = libdm.Pool.open(tmp_path / "p")
    try:
        assert witness.table(name)[0].split()[5:] == ["256", "0", "1", "skip_block_zeroing"]
        assert f"{name}-a" in witness.names() and f"{name}-b" not in witness.names()
        assert read_at(reopened.device("a").path) == bytes([3]) * (1 << 20)
        assert witness.thin_ids(name) == {0, 1}
    finally:
        reopened.close()


def test_a_lazy_open_activates_each_device_on_first_use(dm_name, tmp_path):
    name = dm_name("pool")
    p = libdm.Pool.create_loop(name, tmp_path / "p", data_size="64M")
    a, b, c = (p.create_thin(n, "4M") for n in "abc")
    write_pattern(a.path, 3)
    b.format("ext4")
    c.deactivate()
    p.close()
    for dev in (f"{name}-a", f"{name}-b", name):
        witness.dmsetup("remove", dev)
    lazy = libdm.Pool.open(tmp_path / "p", lazy=True)
    try:
        # The pool is up, no thin device is, and nothing was lost.
        assert witness.names() & {name, f"{name}-a", f"{name}-b", f"{name}-c"} == {name}
        assert [(d.name, d.active) for d in lazy.devices()] == [
            ("a", False),
            ("b", False),
            ("c", False),
        ]
        with pytest.raises(libdm.NoSuchDeviceError):
            lazy.device("a").status()  # a read brings nothing up
        # First use: activate, or mount (each by the device's recorded table).
        assert read_at(lazy.device("a").activate().path) == bytes([3]) * (1 << 20)
        with lazy.device("b").mount() as point:
            assert os.path.ismount(point)
        assert f"{name}-b" in witness.names()
        # A device that was not active stays so: its use is refused.
        with pytest.raises(libdm.NoSuchDeviceError):
            lazy.device("c").format("ext4")
        assert f"{name}-c" not in witness.names()
    finally:
        lazy.close()
    # A full open brings up what the lazy one left (nothing here: a and b
    # are up), and a device recorded inactive stays down.
    libdm.Pool.open(tmp_path / "p").close()
    assert {f"{name}-a", f"{name}-b"} <= witness.names()
    assert f"{name}-c" not in witness.names()


def test_open_refuses_a_live_table_that_differs(pool):
    table = witness.table(pool.name)[0].split()
    witness.dmsetup("suspend", pool.name)
    witness.dmsetup("reload", pool.name, "--table", " ".join([*table[:6], "99", *table[7:]]))
    witness.dmsetup("resume", pool.name)
    with pytest.raises(libdm.StateError, match="low water mark 99, stored 0"):
        libdm.Pool.open(pool.directory)


def test_open_refuses_a_transaction_id_moved_by_someone_else(pool):
    pool.create_thin("vol", "4M")
    witness.dmsetup("message", pool.name, "0", "set_transaction_id 1 5")
    with pytest.raises(libdm.StateError, match="transaction 5 in the kernel but 1 in the store"):
        libdm.Pool.open(pool.directory)


def test_open_of_a_missing_or_corrupt_store(tmp_path):
    with pytest.raises(libdm.StateError, match=r"state\.db is missing"):
        libdm.Pool.open(tmp_path)
    (tmp_path / "state.db").write_bytes(b"not a database" * 100)
    with pytest.raises(libdm.StateError, match="unreadable"):
        libdm.Pool.open(tmp_path)
    assert (tmp_path / "state.db").read_bytes() == b"not a database" * 100


def test_a_second_process_waits_then_fails_clearly(pool):
    import fcntl

    fd = os.open(os.path.join(pool.directory, "lock"), os.O_RDWR)
    code = f"import libdm, sys\np = libdm.Pool.open({pool.directory!r}, lock_timeout=0.3)\n"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        os.close(fd)
    assert proc.returncode != 0
    assert "PoolLockedError" in proc.stderr and "another process" in proc.stderr


def test_min_free_space_refuses_new_devices(tmp_path, make_pool):
    p = make_pool(directory=tmp_path / "p", data_size="16M", min_free_space=50)
    dev = p.create_thin("vol", "16M")
    write_pattern(dev.path, 1, length=9 << 20)  # 9 of 16 MiB: 43% free
    with pytest.raises(libdm.PoolFullError) as caught:
        p.create_thin("more", "1M")
    assert "below its minimum free space of 50%" in str(caught.value)
    assert "of 256 data blocks free" in str(caught.value)
    with pytest.raises(libdm.PoolFullError):
        dev.snapshot("snap")
    assert witness.thin_ids(p.name) == {0}


def test_a_read_only_pool_refuses_changes_and_says_what_to_run(pool):
    dev = pool.create_thin("vol", "4M")
    table = witness.table(pool.name)[0].split()
    witness.dmsetup("suspend", pool.name)
    witness.dmsetup("reload", pool.name, "--table", " ".join([*table[:7], "1", "read_only"]))
    witness.dmsetup("resume", pool.name)
    for attempt in (
        lambda: pool.create_thin("x", "1M"),
        lambda: dev.snapshot("s"),
        lambda: dev.delete(),
    ):
        with pytest.raises(libdm.PoolReadOnlyError) as caught:
            attempt()
        assert "thin_check" in str(caught.value) and "thin_repair" in str(caught.value)
    assert dev.active  # the refused delete did not deactivate it
    # Back to read-write (a read-only pool cannot reserve a metadata
    # snapshot for the witness): nothing changed meanwhile.
    witness.dmsetup("suspend", pool.name)
    witness.dmsetup("reload", pool.name, "--table", " ".join(table))
    witness.dmsetup("resume", pool.name)
    assert witness.thin_ids(pool.name) == {0}
    assert witness.transaction_id(pool.name) == 1


def test_pool_info_report(pool):
    base = pool.create_thin("base", "8M").format("ext4")
    pool.set_base_device("base")
    report = pool.info().as_dict()
    assert report["Pool Name"] == pool.name
    assert report["Pool Blocksize"] == "64 KiB"
    assert report["Base Device Size"] == "8 MiB"
    # As docker info: the base device's filesystem, the loops, their files.
    blkid = subprocess.run(
        ["blkid", "-o", "value", "-s", "TYPE", base.path], capture_output=True, text=True
    ).stdout.strip()
    assert report["Backing Filesystem"] == blkid == "ext4"
    meta_loop, data_loop = witness.pool_devices(pool.name)
    assert report["Data file"] == data_loop and report["Metadata file"] == meta_loop
    assert report["Data loop file"] == os.path.join(pool.directory, "data")
    assert report["Metadata loop file"] == os.path.join(pool.directory, "metadata")
    findmnt = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", pool.directory], capture_output=True, text=True
    ).stdout.strip()
    assert report["Loop Files Filesystem"] == findmnt != ""
    assert report["Data Space Total"] == "256 MiB"
    assert report["Thin Pool Minimum Free Space"] == "25.6 MiB"
    assert report["Deferred Removal Enabled"] == "true"
    assert (
        report["Library Version"]
        == witness.dmsetup("version").splitlines()[0].split(":", 1)[1].strip()
    )
    fields = witness.pool_status(pool.name)
    used, total = map(int, fields[2].split("/"))
    info = pool.info()
    assert int(info.data_used) == used * 65536 and int(info.data_total) == total * 65536


def test_pool_info_asks_only_the_loops_its_table_names(pool, monkeypatch):
    # The live table names the two loop devices: the report asks those, by
    # the backing file's identity, and never searches every loop device
    # (a read per loop device, 17-25 ms in the test kernel).
    from libdm.dm import loop

    def search(*args, **kwargs):
        raise AssertionError("pool.info() searched the loop devices")

    monkeypatch.setattr(loop, "find", search)
    report = pool.info()
    meta_loop, data_loop = witness.pool_devices(pool.name)
    assert (report.data_file, report.metadata_file) == (data_loop, meta_loop)
    for dev, name in ((data_loop, "data"), (meta_loop, "metadata")):
        shown = subprocess.run(
            ["losetup", "-n", "-O", "BACK-FILE", dev], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert os.path.samefile(shown, os.path.join(pool.directory, name))


def test_available_space_is_clamped_by_the_backing_filesystem(dm_name, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32M", "tmpfs", str(small)], check=True)
    try:
        p = libdm.Pool.create_loop(dm_name("pool"), small / "p", data_size="1G")
        try:
            info = p.info()
            assert int(info.data_total) == 1 << 30
            assert int(info.data_available) <= 32 << 20
            assert info.loop_files_filesystem == "tmpfs"
        finally:
            p.destroy(remove_files=True)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_destroy_removes_devices_pool_loops_and_files(dm_name, tmp_path):
    p = libdm.Pool.create_loop(dm_name("pool"), tmp_path / "p", data_size="64M")
    p.create_thin("a", "4M").snapshot("b")
    name = p.name
    meta, data = witness.pool_devices(name)
    p.destroy(remove_files=True)
    assert not any(n.startswith(name) for n in witness.names())
    assert not (tmp_path / "p").exists()
    for loopdev in (meta, data):
        backing = f"/sys/block/{os.path.basename(loopdev)}/loop/backing_file"
        assert not os.path.exists(backing)


def test_destroy_keeping_files_can_be_reopened(dm_name, tmp_path):
    p = libdm.Pool.create_loop(dm_name("pool"), tmp_path / "p", data_size="64M")
    write_pattern(p.create_thin("a", "4M").path, 4)
    name = p.name
    p.destroy()
    assert not any(n.startswith(name) for n in witness.names())
    again = libdm.Pool.open(tmp_path / "p")
    try:
        assert read_at(again.device("a").path) == bytes([4]) * (1 << 20)
    finally:
        again.close()


def test_filesystems_and_the_base_device_pattern(pool):
    base = pool.create_thin("base", "64M").format("ext4", label="base")
    with base.mount() as mnt, open(os.path.join(mnt, "from-base"), "w") as fh:
        fh.write("base")
    layer = base.snapshot("layer")
    with layer.mount() as mnt:
        with open(os.path.join(mnt, "from-base")) as fh:
            assert fh.read() == "base"
        with open(os.path.join(mnt, "from-layer"), "w") as fh:
            fh.write("layer")
    with base.mount() as mnt:
        assert not os.path.exists(os.path.join(mnt, "from-layer"))
    xfs = pool.create_thin("xfs", "300M").format("xfs")
    blkid = subprocess.run(
        ["blkid", "-o", "value", "-s", "TYPE", xfs.path], capture_output=True, text=True
    ).stdout.strip()
    assert blkid == "xfs"
    with pytest.raises(ValueError, match="not supported"):
        base.format("ntfs")
