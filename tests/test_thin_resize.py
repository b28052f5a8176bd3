"""Resizing thin devices online, with their filesystems (lvextend's part).

Witnesses: dmsetup table, df (statvfs of the mount), blkid, the pool's
used data blocks from dmsetup status.
"""

import os
import re
import signal
import subprocess

import pytest
from support import witness
from support.blockio import MiB, read_at, write_pattern
from support.children import run_child

import libdm
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel


@pytest.fixture
def pool(make_pool):
    return make_pool(data_size="512M")


def length(dm_name):
    return int(witness.table(dm_name)[0].split()[1])


# xfs wants at least 300 MB.
SIZES = {"ext4": ("64M", "256M"), "xfs": ("320M", "1280M")}


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_grow_a_mounted_device_and_its_filesystem(pool, fstype):
    small, big = SIZES[fstype]
    dev = pool.create_thin("vol", small).format(fstype)
    with dev.mount() as root:
        with open(os.path.join(root, "keep"), "wb") as fh:
            fh.write(b"k" * 4096)
        before = os.statvfs(root)
        dev = dev.resize(big, grow_filesystem=True)
        after = os.statvfs(root)
        assert after.f_blocks * after.f_frsize > 3 * before.f_blocks * before.f_frsize
        with open(os.path.join(root, "keep"), "rb") as fh:
            assert fh.read() == b"k" * 4096
    assert int(dev.size) == libdm.parse_size(big)
    assert length(dev.dm_name) == int(dev.size) // 512


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_grow_an_unmounted_filesystem(pool, fstype):
    small, big = SIZES[fstype]
    dev = pool.create_thin("vol", small).format(fstype).resize(big, grow_filesystem=True)
    with dev.mount() as root:
        st = os.statvfs(root)
        assert st.f_blocks * st.f_frsize > libdm.parse_size(big) * 3 // 4


def _fs_blocks(path):
    out = subprocess.run(["dumpe2fs", "-h", path], capture_output=True, text=True, check=True)
    return int(re.search(r"Block count:\s+(\d+)", out.stdout).group(1))


def test_growing_the_filesystem_again_at_the_same_size_grows_it(pool):
    """Asked again once the device has the size (after a kill between the
    resize and its filesystem step, or a resize first made without
    --grow-filesystem): the filesystem still grows.  Found by an outside
    review: the call returned early, saying it was done."""
    dev = pool.create_thin("vol", "32M").format("ext4")
    before = _fs_blocks(dev.path)
    dev = dev.resize("64M")
    assert _fs_blocks(dev.path) == before
    dev = dev.resize("64M", grow_filesystem=True)
    assert _fs_blocks(dev.path) >= 2 * before - 1024


def test_growing_the_filesystem_of_an_inactive_device_is_refused_first(pool):
    """Its filesystem cannot be seen, so it is refused before the device
    is resized, saying why (not "no filesystem")."""
    dev = pool.create_thin("vol", "32M").format("ext4")
    dev.deactivate()
    with pytest.raises(libdm.RefusedError, match="not active") as caught:
        dev.resize("64M", grow_filesystem=True)
    assert "no filesystem" not in str(caught.value)
    assert int(pool.device("vol").size) == 32 * MiB
    dev = pool.device("vol").activate().resize("64M", grow_filesystem=True)
    assert _fs_blocks(dev.path) > 0 and int(dev.size) == 64 * MiB


def test_shrinking_needs_force_and_a_device_nobody_holds(pool):
    dev = pool.create_thin("vol", "64M")
    write_pattern(dev.path, 0x01, offset=0, length=8 * MiB)
    write_pattern(dev.path, 0x02, offset=40 * MiB, length=8 * MiB)
    used = int(witness.pool_status(pool.name)[2].split("/")[0])
    with pytest.raises(ValueError, match="force"):
        dev.resize("16M")
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(libdm.DeviceBusyError):
            dev.resize("16M", force=True)
    finally:
        os.close(fd)
    assert length(dev.dm_name) == 64 * MiB // 512
    dev = dev.resize("16M", force=True)
    assert length(dev.dm_name) == 16 * MiB // 512
    assert read_at(dev.path, 0, MiB) == b"\x01" * MiB
    # The blocks past the new end went back to the pool.
    now = int(witness.pool_status(pool.name)[2].split("/")[0])
    assert now <= used - (8 * MiB) // (64 << 10)


def used_data_blocks(pool_name):
    return int(witness.pool_status(pool_name)[2].split("/")[0])


def test_shrinking_an_inactive_device_gives_the_cut_off_blocks_back(pool):
    # The same result as for an active device (above): what lay past the
    # new end is gone from the pool, and reads as zeros once grown back.
    dev = pool.create_thin("vol", "64M")
    write_pattern(dev.path, 0x01, offset=0, length=8 * MiB)
    write_pattern(dev.path, 0x02, offset=40 * MiB, length=8 * MiB)
    used = used_data_blocks(pool.name)
    dev.deactivate()
    pool.resize_device("vol", "16M", force=True)
    assert witness.info(dev.dm_name) is None  # still inactive
    assert used_data_blocks(pool.name) <= used - (8 * MiB) // (64 << 10)
    pool.resize_device("vol", "64M")
    dev = pool.device("vol").activate()
    assert length(dev.dm_name) == 64 * MiB // 512
    assert read_at(dev.path, 40 * MiB, 8 * MiB) == bytes(8 * MiB)
    assert read_at(dev.path, 0, 8 * MiB) == b"\x01" * (8 * MiB)


def test_an_inactive_device_is_resized_in_the_store(pool):
    dev = pool.create_thin("vol", "16M")
    dev.deactivate()
    pool.resize_device("vol", "32M")
    assert witness.info(dev.dm_name) is None
    pool.device("vol").activate()
    assert length(dev.dm_name) == 32 * MiB // 512


def test_a_kill_between_record_and_reload_is_corrected_by_open(dm_name, tmp_path):
    directory = tmp_path / "pool"
    pool = libdm.Pool.create_loop(dm_name("pool"), directory, data_size="128M")
    dev = pool.create_thin("vol", "16M")
    pool.close()
    proc = run_child(
        directory, "p.device('vol').resize('48M')\n", crash_at="resize_device:recorded"
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert length(dev.dm_name) == 16 * MiB // 512  # the kernel never saw it
    pool = libdm.Pool.open(directory)
    try:
        assert length(dev.dm_name) == 48 * MiB // 512
        store = Store(directory)
        try:
            assert store.device("vol").size == libdm.Bytes(48 * MiB).sectors()
        finally:
            store.close()
    finally:
        pool.close()


def test_the_base_size_applies_to_new_devices(pool):
    # Docker's dm.basesize: reported before any base device is set, used
    # by devices created without a size, changeable for later ones.
    assert pool.info().as_dict()["Base Device Size"] == "10 GiB"
    assert length(pool.create_thin("a").dm_name) == (10 << 30) // 512
    pool.configure(base_size="20G")
    assert length(pool.create_thin("b").dm_name) == (20 << 30) // 512
    assert int(pool.device("a").size) == 10 << 30
    pool.close()
    again = libdm.Pool.open(pool.directory)
    try:
        assert again.base_size == 20 << 30
        assert again.info().as_dict()["Base Device Size"] == "20 GiB"
    finally:
        again.close()


def test_xfs_nospace_max_retries_is_applied_at_mount(pool):
    dev = pool.create_thin("vol", "320M").format("xfs")
    pool.configure(xfs_nospace_max_retries=3)
    with dev.mount():
        rdev = os.stat(dev.path).st_rdev
        knob = f"/sys/fs/xfs/dm-{os.minor(rdev)}/error/metadata/ENOSPC/max_retries"
        with open(knob) as fh:
            assert fh.read().strip() == "3"
    pool.configure(xfs_nospace_max_retries=-1)  # xfs's own default again
    with dev.mount(), open(knob) as fh:
        assert fh.read().strip() == "-1"


# -- filesystem tools that fail --------------------------------------------------


def test_a_filesystem_that_cannot_grow_is_a_libdm_error_saying_the_device_grew(pool):
    dev = pool.create_thin("vol", "32M").format("ext4")
    with dev.mount(options="ro"):
        with pytest.raises(libdm.FilesystemError) as caught:
            dev.resize("64M", grow_filesystem=True)
        message = str(caught.value)
        assert isinstance(caught.value, libdm.DMError)
        assert "resize2fs" in message and "64 MiB" in message and "grew" in message
    assert length(dev.dm_name) == libdm.parse_size("64M") // 512
    assert int(pool.device("vol").size) == libdm.parse_size("64M")


def test_mkfs_and_mount_failures_are_libdm_errors(pool):
    small = pool.create_thin("small", "4M")
    with pytest.raises(libdm.FilesystemError, match=r"mkfs\.xfs") as caught:
        small.format("xfs")
    assert "too small" in str(caught.value)  # the tool's own output
    blank = pool.create_thin("blank", "16M")
    with (
        pytest.raises(libdm.FilesystemError, match=re.escape(f"mount {blank.path}")),
        blank.mount(),
    ):
        pass


@pytest.mark.kernel
def test_a_pool_that_ignores_discards_refuses_to_shrink(make_pool):
    """Without discards the blocks past a cut stay mapped, and growing the
    device again would bring their old data back: the shrink is refused,
    and the device keeps its size (dmsetup) and its data."""
    pool = make_pool(data_size="64M", features=["ignore_discard"])
    dev = pool.create_thin("v", "32M")
    data = os.urandom(1 << 20)
    fd = os.open(dev.path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 20 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    with pytest.raises(libdm.PoolError, match="ignore_discard"):
        dev.resize("16M", force=True)
    assert length(pool.device_dm_name("v")) == 32 * 2048
    with open(dev.path, "rb") as fh:
        fh.seek(20 << 20)
        assert fh.read(1 << 20) == data


def test_a_resize_by_name_settles_a_length_another_program_loaded(pool):
    """Another program loaded another length on a device: activation and
    open refuse it (libdm changes nothing of it on its own), and a resize
    the user asks for by name starts from the live length, so that
    asking for the recorded size puts it back, rather than reporting
    success for a change it did not make."""
    dev = pool.create_thin("a", "16M")
    write_pattern(dev.path, 0x6E, 0, MiB)
    fields = witness.table(dev.dm_name)[0].split()
    fields[1] = str(8 * MiB // 512)  # shrunk behind libdm's back
    witness.dmsetup("reload", dev.dm_name, "--table", " ".join(fields))
    witness.dmsetup("resume", dev.dm_name)
    with pytest.raises(libdm.ChangedByAnotherError):
        pool.device("a").activate()
    assert int(pool.device("a").resize("16M").size) == 16 * MiB  # grows it back
    assert length(dev.dm_name) == 16 * MiB // 512
    pool.device("a").activate()  # its table is the recorded one again
    assert read_at(dev.path, 0, MiB) == b"\x6e" * MiB
    # Grown behind libdm's back: a resize to that length records it.
    fields[1] = str(32 * MiB // 512)
    witness.dmsetup("reload", dev.dm_name, "--table", " ".join(fields))
    witness.dmsetup("resume", dev.dm_name)
    assert int(pool.device("a").resize("32M").size) == 32 * MiB
    assert int(pool.device("a").size) == 32 * MiB  # recorded
    pool.device("a").activate()
