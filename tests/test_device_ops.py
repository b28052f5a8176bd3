"""Every device operation, proven in a real kernel against dmsetup/sysfs."""

import errno
import os
import stat
import subprocess
import sys
import threading

import pytest
from support import witness

import libdm
from libdm import Target

pytestmark = pytest.mark.kernel

ZERO = [Target(0, 100, "zero")]


def test_create_loads_and_resumes(dm_name):
    name = dm_name()
    got = libdm.create(name, ZERO, uuid=f"LIBDMTEST-{name}")
    seen = witness.info(name)
    assert seen["attr"] == "L--w"  # live table, not suspended, writable
    assert witness.table(name) == ["0 100 zero"]
    assert (got.major, got.minor) == (seen["major"], seen["minor"])
    assert got.uuid == seen["uuid"] == f"LIBDMTEST-{name}"
    assert witness.sysfs(name, "uuid") == f"LIBDMTEST-{name}"
    assert got.live_table and not got.suspended and not got.read_only
    # The node exists right after create, udev or not.
    st = os.stat(libdm.device_path(name))
    assert stat.S_ISBLK(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (got.major, got.minor)


def test_create_read_only(dm_name):
    name = dm_name()
    got = libdm.create(name, ZERO, read_only=True)
    assert got.read_only
    assert witness.info(name)["attr"] == "L--r"
    with open(f"/sys/block/dm-{got.minor}/ro") as fh:
        assert fh.read().strip() == "1"


def test_failed_load_removes_the_half_made_device(dm_name):
    name = dm_name()
    with pytest.raises(libdm.DMError) as caught:
        libdm.create(name, [Target(0, 100, "linear", "not-a-device 0")])
    exc = caught.value
    assert type(exc) is libdm.DMError  # not NoSuchDeviceError: the device existed
    assert exc.errno == errno.ENODEV and exc.operation == "create" and exc.device == name
    assert "a device the table refers to" in str(exc)
    assert any("reload ioctl" in line for line in exc.log_lines)
    assert any(line.startswith("kernel: device-mapper:") for line in exc.log_lines)
    assert name not in witness.names()
    assert not os.path.exists(f"/dev/mapper/{name}")


def test_create_with_a_taken_name_or_uuid(dm_name):
    name, other = dm_name(), dm_name()
    libdm.create(name, ZERO, uuid=f"U-{name}")
    with pytest.raises(libdm.DeviceExistsError) as caught:
        libdm.create(name, ZERO)
    assert isinstance(caught.value, FileExistsError)
    with pytest.raises(libdm.DeviceExistsError):
        libdm.create(other, ZERO, uuid=f"U-{name}")
    assert other not in witness.names()
    assert witness.table(name) == ["0 100 zero"]  # the first device is untouched


def test_reload_then_resume_swaps_the_table(dm_name):
    name = dm_name()
    got = libdm.create(name, ZERO)
    libdm.reload(name, [Target(0, 64, "zero"), Target(64, 200, "error")])
    assert witness.info(name)["attr"] == "LI-w"
    inactive = witness.dmsetup("table", "--inactive", name).splitlines()
    assert [line.rstrip() for line in inactive] == ["0 64 zero", "64 200 error"]
    assert libdm.table(name, inactive=True) == [Target(0, 64, "zero"), Target(64, 200, "error")]
    assert libdm.info(name).inactive_table
    after = libdm.resume(name)
    assert after.live_table and not after.inactive_table
    assert witness.table(name) == ["0 64 zero", "64 200 error"]
    with open(f"/sys/block/dm-{got.minor}/size") as fh:
        assert int(fh.read()) == 264


@pytest.mark.parametrize("params", ["9:99 0", "254:250 0"])
def test_load_naming_a_missing_device_blames_the_table(dm_name, params):
    name = dm_name()
    libdm.create(name, ZERO)
    with pytest.raises(libdm.DMError) as caught:
        libdm.reload(name, [Target(0, 100, "linear", params)])
    assert not isinstance(caught.value, libdm.NoSuchDeviceError)
    assert "a device the table refers to" in str(caught.value)
    with pytest.raises(libdm.DMError) as caught:
        libdm.create(dm_name(), [Target(0, 100, "linear", params)])
    assert not isinstance(caught.value, libdm.NoSuchDeviceError)


def test_reload_of_a_missing_device(dm_name):
    with pytest.raises(libdm.NoSuchDeviceError):
        libdm.reload(dm_name(), ZERO)


def test_reload_refused_keeps_the_live_table(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    with pytest.raises(libdm.DMError) as caught:
        libdm.reload(name, [Target(0, 100, "linear", "bogus")])
    assert caught.value.operation == "reload"
    assert witness.info(name)["attr"] == "L--w"
    assert witness.table(name) == ["0 100 zero"]


@pytest.mark.parametrize("flush, lockfs", [(True, True), (False, False)])
def test_suspend_and_resume(dm_name, flush, lockfs):
    name = dm_name()
    libdm.create(name, ZERO)
    libdm.suspend(name, flush=flush, lockfs=lockfs)
    assert witness.sysfs(name, "suspended") == "1"
    assert witness.info(name)["attr"] == "L-sw"
    assert libdm.info(name).suspended
    libdm.resume(name)
    assert witness.sysfs(name, "suspended") == "0"
    assert not libdm.info(name).suspended


def test_remove(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    libdm.remove(name)
    assert name not in witness.names()
    assert name not in witness.sysfs_names()
    assert not os.path.exists(f"/dev/mapper/{name}")


def test_remove_missing_device(dm_name):
    with pytest.raises(libdm.NoSuchDeviceError) as caught:
        libdm.remove(dm_name())
    assert caught.value.errno == errno.ENXIO
    assert isinstance(caught.value, FileNotFoundError)


def test_remove_busy_device_retries_then_says_so(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    fd = os.open(libdm.device_path(name), os.O_RDONLY)
    try:
        with pytest.raises(libdm.DeviceBusyError) as caught:
            libdm.remove(name, retries=2, retry_delay=0.01)
        assert caught.value.errno == errno.EBUSY
        assert "still busy after 3 attempts" in str(caught.value)
        assert witness.info(name)["open"] == 1
    finally:
        os.close(fd)


def test_remove_waits_out_a_short_lived_opener(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    fd = os.open(libdm.device_path(name), os.O_RDONLY)
    closer = threading.Timer(0.3, os.close, (fd,))
    closer.start()
    libdm.remove(name, retries=8, retry_delay=0.05)
    closer.join()
    assert name not in witness.names()


def test_deferred_remove_happens_on_last_close(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    fd = os.open(libdm.device_path(name), os.O_RDONLY)
    try:
        libdm.remove(name, deferred=True)
        assert libdm.info(name).deferred_remove
        assert "DEFERRED REMOVE" in witness.dmsetup("info", name)
    finally:
        os.close(fd)
    assert name not in witness.names()


def test_cancel_deferred_remove(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    fd = os.open(libdm.device_path(name), os.O_RDONLY)
    try:
        libdm.remove(name, deferred=True)
        libdm.cancel_deferred_remove(name)
        assert not libdm.info(name).deferred_remove
        assert "DEFERRED REMOVE" not in witness.dmsetup("info", name)
    finally:
        os.close(fd)
    assert name in witness.names()


def test_info_matches_dmsetup(dm_name):
    name = dm_name()
    libdm.create(name, [Target(0, 100, "zero"), Target(100, 28, "error")])
    got, seen = libdm.info(name), witness.info(name)
    assert (got.name, got.major, got.minor, got.open_count, got.target_count, got.event_nr) == (
        seen["name"],
        seen["major"],
        seen["minor"],
        seen["open"],
        seen["segments"],
        seen["events"],
    )
    assert got.devname == f"dm-{seen['minor']}"
    assert libdm.exists(name)


def test_info_of_a_missing_device(dm_name):
    name = dm_name()
    with pytest.raises(libdm.NoSuchDeviceError) as caught:
        libdm.info(name)
    assert caught.value.device == name
    assert not libdm.exists(name)
    assert witness.info(name) is None


def test_table_and_status_match_dmsetup(dm_name):
    base, top = dm_name(), dm_name()
    zero = libdm.create(base, [Target(0, 4096, "zero")])
    libdm.create(
        top,
        [Target(0, 1024, "linear", f"{zero.major}:{zero.minor} 2048"), Target(1024, 1024, "zero")],
    )
    assert [str(t) for t in libdm.table(top)] == witness.table(top)
    assert [str(t) for t in libdm.status(top)] == witness.status(top)
    assert [str(t) for t in libdm.status(top, flush=False)] == witness.status(top)


def test_message_returns_the_kernel_response(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    region = libdm.message(name, "@stats_create - /1")
    assert region == "0"
    listed = witness.dmsetup("message", name, "0", "@stats_list")
    assert listed.startswith("0: 0+100 100")
    assert libdm.message(name, "@stats_delete 0") is None
    assert witness.dmsetup("message", name, "0", "@stats_list").strip() == ""


def test_message_the_target_refuses(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    with pytest.raises(libdm.DMError) as caught:
        libdm.message(name, "no_such_message 1")
    assert caught.value.errno == errno.EINVAL
    assert caught.value.operation == "message"


def test_list_devices_matches_dmsetup(dm_name):
    names = [dm_name() for _ in range(3)]
    for n in names:
        libdm.create(n, ZERO)
    listed = {d.name: d for d in libdm.list_devices()}
    assert set(names) <= set(listed)
    assert set(listed) == witness.names()
    for n in names:
        seen = witness.info(n)
        assert (listed[n].major, listed[n].minor) == (seen["major"], seen["minor"])


def test_deps_matches_dmsetup(dm_name):
    a, b, top = dm_name(), dm_name(), dm_name()
    ia = libdm.create(a, [Target(0, 100, "zero")])
    ib = libdm.create(b, [Target(0, 100, "zero")])
    libdm.create(
        top,
        [
            Target(0, 50, "linear", f"{ia.major}:{ia.minor} 0"),
            Target(50, 50, "linear", f"{ib.major}:{ib.minor} 0"),
        ],
    )
    got = sorted(libdm.deps(top))
    assert got == sorted([(ia.major, ia.minor), (ib.major, ib.minor)])
    text = witness.dmsetup("deps", top)
    for major, minor in got:
        assert f"({major}, {minor})" in text
    assert libdm.deps(a) == []


def test_rename_moves_name_and_node(dm_name):
    old, new = dm_name(), dm_name()
    got = libdm.create(old, ZERO)
    libdm.rename(old, new)
    assert new in witness.names() and old not in witness.names()
    assert witness.sysfs(new, "name") == new
    assert os.path.exists(f"/dev/mapper/{new}") and not os.path.exists(f"/dev/mapper/{old}")
    assert libdm.info(new).minor == got.minor


def test_rename_to_a_taken_name(dm_name):
    a, b = dm_name(), dm_name()
    libdm.create(a, ZERO)
    libdm.create(b, ZERO)
    with pytest.raises(libdm.DeviceExistsError):
        libdm.rename(a, b)
    assert {a, b} <= witness.names()


def test_set_uuid_once(dm_name):
    name = dm_name()
    libdm.create(name, ZERO)
    libdm.set_uuid(name, f"LIBDMTEST-{name}")
    assert witness.sysfs(name, "uuid") == f"LIBDMTEST-{name}"
    with pytest.raises(libdm.DMError):
        libdm.set_uuid(name, f"OTHER-{name}")
    assert witness.info(name)["uuid"] == f"LIBDMTEST-{name}"


def test_versions_match_dmsetup():
    out = witness.dmsetup("version")
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert libdm.library_version() == lines["Library version"].strip()
    assert ".".join(map(str, libdm.driver_version())) == lines["Driver version"].strip()


def test_target_versions_match_dmsetup():
    seen = {}
    for line in witness.dmsetup("targets").splitlines():
        name, version = line.split()
        seen[name] = tuple(int(x) for x in version.lstrip("v").split("."))
    got = {t.name: t.version for t in libdm.target_versions()}
    assert got == seen
    assert {"thin-pool", "thin", "zero", "flakey", "snapshot"} <= set(got)


def test_mknodes_restores_a_lost_node(dm_name):
    name = dm_name()
    got = libdm.create(name, ZERO)
    path = libdm.device_path(name)
    os.unlink(path)
    libdm.mknodes(name)
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode) and os.minor(st.st_rdev) == got.minor
    os.unlink(path)
    libdm.mknodes()
    assert os.path.exists(path)


def test_target_whose_module_is_not_loaded(dm_name):
    name = dm_name()
    assert "dust" not in witness.dmsetup("targets")
    with pytest.raises(libdm.KernelSupportError) as caught:
        libdm.create(name, [Target(0, 100, "dust", "7:0 0 512")])
    assert "dm-dust" in str(caught.value)
    assert name not in witness.names()


def _run_child(code, *, user=None, prefix=()):
    """Run ``code`` in a fresh Python; return (exit status, stdout, stderr)."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        user=user,
        timeout=60,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("fresh_control_fd", [True, False])
def test_permission_denied_for_non_root(dm_name, fresh_control_fd):
    # A forked child drops to nobody.  With a fresh control fd, opening
    # /dev/mapper/control fails; with the parent's fd inherited, the ioctl
    # itself is refused.  Both must say CAP_SYS_ADMIN and make nothing.
    from libdm.dm._lib import lib

    name = dm_name()
    libdm.driver_version()  # make sure libdevmapper holds a control fd
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_end)
            if fresh_control_fd:
                lib.dm_lib_release()
            os.setgid(65534)
            os.setuid(65534)
            try:
                libdm.create(name, [Target(0, 8, "zero")])
            except libdm.PermissionDeniedError as exc:
                os.write(write_end, f"{isinstance(exc, PermissionError)}|{exc}".encode())
                code = 3
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        said = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3, said
    assert said.startswith("True|") and "CAP_SYS_ADMIN" in said
    assert name not in witness.names()


def test_no_device_mapper_driver(tmp_path, dm_name):
    # In a private mount namespace, hide the control node behind an empty
    # read-only /dev/mapper (libdevmapper would otherwise mknod it again)
    # and hide /proc/misc: what a kernel without device-mapper looks like.
    empty = tmp_path / "misc"
    empty.write_text("")
    name = dm_name()
    code = (
        "import libdm, sys\n"
        "try:\n"
        f"    libdm.info({name!r})\n"
        "except libdm.KernelSupportError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    script = (
        f"mount -t tmpfs -o ro none /dev/mapper && mount --bind {empty} /proc/misc && "
        f'exec {sys.executable} -c "$0"'
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert "no device-mapper driver" in proc.stdout
    assert "modprobe dm-mod" in proc.stdout


def test_logging_goes_to_the_libdm_logger(dm_name, caplog):
    name = dm_name()
    with caplog.at_level("DEBUG", logger="libdm"):
        with pytest.raises(libdm.NoSuchDeviceError):
            libdm.remove(name)
        libdm.create(name, ZERO)
    errors = [r for r in caplog.records if r.name == "libdm" and r.levelname == "ERROR"]
    assert any("remove ioctl" in r.getMessage() for r in errors)
    assert any(r.levelname == "DEBUG" for r in caplog.records if r.name == "libdm")


def test_library_prints_nothing_to_stderr(dm_name):
    name = dm_name()
    code = (
        "import libdm\n"
        "try:\n"
        f"    libdm.remove({name!r})\n"
        "except libdm.NoSuchDeviceError:\n"
        "    print('raised')\n"
    )
    rc, out, err = _run_child(code)
    assert (rc, out.strip(), err) == (0, "raised", "")


def test_threads_are_serialized(dm_name):
    names = [dm_name() for _ in range(8)]
    failures = []

    def churn(n):
        try:
            for _ in range(5):
                libdm.create(n, ZERO)
                assert libdm.table(n) == list(ZERO)
                libdm.remove(n)
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert not set(names) & witness.names()


def test_udev_cookies_leak_no_semaphores(dm_name):
    def semaphores():
        with open("/proc/sysvipc/sem") as fh:
            return len(fh.readlines()) - 1

    before = semaphores()
    for _ in range(10):
        name = dm_name()
        libdm.create(name, ZERO)
        libdm.rename(name, name + "r")
        libdm.resume(name + "r")
        libdm.remove(name + "r")
    assert semaphores() == before


@pytest.fixture
def loop_pair(tmp_path):
    """Two loop devices over sparse files (8 MiB metadata, 64 MiB data),
    attached with losetup, which tests may run."""
    loops = []
    for label, size in (("meta", 8 << 20), ("data", 64 << 20)):
        path = tmp_path / label
        with open(path, "wb") as fh:
            fh.truncate(size)
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        loops.append(dev)
    yield loops
    for dev in loops:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_wait_event_wakes_on_a_pool_event(dm_name, loop_pair):
    meta, data = loop_pair
    with open(meta, "r+b") as fh:  # fresh metadata starts zeroed
        fh.write(bytes(4096))
    pool, thin = dm_name(), dm_name()
    data_sectors = 64 << 11
    blocks = data_sectors // 128
    # A low water mark just under the pool's size: the first allocation
    # crosses it and the pool raises one event.
    info = libdm.create(
        pool, [Target(0, data_sectors, "thin-pool", f"{meta} {data} 128 {blocks - 1}")]
    )
    assert libdm.message(pool, "create_thin 0") is None
    libdm.create(thin, [Target(0, 8192, "thin", f"{info.major}:{info.minor} 0")])
    before = libdm.info(pool).event_nr
    with pytest.raises(TimeoutError, match=pool):
        libdm.wait_event(pool, before, timeout=0.2)

    def write():
        fd = os.open(libdm.device_path(thin), os.O_WRONLY)
        try:
            os.write(fd, b"x" * (1 << 20))
            os.fsync(fd)
        finally:
            os.close(fd)

    writer = threading.Timer(0.2, write)
    writer.start()
    after = libdm.wait_event(pool, before, timeout=30)
    writer.join()
    assert after > before
    assert witness.info(pool)["events"] >= after
    libdm.remove(thin)


def test_status_of_a_missing_device(dm_name):
    with pytest.raises(libdm.NoSuchDeviceError):
        libdm.status(dm_name())
