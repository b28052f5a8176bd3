"""The state store on a hostile filesystem, in the kernel: a state
directory whose filesystem fills up, and one whose disk starts failing.

libdm must keep listing the pool, say what happened (a ``StateError``
naming ``state.db``, never a bare ``OSError`` or an ``sqlite3`` error),
change nothing it did not finish, and lose nothing.  What happened is
checked with dmsetup, thin_dump and the store read by sqlite3.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from support import witness
from support.blockio import attach
from support.store import intent, made

import libdm
from libdm.thin.store import DB_NAME, Store
from libdm.thin.units import Sectors

kernel = pytest.mark.kernel


class Result(NamedTuple):
    code: int
    out: str
    err: str


def sh(*args: object) -> Result:
    """``python -m libdm ARGS`` as a process of its own."""
    environ = {k: v for k, v in os.environ.items() if k != "LIBDM_POOL"}
    proc = subprocess.run(
        [sys.executable, "-m", "libdm", *map(str, args)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def stored_names(directory: Path) -> list[str]:
    """The devices state.db holds, read by sqlite3 alone."""
    db = sqlite3.connect(directory / DB_NAME, timeout=30)
    try:
        return [r[0] for r in db.execute("SELECT name FROM devices ORDER BY name")]
    finally:
        db.close()


def fill(mnt: Path) -> Path:
    """Fill the filesystem to the last block; returns the filler file."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\1" * 65536)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\1" * 512)
    finally:
        os.close(fd)
    assert os.statvfs(mnt).f_bavail == 0
    return filler


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own, unmounted after the test."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _hold(directory: str, ready: Callable[[], None], stop: float) -> None:  # pragma: no cover
    """A process with the pool open, as the monitor service keeps it."""
    pool = libdm.Pool.load(directory)
    pool.devices()
    ready()
    while time.monotonic() < stop:
        time.sleep(0.05)
    pool.close()
    os._exit(0)


@kernel
def test_a_full_state_filesystem_keeps_listings_working_and_loses_nothing(
    dm_name: Callable[[str], str], small_fs: Path, tmp_path: Path
) -> None:
    """The state directory's filesystem fills up (the pool's disks are
    elsewhere): listings and reports work, with another process holding
    the pool open and without; a change is either done and reported done,
    or refused before the kernel is told, naming the store and the full
    filesystem; with the space back, everything is there."""
    directory = small_fs / "p"
    data, meta = attach(tmp_path, "data.img", 64 << 20), attach(tmp_path, "meta.img", 4 << 20)
    pool = libdm.Pool.create(dm_name("pool"), data, meta, state_dir=directory)
    name = pool.name
    for device in ("a", "b"):
        pool.create_thin(device, "8M")
    pool.close()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(directory), ready.set, time.monotonic() + 120))
    holder.start()
    try:
        assert ready.wait(60)
        filler = fill(small_fs)
        for attempt in ("held", "alone"):
            if attempt == "alone":
                holder.kill()
                holder.join()
            ids = witness.thin_ids(name)
            listed = sh("--pool", directory, "thin", "ls")
            assert listed.code == 0, (attempt, listed)
            assert {"a", "b"} <= set(listed.out.split()), listed.out
            info = sh("--pool", directory, "pool", "info")
            assert info.code == 0, (attempt, info)
            new = f"c-{attempt}"
            made = sh("--pool", directory, "thin", "create", new, "8M")
            if made.code == 0:
                assert f"{name}-{new}" in witness.names()
                assert len(witness.thin_ids(name)) == len(ids) + 1
            else:
                assert made.code == 1 and "Traceback" not in made.err, made
                assert str(directory / DB_NAME) in made.err and "full" in made.err, made.err
                assert f"{name}-{new}" not in witness.names()
                assert witness.thin_ids(name) == ids  # the kernel was not told
        os.unlink(filler)
        again = sh("--pool", directory, "thin", "create", "d", "8M")
        assert again.code == 0, again
    finally:
        holder.kill()
        holder.join()
    reopened = libdm.Pool.open(directory)
    try:
        names = {device.name for device in reopened.devices()}
        assert {"a", "b", "d"} <= names <= {"a", "b", "c-held", "c-alone", "d"}
        assert sorted(names) == stored_names(directory)
        assert {reopened.device(n).thin_id for n in names} == witness.thin_ids(name)
    finally:
        reopened.destroy(remove_files=True)


# -- a failing disk ----------------------------------------------------------------------


@pytest.fixture
def failing_fs(
    dm_name: Callable[[str], str], tmp_path: Path
) -> Iterator[tuple[Path, Callable[[], None]]]:
    """An ext4 filesystem on a device-mapper device of its own, and a
    function that turns the device into an ``error`` target (every I/O
    fails with EIO from then on)."""
    backing = tmp_path / "disk"
    with open(backing, "wb") as fh:
        fh.truncate(64 << 20)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = dm_name("disk")
    sectors = (64 << 20) // 512
    witness.dmsetup("create", name, "--table", f"0 {sectors} linear {loop} 0")
    witness.dmsetup("mknodes", name)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", f"/dev/mapper/{name}"], check=True)
        subprocess.run(
            ["mount", "-o", "errors=continue", f"/dev/mapper/{name}", str(mnt)], check=True
        )
        os.chmod(mnt, 0o700)

        def fail() -> None:
            witness.dmsetup("suspend", "--noflush", name)
            witness.dmsetup("load", name, "--table", f"0 {sectors} error")
            witness.dmsetup("resume", name)

        yield mnt, fail
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        time.sleep(0.2)
        subprocess.run(["dmsetup", "remove", "--retry", name], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


@kernel
def test_a_failing_state_filesystem_is_a_state_error_naming_the_store(
    failing_fs: tuple[Path, Callable[[], None]],
) -> None:
    mnt, fail = failing_fs
    directory = mnt / "state"
    store = made(directory)
    store.add_device("kept", 1, Sectors(2048), None)
    fail()
    errors: list[BaseException] = []
    # A durable change: its sync fails, and it is reported as not stored.
    try:
        with store.transaction():
            store.add_intent(intent(2, "create_thin", 2, "lost", 2048))
    except BaseException as exc:
        errors.append(exc)
    # A fresh open of a store on the failed disk.
    try:
        other = Store(directory)
        try:
            other.devices()
            with other.transaction():
                other.add_device("other", 3, 2048, None)
        finally:
            other.close()
    except BaseException as exc:
        errors.append(exc)
    store.close()  # never raises for the checkpoint the disk refuses
    # Nothing left in the page cache: an open reads the failed disk.
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")
    try:
        Store(directory).close()
    except BaseException as exc:
        errors.append(exc)
    else:
        raise AssertionError("a store on a failed disk opened")
    assert errors, "a change on a failed disk was reported stored"
    for exc in errors:
        assert isinstance(exc, libdm.StateError), repr(exc)
        said = str(exc)
        assert str(directory) in said, said
        assert any(code in said for code in ("SQLITE_IOERR", "SQLITE_READONLY", "[EIO]")), said


# -- a pool written by the older libdm ----------------------------------------------------

POOL_V2 = Path(__file__).resolve().parent / "data" / "pool-v2.tar.gz"


@kernel
def test_a_pool_with_an_unfolded_log_opens_upgraded_with_every_device(
    dm_name: Callable[[str], str], tmp_path: Path
) -> None:
    """A loop pool written by the libdm with the log (tests/data/
    make_pool_v2.py: a process killed with it open left a create, a
    snapshot and a delete in the log only), after a reboot: Pool.open
    upgrades its store, removes the log, and every device is there with
    its contents, as the kernel's metadata says (thin_dump)."""
    import hashlib
    import json
    import shutil
    import tarfile

    with tarfile.open(POOL_V2) as tar:
        tar.extractall(tmp_path, filter="data")
    directory = tmp_path / "pool"
    os.chmod(directory, 0o700)
    expected = json.loads((directory / "expected.json").read_text())
    os.unlink(directory / "expected.json")
    assert (directory / "state.db-log").exists()
    # The first open upgrades the store: the log checked, folded, removed.
    Store(directory).close()
    assert not (directory / "state.db-log").exists()
    # The copy is the pool's restore: its own name here, and its files'
    # identities are the copies' (the log's rows, folded now, named the
    # originals).
    name = dm_name("pool")
    db = sqlite3.connect(directory / DB_NAME)
    with db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            "3",
        )
        (text,) = db.execute("SELECT config FROM pool").fetchone()
        config = json.loads(text)
        config["file_inodes"] = {
            key: os.stat(directory / config[f"{key}_file"]).st_ino for key in ("data", "metadata")
        }
        db.execute(
            "UPDATE pool SET name = ?, config = ?", (name, json.dumps(config, sort_keys=True))
        )
    db.close()
    pool = libdm.Pool.open(directory)
    try:
        assert {d.name: d.thin_id for d in pool.devices()} == {
            device: row["thin_id"] for device, row in expected.items()
        }
        assert witness.thin_ids(name) == {row["thin_id"] for row in expected.values()}
        for device, row in expected.items():
            path = pool.device(device).activate().path
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            assert digest == row["sha256"], device
        assert pool.device("snap").parent is not None
    finally:
        pool.destroy(remove_files=True)
    shutil.rmtree(tmp_path / "pool", ignore_errors=True)


@pytest.mark.kernel
def test_a_creation_that_meets_a_full_filesystem_can_be_retried(dm_name, tmp_path):
    """A pool created on a state filesystem too small for SQLite's files
    fails with a libdm error and takes back everything it made, the WAL
    and its index included, so that once there is room the same create
    succeeds (it was refused as "files named like a pool's")."""
    small = tmp_path / "small"
    small.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", small], check=True
    )
    name = dm_name("pool")
    try:
        with pytest.raises(libdm.DMError):
            libdm.Pool.create_loop(name, small / "p", data_size="64M")
        left = sorted(os.listdir(small / "p")) if (small / "p").exists() else []
        assert left == [], left
        subprocess.run(["mount", "-o", "remount,size=16m", small], check=True)
        pool = libdm.Pool.create_loop(name, small / "p", data_size="64M")
        try:
            assert name in witness.names()
        finally:
            pool.destroy(remove_files=True)
    finally:
        subprocess.run(["umount", "-l", small], check=False)


@pytest.mark.kernel
def test_open_of_a_damaged_store_leaves_nothing_live(dm_name, tmp_path):
    """A page of the store damaged while the pool was down: open refuses,
    saying nothing was changed, and that is true: the pool device and the
    thin devices it brought up before it met the damage are down again,
    and the loop devices detached, so nothing uses a pool whose records
    cannot be read."""
    name = dm_name("pool")
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(name, directory, data_size="64M")
    pool.create_thin("a", "8M").snapshot("s")
    pool.destroy()  # down, files and store kept: a reboot
    fd = os.open(directory / DB_NAME, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(4096), 4 * 4096)  # one page of the store
    finally:
        os.close(fd)
    with pytest.raises(libdm.StateError, match="nothing was changed") as err:
        libdm.Pool.open(directory)
    assert "SQLITE_CORRUPT" in str(err.value)
    assert not [n for n in witness.names() if n == name or n.startswith(f"{name}-")]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(directory) not in loops, loops
