"""Loop devices through ioctls, checked against losetup and sysfs.

The library never runs losetup; these tests do, as an independent
witness, together with /sys/block/loopN.  The tests without the kernel
marker need no kernel (struct layouts, argument errors).
"""

import errno
import fcntl
import gc
import json
import os
import re
import stat
import struct
import subprocess
import sys
import threading

import pytest

import libdm
from libdm import Target
from libdm.dm import blockdev, loop

MiB = 1 << 20
kernel = pytest.mark.kernel


# -- witnesses ---------------------------------------------------------------


def losetup_devices():
    """losetup's view of every attached loop device: name -> its JSON entry
    (keys: name, back-file, autoclear, ro, dio, offset, sizelimit, ...)."""
    proc = subprocess.run(
        ["losetup", "--list", "--json"], capture_output=True, text=True, check=True
    )
    if not proc.stdout.strip():
        return {}  # no loop devices: losetup prints nothing
    return {entry["name"]: entry for entry in json.loads(proc.stdout)["loopdevices"]}


def losetup_columns(device_path):
    """``losetup -l -n -O NAME,AUTOCLEAR,RO,BACK-FILE`` for one device as
    a dict, or None when losetup does not list it."""
    proc = subprocess.run(
        ["losetup", "-l", "-n", "-O", "NAME,AUTOCLEAR,RO,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in proc.stdout.splitlines():
        fields = line.split(None, 3)
        if fields and fields[0] == device_path:
            return {"autoclear": fields[1], "ro": fields[2], "back-file": fields[3].rstrip()}
    return None


def flag(value):
    """A losetup JSON boolean: a JSON bool, or "0"/"1" in older versions."""
    return value in (True, 1, "1")


def sys_loop(number, attr):
    """/sys/block/loopN/loop/<attr>, or None when loopN is not attached."""
    try:
        with open(f"/sys/block/loop{number}/loop/{attr}") as f:
            return f.read().rstrip("\n")
    except FileNotFoundError:
        return None


def sys_block(number, attr):
    with open(f"/sys/block/loop{number}/{attr}") as f:
        return f.read().strip()


def attached(number):
    """Both witnesses agree the device is attached (True) or not (False)."""
    by_sysfs = os.path.exists(f"/sys/block/loop{number}/loop/backing_file")
    by_losetup = f"/dev/loop{number}" in losetup_devices()
    assert by_sysfs == by_losetup, f"sysfs and losetup disagree about loop{number}"
    return by_sysfs


def loops_of(path):
    """Device paths losetup shows backed by ``path``."""
    return sorted(
        name for name, entry in losetup_devices().items() if entry["back-file"] == str(path)
    )


def sparse(path, size=64 * MiB):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# -- cleanup ------------------------------------------------------------------


def _detach_under(directory):
    """Close-and-clear every loop device backed by a file below directory,
    by the raw ioctl (not through the code under test)."""
    failures = []
    prefix = str(directory).rstrip("/") + "/"
    for entry in sorted(os.listdir("/sys/block")):
        if not entry.startswith("loop"):
            continue
        backing = sys_loop(entry[4:], "backing_file")
        if backing is None or not backing.startswith(prefix):
            continue
        try:
            fd = os.open(f"/dev/{entry}", os.O_RDONLY)
            try:
                fcntl.ioctl(fd, 0x4C01)  # LOOP_CLR_FD
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                failures.append(f"{entry}: {exc}")
    assert not failures, failures


@pytest.fixture
def loops(tmp_path):
    """Records loop handles a test makes; afterwards, also when the test
    failed, closes them and detaches every loop device backed by a file
    under tmp_path (made here, in a thread or in a child process)."""
    handles = []
    yield handles
    try:
        for handle in handles:
            handle.close()
    finally:
        _detach_under(tmp_path)


def keep(handles, device):
    handles.append(device)
    return device


# -- no kernel needed ------------------------------------------------------


def _io(kind, nr, direction=0, size=0):
    """The kernel's ioctl encoding (asm-generic/ioctl.h)."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def test_ioctl_numbers_are_the_kernel_abi():
    # Taken from the headers at build time; checked here against the ABI's
    # own encoding, which no header can change.
    for name, nr in (
        ("LOOP_SET_FD", 0),
        ("LOOP_CLR_FD", 1),
        ("LOOP_SET_STATUS64", 4),
        ("LOOP_GET_STATUS64", 5),
        ("LOOP_SET_CAPACITY", 7),
        ("LOOP_SET_DIRECT_IO", 8),
        ("LOOP_CONFIGURE", 10),
        ("LOOP_CTL_GET_FREE", 0x82),
    ):
        assert getattr(blockdev, name) == _io(0x4C, nr), name
    assert _io(0x12, 114, 2, struct.calcsize("N")) == blockdev.BLKGETSIZE64
    assert _io(0x12, 119) == blockdev.BLKDISCARD
    assert _io(ord("X"), 121, 3, 24) == blockdev.FITRIM
    assert blockdev.LOOP_MAJOR == 7
    flags = ("READ_ONLY", "AUTOCLEAR", "PARTSCAN", "DIRECT_IO")
    assert [getattr(blockdev, f"LO_FLAGS_{f}") for f in flags] == [1, 4, 8, 16]


def test_loop_info64_layout():
    assert blockdev.LOOP_INFO_SIZE == 232
    buf = blockdev.pack_loop_info(
        file_name=b"/some/file", flags=blockdev.LO_FLAGS_AUTOCLEAR, offset=4096, sizelimit=8192
    )
    assert len(buf) == 232
    assert struct.unpack_from("=Q", buf, 24) == (4096,)  # lo_offset
    assert struct.unpack_from("=Q", buf, 32) == (8192,)  # lo_sizelimit
    assert struct.unpack_from("=I", buf, 52) == (blockdev.LO_FLAGS_AUTOCLEAR,)  # lo_flags
    assert buf[56:66] == b"/some/file" and buf[66] == 0  # lo_file_name[64]
    assert buf[120:232] == bytes(112)  # crypt name, key, lo_init


def test_loop_info64_round_trip():
    raw = struct.pack(
        "=5Q4I64s64s32s2Q", 0x0102030405060708, 77, 3, 512, 1024, 5, 0, 0, 0x1D, b"/a/b",
        b"", b"", 0, 0,
    )  # fmt: skip
    got = blockdev.unpack_loop_info(raw)
    assert (got.device, got.inode, got.rdevice) == (0x0102030405060708, 77, 3)
    assert (got.offset, got.sizelimit, got.number) == (512, 1024, 5)
    assert got.flags == 0x1D and got.file_name == b"/a/b"
    again = blockdev.unpack_loop_info(
        blockdev.pack_loop_info(file_name=b"/a/b", flags=0x1D, offset=512, sizelimit=1024)
    )
    assert (again.file_name, again.flags, again.offset, again.sizelimit) == (
        b"/a/b",
        0x1D,
        512,
        1024,
    )


def test_loop_config_layout():
    info = blockdev.pack_loop_info(file_name=b"/f", flags=blockdev.LO_FLAGS_READ_ONLY)
    buf = blockdev.pack_loop_config(9, info, block_size=4096)
    assert len(buf) == blockdev.LOOP_CONFIG_SIZE == 304
    assert struct.unpack_from("=2I", buf, 0) == (9, 4096)
    assert buf[8:240] == info
    assert buf[240:] == bytes(64)  # __reserved[8]


def test_file_name_is_cut_to_63_bytes_and_terminated():
    buf = blockdev.pack_loop_info(file_name=b"x" * 100)
    assert buf[56:119] == b"x" * 63 and buf[119] == 0
    assert blockdev.unpack_loop_info(buf).file_name == b"x" * 63


@pytest.mark.parametrize("func", [loop.attach, loop.find, loop.attach_or_find])
def test_missing_backing_file(func, tmp_path):
    missing = tmp_path / "missing.img"
    with pytest.raises(FileNotFoundError) as caught:
        func(missing)
    assert caught.value.filename == str(missing)


@pytest.mark.parametrize("func", [loop.attach, loop.find, loop.attach_or_find])
@pytest.mark.parametrize("kind", ["directory", "fifo", "char device"])
def test_backing_file_must_be_regular(func, kind, tmp_path):
    if kind == "directory":
        path = tmp_path / "dir"
        path.mkdir()
    elif kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    else:
        path = "/dev/null"
    with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
        func(path)


def test_missing_loop_control_says_modprobe(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_CONTROL", str(tmp_path / "loop-control"))
    with pytest.raises(FileNotFoundError) as caught:
        loop.attach(sparse(tmp_path / "disk.img", MiB))
    assert caught.value.filename == str(tmp_path / "loop-control")
    assert "modprobe loop" in str(caught.value)


@pytest.mark.parametrize("func", [loop.detach, loop.refresh_capacity])
def test_device_must_be_a_loop_device(func, tmp_path):
    with pytest.raises(ValueError, match="'/dev/null' is not a loop device"):
        func("/dev/null")
    with pytest.raises(ValueError, match="not a loop device"):
        func(sparse(tmp_path / "disk.img", MiB))
    with pytest.raises(FileNotFoundError) as caught:
        func(tmp_path / "loop99")
    assert caught.value.filename == str(tmp_path / "loop99")
    with pytest.raises(TypeError):
        func(3)


# -- in the kernel ------------------------------------------------------------


@kernel
def test_attach_sparse_file(loops, tmp_path):
    img = sparse(tmp_path / "data.img")
    dev = keep(loops, loop.attach(img))
    seen = losetup_devices()[dev.path]
    assert seen["back-file"] == str(img)
    assert flag(seen["autoclear"]) and not flag(seen["ro"]) and not flag(seen["dio"])
    assert int(seen["offset"]) == 0 and int(seen["sizelimit"]) == 0
    assert losetup_columns(dev.path) == {"autoclear": "1", "ro": "0", "back-file": str(img)}
    assert sys_loop(dev.number, "backing_file") == str(img)
    assert sys_loop(dev.number, "autoclear") == "1"
    assert sys_block(dev.number, "ro") == "0"
    # The value
    assert dev.path == f"/dev/loop{dev.number}" == str(dev) == os.fspath(dev)
    st = os.stat(dev.path)
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (
        dev.major,
        dev.minor,
    )
    assert dev.devno == f"{dev.major}:{dev.minor}" == sys_block(dev.number, "dev")
    assert dev.size == 64 * MiB == int(sys_block(dev.number, "size")) * 512
    assert dev.backing_file == str(img)
    assert (dev.read_only, dev.autoclear, dev.direct_io, dev.closed) == (False, True, False, False)
    assert os.stat(img).st_blocks * 512 < MiB  # still sparse
    assert dev.path in repr(dev) and "open" in repr(dev)


@kernel
def test_attach_records_the_resolved_path(loops, tmp_path, monkeypatch):
    img = sparse(tmp_path / "data.img")
    (tmp_path / "link.img").symlink_to(img)
    monkeypatch.chdir(tmp_path)
    dev = keep(loops, loop.attach("link.img"))
    assert losetup_devices()[dev.path]["back-file"] == str(img)
    assert dev.backing_file == str(img)


@kernel
def test_size_is_file_size_rounded_down_to_sectors(loops, tmp_path):
    img = sparse(tmp_path / "odd.img", MiB + 100)
    dev = keep(loops, loop.attach(img))
    assert dev.size == MiB == int(sys_block(dev.number, "size")) * 512


@kernel
def test_attach_read_only(loops, tmp_path):
    img = sparse(tmp_path / "ro.img")
    dev = keep(loops, loop.attach(img, read_only=True))
    seen = losetup_devices()[dev.path]
    assert flag(seen["ro"]) and seen["back-file"] == str(img)
    assert sys_block(dev.number, "ro") == "1"
    assert dev.read_only
    # 6.1 lets the device be opened for writing and refuses the write.
    with pytest.raises(OSError) as caught:
        fd = os.open(dev.path, os.O_WRONLY)
        try:
            os.write(fd, b"x" * 512)
        finally:
            os.close(fd)
    assert caught.value.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
    assert os.stat(img).st_blocks == 0  # nothing reached the file


@kernel
def test_without_autoclear_the_device_outlives_its_handle(loops, tmp_path):
    img = sparse(tmp_path / "keep.img")
    dev = keep(loops, loop.attach(img, autoclear=False))
    assert not flag(losetup_devices()[dev.path]["autoclear"])
    assert sys_loop(dev.number, "autoclear") == "0"
    dev.close()
    assert dev.closed and "closed" in repr(dev)
    assert attached(dev.number)
    assert losetup_devices()[dev.path]["back-file"] == str(img)
    assert loop.detach(dev.path) is True
    assert not attached(dev.number)


@kernel
def test_autoclear_device_lives_while_held(loops, tmp_path):
    img = sparse(tmp_path / "auto.img")
    dev = keep(loops, loop.attach(img))
    fd = os.open(dev.path, os.O_RDONLY)  # another opener comes and goes
    os.close(fd)
    assert attached(dev.number)  # the handle still holds it
    dev.close()  # the last close
    assert not attached(dev.number)
    assert loops_of(img) == []


@kernel
def test_autoclear_device_stays_while_device_mapper_holds_it(loops, tmp_path, dm_name):
    img = sparse(tmp_path / "pooldata.img")
    dev = keep(loops, loop.attach(img))
    name = dm_name("linear")
    libdm.create(name, [Target(0, dev.size // 512, "linear", f"{dev.devno} 0")])
    try:
        dev.close()
        assert attached(dev.number)  # device-mapper holds it open
        assert losetup_devices()[dev.path]["back-file"] == str(img)
    finally:
        libdm.remove(name)
    assert not attached(dev.number)  # device-mapper's close was the last


@kernel
def test_unclosed_handle_warns_and_closes(loops, tmp_path):
    img = sparse(tmp_path / "leak.img")
    dev = loop.attach(img)
    number = dev.number
    with pytest.warns(ResourceWarning, match="unclosed loop device handle"):
        del dev
        gc.collect()
    assert not attached(number)


@kernel
def test_find_returns_the_same_device(loops, tmp_path):
    img = sparse(tmp_path / "a.img")
    other = sparse(tmp_path / "b.img")
    dev = keep(loops, loop.attach(img))
    found = keep(loops, loop.find(img))
    assert found is not dev and found.number == dev.number and found.path == dev.path
    assert (found.major, found.minor, found.backing_file, found.size) == (
        dev.major,
        dev.minor,
        str(img),
        dev.size,
    )
    assert found.autoclear and not found.read_only
    (tmp_path / "link.img").symlink_to(img)
    os.link(img, tmp_path / "hard.img")
    for alias in (tmp_path / "link.img", tmp_path / "hard.img"):
        also = keep(loops, loop.find(alias))
        assert also.number == dev.number
    assert loop.find(other) is None
    assert loops_of(img) == [dev.path]  # finding attached nothing


@kernel
def test_find_goes_by_inode_not_by_name(loops, tmp_path):
    img = tmp_path / "a.img"
    sparse(img)
    dev = keep(loops, loop.attach(img, autoclear=False))
    os.link(img, tmp_path / "b.img")
    os.unlink(img)
    # The kernel's name for the backing file is now the unlinked one.
    assert sys_loop(dev.number, "backing_file") == f"{img} (deleted)"
    assert losetup_devices()[dev.path]["back-file"] == f"{img} (deleted)"
    found = keep(loops, loop.find(tmp_path / "b.img"))
    assert found.number == dev.number
    assert found.backing_file == f"{img} (deleted)"
    # A new file under the old name is another file.
    sparse(img)
    assert loop.find(img) is None


@kernel
def test_find_with_a_hint_checks_identity_and_falls_back(loops, tmp_path):
    a = keep(loops, loop.attach(sparse(tmp_path / "a.img")))
    b = keep(loops, loop.attach(sparse(tmp_path / "b.img")))
    # The right hint, a hint naming the other file's loop, and a hint
    # naming no loop device all find the device that holds the file.
    for hint in (b.number, a.number, 1 << 19):
        found = keep(loops, loop.find(tmp_path / "b.img", hint=hint))
        assert found.number == b.number
        assert losetup_devices()[found.path]["back-file"] == str(tmp_path / "b.img")
    assert loop.find(sparse(tmp_path / "c.img"), hint=a.number) is None


@kernel
def test_find_skips_detached_devices(loops, tmp_path):
    img = sparse(tmp_path / "a.img")
    dev = loop.attach(img, autoclear=False)
    dev.close()
    loop.detach(dev.path)
    assert loop.find(img) is None


@kernel
def test_attach_or_find(loops, tmp_path):
    img = sparse(tmp_path / "pool.img")
    first = keep(loops, loop.attach_or_find(img, autoclear=False))
    second = keep(loops, loop.attach_or_find(img))
    assert second.number == first.number
    assert not second.autoclear  # returned as it is
    assert loops_of(img) == [first.path]
    with pytest.raises(FileExistsError) as caught:
        loop.attach_or_find(img, read_only=True)
    assert caught.value.filename == first.path
    assert loops_of(img) == [first.path]


@kernel
def test_attach_or_find_from_threads_gives_one_device(loops, tmp_path):
    img = sparse(tmp_path / "shared.img")
    barrier = threading.Barrier(4)
    results, errors = [None] * 4, []

    def work(i):
        try:
            barrier.wait()
            results[i] = loop.attach_or_find(img, autoclear=False)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loops.extend(r for r in results if r is not None)
    assert not errors
    assert len({r.number for r in results}) == 1
    assert loops_of(img) == [results[0].path]


@kernel
def test_concurrent_attach_from_threads(loops, tmp_path):
    imgs = [sparse(tmp_path / f"t{i}.img", 8 * MiB) for i in range(4)]
    barrier = threading.Barrier(4)
    results, errors = [None] * 4, []

    def work(i):
        try:
            barrier.wait()
            results[i] = loop.attach(imgs[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loops.extend(r for r in results if r is not None)
    assert not errors
    assert len({r.number for r in results}) == 4
    seen = losetup_devices()
    for img, dev in zip(imgs, results, strict=False):
        assert seen[dev.path]["back-file"] == str(img)
        assert loops_of(img) == [dev.path]


_CHILD = """
import sys
from libdm.dm import loop
dev = loop.attach(sys.argv[1], autoclear=False)
print(dev.number)
"""


@kernel
def test_concurrent_attach_from_processes(loops, tmp_path):
    imgs = [sparse(tmp_path / f"p{i}.img", 8 * MiB) for i in range(4)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(img)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for img in imgs
    ]
    outputs = [child.communicate() for child in children]
    for child, (_out, err) in zip(children, outputs, strict=False):
        assert child.returncode == 0, err
    numbers = [int(out) for out, _ in outputs]
    assert len(set(numbers)) == 4
    seen = losetup_devices()
    for img, number in zip(imgs, numbers, strict=False):
        assert seen[f"/dev/loop{number}"]["back-file"] == str(img)
        assert not flag(seen[f"/dev/loop{number}"]["autoclear"])


def _interloper(tmp_path, monkeypatch, times):
    """Make attach() lose the race for its free device ``times`` times: just
    before it binds the device, bind another file to it (as another
    process would).  Returns the numbers taken."""
    taken = []
    real = loop._configure

    def configure(lfd, *args):
        if len(taken) < times:
            number = os.minor(os.fstat(lfd).st_rdev)
            other = sparse(tmp_path / f"interloper{len(taken)}.img", MiB)
            bfd = os.open(other, os.O_RDWR)
            try:
                fcntl.ioctl(lfd, blockdev.LOOP_SET_FD, bfd)
            finally:
                os.close(bfd)
            taken.append(number)
        return real(lfd, *args)

    monkeypatch.setattr(loop, "_configure", configure)
    return taken


@kernel
def test_attach_retries_when_the_free_device_is_taken(loops, tmp_path, monkeypatch):
    taken = _interloper(tmp_path, monkeypatch, times=2)
    img = sparse(tmp_path / "mine.img")
    dev = keep(loops, loop.attach(img))
    assert len(taken) == 2 and dev.number not in taken
    seen = losetup_devices()
    assert seen[dev.path]["back-file"] == str(img)
    for i, number in enumerate(taken):
        assert seen[f"/dev/loop{number}"]["back-file"] == str(tmp_path / f"interloper{i}.img")


@kernel
def test_attach_gives_up_after_bounded_attempts(loops, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "ATTACH_ATTEMPTS", 3)
    taken = _interloper(tmp_path, monkeypatch, times=100)
    img = sparse(tmp_path / "mine.img")
    with pytest.raises(OSError) as caught:
        loop.attach(img)
    assert caught.value.errno == errno.EBUSY and caught.value.filename == str(img)
    assert len(taken) == 3
    assert loops_of(img) == []


@kernel
def test_refresh_capacity_after_growing_the_file(loops, tmp_path):
    img = sparse(tmp_path / "grow.img", 16 * MiB)
    dev = keep(loops, loop.attach(img))
    os.truncate(img, 48 * MiB)
    assert int(sys_block(dev.number, "size")) == 16 * MiB // 512  # not noticed by itself
    assert loop.refresh_capacity(dev) == 48 * MiB
    assert int(sys_block(dev.number, "size")) == 48 * MiB // 512
    assert dev.size == 48 * MiB
    os.truncate(img, 64 * MiB)
    assert loop.refresh_capacity(dev.path) == 64 * MiB  # by path too
    assert int(sys_block(dev.number, "size")) == 64 * MiB // 512


@kernel
def test_detach(loops, tmp_path):
    img = sparse(tmp_path / "d.img")
    dev = keep(loops, loop.attach(img, autoclear=False))
    assert attached(dev.number)
    assert loop.detach(dev) is True
    assert dev.closed
    assert not attached(dev.number)
    assert loops_of(img) == []
    with pytest.raises(OSError) as caught:
        loop.detach(dev.path)
    assert caught.value.errno == errno.ENXIO and caught.value.filename == dev.path
    with pytest.raises(OSError) as caught:
        loop.refresh_capacity(dev.path)
    assert caught.value.errno == errno.ENXIO and caught.value.filename == dev.path


@kernel
def test_detach_is_deferred_while_others_hold_the_device(loops, tmp_path):
    img = sparse(tmp_path / "held.img")
    dev = keep(loops, loop.attach(img, autoclear=False))
    holder = os.open(dev.path, os.O_RDONLY)
    try:
        assert loop.detach(dev) is False
        assert attached(dev.number)
        assert flag(losetup_devices()[dev.path]["autoclear"])  # the kernel set it
    finally:
        os.close(holder)
    assert not attached(dev.number)


@kernel
def test_closed_handle_does_not_detach_a_reused_device(loops, tmp_path):
    first = sparse(tmp_path / "first.img")
    second = sparse(tmp_path / "second.img")
    dev = loop.attach(first, autoclear=False)
    dev.close()
    loop.detach(dev.path)
    again = keep(loops, loop.attach(second, autoclear=False))
    if again.number != dev.number:
        pytest.skip("the kernel handed out another device; nothing to check")
    with pytest.raises(OSError) as caught:
        loop.detach(dev)
    assert caught.value.errno == errno.ENXIO
    assert losetup_devices()[again.path]["back-file"] == str(second)


@kernel
def test_fallback_without_loop_configure(loops, tmp_path, monkeypatch):
    # An ioctl number the loop driver does not know gets EINVAL, as
    # LOOP_CONFIGURE does from kernels before 5.8.
    monkeypatch.setattr(loop, "LOOP_CONFIGURE", 0x4C0F)
    img = sparse(tmp_path / "old.img")
    ro = sparse(tmp_path / "old-ro.img")
    dev = keep(loops, loop.attach(img))
    seen = losetup_devices()[dev.path]
    assert seen["back-file"] == str(img) and flag(seen["autoclear"]) and not flag(seen["ro"])
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:  # so attach did fall back
            fcntl.ioctl(fd, loop.LOOP_CONFIGURE, bytes(blockdev.LOOP_CONFIG_SIZE))
        assert caught.value.errno in (errno.EINVAL, errno.ENOTTY)
    finally:
        os.close(fd)
    rdev = keep(loops, loop.attach(ro, read_only=True, autoclear=False))
    seen = losetup_devices()[rdev.path]
    assert seen["back-file"] == str(ro) and not flag(seen["autoclear"]) and flag(seen["ro"])
    assert sys_block(rdev.number, "ro") == "1"


@kernel
@pytest.mark.parametrize("configure", [True, False], ids=["LOOP_CONFIGURE", "LOOP_SET_FD"])
def test_direct_io_is_had_or_refused(loops, tmp_path, monkeypatch, configure):
    if not configure:
        monkeypatch.setattr(loop, "LOOP_CONFIGURE", 0x4C0F)
    img = sparse(tmp_path / "dio.img")
    try:
        dev = keep(loops, loop.attach(img, direct_io=True))
    except OSError as exc:
        # The filesystem cannot (hostfs and tmpfs on 6.1): nothing is left.
        assert exc.errno == errno.EINVAL and "direct I/O" in str(exc)
        assert loops_of(img) == []
    else:
        assert dev.direct_io and flag(losetup_devices()[dev.path]["dio"])
        assert sys_loop(dev.number, "dio") == "1"
