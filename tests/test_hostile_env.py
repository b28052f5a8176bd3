"""A hostile or damaged environment around a pool: its state directory
shared, read-only or holding someone else's files, symlinks planted in it,
its backing files lost or swapped, its store naming other disks, its
stored configuration corrupt.

libdm must refuse with an error that names what is in the way, and must
never delete, truncate, chmod, format or attach anything it did not make.
What happened is checked against the files themselves, dmsetup, losetup
and the devices' bytes, never against libdm's own report.
"""

import errno
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import time

import pytest
from support import store as store_support
from support import witness
from support.blockio import MiB, attach, read_at, write_pattern

import libdm
from libdm.thin.core import PoolCore
from libdm.thin.store import Store

kernel = pytest.mark.kernel

POOL_FILES = ["state.db", "state.db-wal", "state.db-shm", "lock", "data", "metadata"]


# -- helpers -----------------------------------------------------------------------


def picture(directory):
    """What a directory holds, followed by nothing: for each entry its
    type, mode, owner, size, inode, symlink target and content digest."""
    out = {".": _entry(directory)}
    for name in sorted(os.listdir(directory)):
        out[name] = _entry(os.path.join(directory, name))
    return out


def _entry(path):
    st = os.lstat(path)
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    digest = None
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
    return (
        stat.S_IFMT(st.st_mode),
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_size,
        st.st_ino,
        link,
        digest,
    )


def victim(path, size=MiB, mode=0o644, byte=0x5A):
    """A root-owned file full of ``byte`` that no pool may touch."""
    with open(path, "wb") as fh:
        fh.write(bytes([byte]) * size)
    os.chmod(path, mode)
    return path


def loops_of(path):
    """The loop devices losetup shows for ``path``."""
    out = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True).stdout
    return [line.split(":")[0] for line in out.splitlines() if line.strip()]


def set_config(directory, **changes):
    """Rewrite the stored configuration with sqlite3, as a forger would;
    a value of ``None`` drops the key."""
    db = sqlite3.connect(os.path.join(directory, "state.db"))
    try:
        config = json.loads(db.execute("SELECT config FROM pool").fetchone()[0])
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        db.execute("UPDATE pool SET config = ?", (json.dumps(config),))
        db.commit()
    finally:
        db.close()


def stored_config(directory):
    db = sqlite3.connect(os.path.join(directory, "state.db"))
    try:
        return json.loads(db.execute("SELECT config FROM pool").fetchone()[0])
    finally:
        db.close()


def assert_no_pool_devices(name):
    assert not any(n == name or n.startswith(f"{name}-") for n in witness.names())


@pytest.fixture
def loop_pool(make_pool):
    """A loop pool in ``tmp_path/pool`` with a thin device holding 0x11."""
    pool = make_pool(data_size="64M")
    vol = pool.create_thin("vol", "8M")
    write_pattern(vol.path, 0x11)
    return pool


def assert_pool_intact(pool):
    """The pool's live table and its device's bytes are still there."""
    assert witness.table(pool.name)[0].split()[2] == "thin-pool"
    assert read_at(f"/dev/mapper/{pool.name}-vol") == bytes([0x11]) * MiB


def take_down(pool):
    """Remove the pool's devices (the state stays): as after a reboot."""
    directory = pool.directory
    pool.destroy()
    assert_no_pool_devices(pool.name)
    return directory


# -- item 1: files and directories libdm did not make ----------------------------------


@kernel
@pytest.mark.parametrize(
    "names", [["data", "metadata"], ["lock"], ["state.db-wal"], ["state.db-shm"], ["metadata"]]
)
def test_create_loop_refuses_a_directory_holding_pool_files_and_keeps_them(
    dm_name, tmp_path, names
):
    directory = tmp_path / "pool"
    directory.mkdir(mode=0o755)
    for name in names:
        victim(directory / name, mode=0o640)
    before = picture(directory)
    pool_name = dm_name("pool")
    with pytest.raises(libdm.DeviceExistsError) as caught:
        libdm.Pool.create_loop(pool_name, directory, data_size="64M")
    assert isinstance(caught.value, FileExistsError)
    for name in names:
        assert str(directory / name) in str(caught.value)
    assert picture(directory) == before  # nothing deleted, truncated or chmod'ed
    assert_no_pool_devices(pool_name)


@kernel
def test_a_pool_whose_state_was_lost_is_not_overwritten(loop_pool, dm_name):
    directory = take_down(loop_pool)
    os.unlink(os.path.join(directory, "state.db"))
    before = picture(directory)
    with pytest.raises(libdm.DeviceExistsError) as caught:
        libdm.Pool.create_loop(dm_name("again"), directory, data_size="64M")
    for name in ("data", "metadata", "lock"):
        assert os.path.join(directory, name) in str(caught.value)
    assert picture(directory) == before


@kernel
def test_a_second_pool_over_the_first_is_refused_and_the_first_is_intact(loop_pool, dm_name):
    directory = loop_pool.directory
    table = witness.table(loop_pool.name)
    before = {n: picture(directory)[n][:5] for n in ("data", "metadata", "state.db", "lock")}
    second = dm_name("second")
    with pytest.raises(libdm.DeviceExistsError, match="holds a pool already"):
        libdm.Pool.create_loop(second, directory, data_size="64M")
    assert_no_pool_devices(second)
    assert witness.table(loop_pool.name) == table
    assert_pool_intact(loop_pool)
    after = picture(directory)
    # Same files (inode, owner, mode, type); only the pool's own writes change them.
    assert {n: after[n][:3] + after[n][4:5] for n in before} == {
        n: b[:3] + b[4:5] for n, b in before.items()
    }
    # The first pool still comes back after a reboot, its data readable.
    take_down(loop_pool)
    again = libdm.Pool.open(directory)
    try:
        assert_pool_intact(again)
    finally:
        again.close()


@kernel
def test_an_existing_directory_keeps_its_mode_and_its_other_files(dm_name, tmp_path):
    directory = tmp_path / "shared-but-safe"
    directory.mkdir()
    os.chmod(directory, 0o755)
    victim(directory / "notes")
    victim(directory / "state.db-x")  # named like the store, but not the pool's
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755
    assert stored_config(directory)["made_directory"] is False
    pool.create_thin("vol", "4M")
    pool.close()
    again = libdm.Pool.open(directory)
    again.destroy(remove_files=True)
    # Only the pool's own files went; the directory and the rest stay.
    assert sorted(os.listdir(directory)) == ["notes", "state.db-x"]
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755


@kernel
def test_a_directory_libdm_made_is_private_and_goes_with_the_pool(dm_name, tmp_path):
    directory = tmp_path / "made" / "pool"
    old = os.umask(0)
    try:
        pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    for name in ("state.db", "data", "metadata", "lock"):
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600, name
    assert stored_config(directory)["made_directory"] is True
    pool.destroy(remove_files=True)
    assert not directory.exists() and (tmp_path / "made").is_dir()


@kernel
def test_an_old_store_without_the_made_directory_record_keeps_the_directory(dm_name, tmp_path):
    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M").close()
    set_config(directory, made_directory=None)
    libdm.Pool.open(directory).destroy(remove_files=True)
    assert directory.is_dir() and os.listdir(directory) == []


@kernel
def test_a_failed_create_removes_only_what_it_made(dm_name, tmp_path, monkeypatch):
    directory = tmp_path / "pool"
    directory.mkdir(mode=0o700)
    victim(directory / "notes")
    victim(directory / "state.db-x")  # named like the store, but not the pool's
    before = picture(directory)
    # A creation makes the pool device through its core (the Pool comes after).
    activate = PoolCore.activate_pool

    def fails_after_the_device_is_made(core, operation):
        activate(core, operation)
        raise RuntimeError("stopped after the pool device was made")

    monkeypatch.setattr(PoolCore, "activate_pool", fails_after_the_device_is_made)
    name = dm_name("pool")
    with pytest.raises(RuntimeError, match="stopped after"):
        libdm.Pool.create_loop(name, directory, data_size="64M")
    assert picture(directory) == before
    assert_no_pool_devices(name)


# -- item 6: a state directory others can write, and symlinks in it ------------------


@kernel
@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770, 0o702])
def test_create_loop_refuses_a_shared_directory_and_leaves_its_mode(dm_name, tmp_path, mode):
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, mode)
    before = picture(directory)
    name = dm_name("pool")
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.create_loop(name, directory, data_size="64M")
    said = str(caught.value)
    assert str(directory) in said and oct(mode)[2:] in said and "root" in said
    assert picture(directory) == before
    assert_no_pool_devices(name)


@kernel
def test_create_loop_refuses_a_directory_owned_by_someone_else(dm_name, small_fs):
    # On a tmpfs: the test kernel's hostfs shows the host's owners.
    directory = small_fs / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, 65534, 65534)
    before = picture(directory)
    name = dm_name("pool")
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.create_loop(name, directory, data_size="32M")
    assert str(directory) in str(caught.value) and "65534" in str(caught.value)
    assert picture(directory) == before
    assert_no_pool_devices(name)


@kernel
@pytest.mark.parametrize("which", ["state.db", "lock", "data"])
def test_open_refuses_a_pool_file_owned_by_someone_else(dm_name, small_fs, which):
    directory = small_fs / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="32M")
    take_down(pool)
    path = directory / which
    os.chown(path, 65534, 65534)
    before = picture(directory)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.open(directory)
    assert str(path) in str(caught.value) and "65534" in str(caught.value)
    assert picture(directory) == before
    assert_no_pool_devices(pool.name)


@kernel
def test_open_refuses_a_state_directory_others_can_write(loop_pool, tmp_path):
    directory = take_down(loop_pool)
    os.chmod(directory, 0o777)
    before = picture(directory)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.open(directory)
    assert directory in str(caught.value) and "777" in str(caught.value)
    assert picture(directory) == before
    assert_no_pool_devices(loop_pool.name)
    os.chmod(directory, 0o700)
    libdm.Pool.open(directory).close()


@kernel
def test_a_store_symlink_does_not_chmod_its_target(loop_pool, tmp_path):
    # Store used to chmod every file whose name starts with state.db.
    target = victim(tmp_path / "victim", mode=0o644)
    os.symlink(target, os.path.join(loop_pool.directory, "state.db-x"))
    libdm.Pool.load(loop_pool.directory).close()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644


@kernel
@pytest.mark.parametrize("name", ["state.db-wal", "state.db-shm", "state.db"])
def test_a_symlinked_store_file_is_refused(loop_pool, tmp_path, name):
    directory = loop_pool.directory
    loop_pool.close()  # sqlite removes -wal and -shm on the last close
    target = victim(tmp_path / "victim", mode=0o644)
    path = os.path.join(directory, name)
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.load(directory)
    assert path in str(caught.value) and "symbolic link" in str(caught.value)
    assert picture(tmp_path)["victim"] == _entry(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    with open(target, "rb") as fh:
        assert fh.read() == bytes([0x5A]) * MiB


@kernel
def test_a_lock_symlink_is_refused_and_creates_nothing(loop_pool, tmp_path):
    directory = loop_pool.directory
    loop_pool.close()
    lock = os.path.join(directory, "lock")
    os.unlink(lock)
    planted = tmp_path / "planted"
    os.symlink(planted, lock)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.load(directory)
    assert lock in str(caught.value)
    assert not os.path.lexists(planted)


@kernel
def test_resize_does_not_grow_a_file_a_data_symlink_points_to(loop_pool, tmp_path):
    target = victim(tmp_path / "victim", size=MiB, mode=0o600)
    data = os.path.join(loop_pool.directory, "data")
    os.rename(data, data + ".moved")  # the loop keeps the inode
    os.symlink(target, data)
    with pytest.raises(libdm.StateError) as caught:
        loop_pool.resize(data_size="128M")
    assert data in str(caught.value)
    assert os.stat(target).st_size == MiB
    assert witness.table(loop_pool.name)[0].split()[1] == str(64 * MiB // 512)


@kernel
@pytest.mark.parametrize("which", ["data", "metadata"])
def test_open_does_not_attach_a_symlinked_backing_file(loop_pool, tmp_path, which):
    directory = take_down(loop_pool)
    target = victim(tmp_path / "victim", size=64 * MiB, byte=0)
    path = os.path.join(directory, which)
    os.rename(path, path + ".moved")
    os.symlink(target, path)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.open(directory)
    assert path in str(caught.value)
    assert loops_of(target) == [] and loops_of(path + ".moved") == []
    assert_no_pool_devices(loop_pool.name)
    with open(target, "rb") as fh:
        assert not any(fh.read())


@kernel
@pytest.mark.parametrize("how", ["attach", "attach_or_find", "find"])
def test_loop_functions_can_refuse_a_symlink(tmp_path, how):
    from libdm.dm import loop

    target = victim(tmp_path / "victim", size=MiB, byte=0)
    link = tmp_path / "link"
    os.symlink(target, link)
    with pytest.raises(OSError) as caught:
        getattr(loop, how)(link, follow_symlinks=False)
    assert caught.value.errno == errno.ELOOP and caught.value.filename == str(link)
    assert loops_of(target) == []


# -- missing or replaced backing files -------------------------------------------------


@kernel
@pytest.mark.parametrize("which", ["data", "metadata"])
def test_open_refuses_a_missing_backing_file(loop_pool, which):
    directory = take_down(loop_pool)
    path = os.path.join(directory, which)
    os.unlink(path)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.open(directory)
    assert path in str(caught.value) and "missing" in str(caught.value)
    assert_no_pool_devices(loop_pool.name)
    other = os.path.join(directory, "metadata" if which == "data" else "data")
    assert loops_of(other) == []  # nothing left attached


@kernel
@pytest.mark.parametrize("which", ["data", "metadata"])
def test_open_refuses_a_replaced_backing_file(loop_pool, which):
    directory = take_down(loop_pool)
    path = os.path.join(directory, which)
    # Same size, same bytes even: another file all the same.
    subprocess.run(["cp", "--sparse=always", path, path + ".copy"], check=True)
    os.rename(path + ".copy", path)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.open(directory)
    assert path in str(caught.value) and "replaced" in str(caught.value)
    assert loops_of(path) == []
    assert_no_pool_devices(loop_pool.name)


@kernel
def test_an_old_store_without_file_identities_still_opens(loop_pool):
    directory = take_down(loop_pool)
    config = stored_config(directory)
    assert set(config["file_inodes"]) == {"data", "metadata"}
    set_config(directory, file_inodes=None)
    again = libdm.Pool.open(directory)
    try:
        assert_pool_intact(again)
    finally:
        again.close()


# -- block devices named in the store ----------------------------------------------------


@pytest.fixture
def block_pool(tmp_path, make_pool):
    data = attach(tmp_path, "data.img", 64 * MiB)
    meta = attach(tmp_path, "meta.img", 4 * MiB)
    pool = make_pool(data, meta)
    vol = pool.create_thin("vol", "8M")
    write_pattern(vol.path, 0x11)
    return pool, data, meta


@kernel
def test_a_forged_store_naming_another_disk_is_refused(block_pool, tmp_path):
    pool, _data, _meta = block_pool
    disk = attach(tmp_path, "disk.img", 64 * MiB)  # blank where the forger points
    directory = take_down(pool)
    # A fresh-looking pool (no transaction, no devices), so that nothing
    # asks for metadata already there: the kernel would format the region.
    set_config(directory, meta_segments=[[disk, 8192, 8192]])
    db = sqlite3.connect(os.path.join(directory, "state.db"))
    with db:
        db.execute("UPDATE pool SET transaction_id = 0")
        db.execute("DELETE FROM devices")
    db.close()
    before = witness.checksum(disk)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.open(directory)
    assert disk in str(caught.value)
    assert witness.checksum(disk) == before
    assert_no_pool_devices(pool.name)


@kernel
def test_another_device_under_a_recorded_name_is_refused(block_pool, tmp_path):
    pool, data, _meta = block_pool
    directory = take_down(pool)
    assert [d["size"] for d in stored_config(directory)["data_segment_devices"]] == [64 * MiB]
    subprocess.run(["losetup", "-d", data], check=True)
    other = tmp_path / "other.img"
    victim(other, size=32 * MiB, byte=0)
    subprocess.run(["losetup", data, str(other)], check=True)
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.open(directory)
    said = str(caught.value)
    assert data in said and str(64 * MiB) in said and str(32 * MiB) in said
    assert_no_pool_devices(pool.name)
    with open(other, "rb") as fh:
        assert not any(fh.read())


@kernel
def test_an_old_block_store_without_device_sizes_still_opens(block_pool):
    pool, _data, _meta = block_pool
    directory = take_down(pool)
    set_config(directory, data_segment_devices=None, meta_segment_devices=None)
    again = libdm.Pool.open(directory)
    try:
        assert_pool_intact(again)
    finally:
        again.close()


# -- a read-only filesystem ----------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of its own, unmounted after the test."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt, mode):
    """Remount read-only or read-write; loops just detached may hold the
    files for a moment."""
    for _ in range(50):
        if subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)]).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"cannot remount {mnt} {mode}")


@kernel
def test_open_on_a_read_only_filesystem_is_a_clear_error(dm_name, small_fs):
    directory = small_fs / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="32M")
    vol = pool.create_thin("vol", "8M")
    write_pattern(vol.path, 0x11)
    take_down(pool)
    remount(small_fs, "ro")
    before = picture(directory)
    for attempt in (libdm.Pool.open, libdm.Pool.load):
        with pytest.raises(OSError) as caught:
            attempt(directory)
        assert caught.value.errno == errno.EROFS
        assert "read-only" in str(caught.value) and str(directory) in str(caught.value)
    assert picture(directory) == before
    assert_no_pool_devices(pool.name)
    assert loops_of(directory / "data") == [] and loops_of(directory / "metadata") == []
    remount(small_fs, "rw")
    again = libdm.Pool.open(directory)
    try:
        assert_pool_intact(again)
    finally:
        again.destroy()


@kernel
@pytest.mark.parametrize("exists", [True, False])
def test_create_loop_on_a_read_only_filesystem_is_a_clear_error(dm_name, small_fs, exists):
    directory = small_fs / "pool"
    if exists:
        directory.mkdir(mode=0o700)
    remount(small_fs, "ro")
    before = picture(small_fs)
    name = dm_name("pool")
    with pytest.raises(OSError) as caught:
        libdm.Pool.create_loop(name, directory, data_size="32M")
    assert caught.value.errno == errno.EROFS
    assert "read-only" in str(caught.value) and str(small_fs) in str(caught.value)
    assert picture(small_fs) == before
    assert_no_pool_devices(name)


# -- item 7: a corrupt stored configuration (no kernel needed) ------------------------------


_BASE = json.dumps(
    dict(store_support.CONFIG, base_device=None, data_file="data", metadata_file="metadata")
)


def _store_with_pool(directory):
    store_support.made(directory, json.loads(_BASE)).close()


def _corrupt(directory, column, value):
    db = sqlite3.connect(os.path.join(directory, "state.db"))
    try:
        db.execute(f"UPDATE pool SET {column} = ?", (value,))
        db.commit()
    finally:
        db.close()


@pytest.mark.parametrize(
    "config, field",
    [
        ("{not json", "config"),
        ("", "config"),
        ("[]", "config"),
        ('{"low_water_mark": 0}', "block_size"),
        (json.dumps(dict(store_support.CONFIG, block_size="big")), "block_size"),
    ],
)
def test_a_corrupt_stored_config_is_a_state_error(tmp_path, config, field):
    directory = str(tmp_path / "state")
    _store_with_pool(directory)
    _corrupt(directory, "config", config)
    store = Store(directory)
    try:
        with pytest.raises(libdm.StateError) as caught:
            store.pool()
    finally:
        store.close()
    said = str(caught.value)
    assert os.path.join(directory, "state.db") in said and field in said


@pytest.mark.parametrize(
    "kind, config, field",
    [
        ("zfs", {}, "kind"),
        ("block", {"meta_segments": [["/dev/x", 0, None]]}, "data_segments"),
        ("block", {"meta_segments": "x", "data_segments": []}, "meta_segments"),
    ],
)
def test_an_unknown_kind_or_bad_backing_is_a_state_error(tmp_path, kind, config, field):
    directory = str(tmp_path / "state")
    _store_with_pool(directory)
    _corrupt(directory, "kind", kind)
    _corrupt(directory, "config", json.dumps(dict(json.loads(_BASE), **config)))
    with pytest.raises(libdm.StateError) as caught:
        libdm.Pool.load(directory)
    said = str(caught.value)
    assert os.path.join(directory, "state.db") in said and field in said and kind in said
