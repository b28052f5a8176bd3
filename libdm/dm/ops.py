"""Device operations: the public verbs of layer 2.

These are module-level functions rather than methods of a context object
because libdevmapper's state (control fd, node stack, logger) is
process-wide: an object would suggest an isolation that does not exist.
Every function validates its input before any ioctl, runs its tasks under
the library lock (see :mod:`libdm.dm.task`) and raises a
:class:`~libdm.dm.errors.DMError` subclass when the kernel refuses.

Units: every start, length and sector is in 512-byte sectors.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator

from libdm._backoff import Backoff
from libdm.dm import task as _task
from libdm.dm._lib import ffi, lib
from libdm.dm.errors import DeviceBusyError, DeviceExistsError, DMError, Remedy, error_for
from libdm.dm.info import DeviceEntry, DeviceInfo, TargetVersion
from libdm.dm.target import Target, TargetLike, check_table
from libdm.dm.task import Task, dm_dir
from libdm.dm.units import Sectors
from libdm.dm.validate import check_message, check_name, check_uuid

__all__ = [
    "cancel_deferred_remove",
    "create",
    "deps",
    "device_path",
    "driver_version",
    "exists",
    "info",
    "library_version",
    "list_devices",
    "message",
    "mknodes",
    "reload",
    "remove",
    "rename",
    "resume",
    "set_uuid",
    "status",
    "suspend",
    "table",
    "target_versions",
]

logger = logging.getLogger("libdm")


def device_path(name: str) -> str:
    """The node path of a device, e.g. ``/dev/mapper/<name>``.

    Raises:
        ValueError: ``name`` is not a valid device name.
    """
    return os.path.join(dm_dir(), check_name(name))


def node_in_the_way(name: str) -> str | None:
    """What stands at :func:`device_path` that is not device-mapper's own
    node, said for people (``"a symbolic link to /dev/loop7"``), or
    ``None`` when nothing does.  libdevmapper replaces what it finds
    there when it makes a device's node (a symlink, a node of another
    block device) or quietly leaves the device without one (a regular
    file): libdm makes no node over what another program put there."""
    path = device_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISBLK(st.st_mode):
        if lib.dm_is_dm_major(os.major(st.st_rdev)):
            return None  # device-mapper's namespace, its nodes libdevmapper's
        what = f"a node of block device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    elif stat.S_ISLNK(st.st_mode):
        what = f"a symbolic link to {os.readlink(path)}"
    elif stat.S_ISREG(st.st_mode):
        what = "a regular file"
    elif stat.S_ISDIR(st.st_mode):
        what = "a directory"
    else:
        what = "a special file"
    return f"{path} is {what}, which device-mapper did not make"


def has_node(name: str) -> bool:
    """True when :func:`device_path` is a node of device-mapper's."""
    try:
        st = os.lstat(device_path(name))
    except FileNotFoundError:
        return False
    return stat.S_ISBLK(st.st_mode) and bool(lib.dm_is_dm_major(os.major(st.st_rdev)))


def refuse_node_in_the_way(
    name: str, operation: str, remedy: str = "remove it, or use another name"
) -> None:
    """Raise DeviceExistsError naming what :func:`node_in_the_way` finds
    at the node's path, if anything, and ``remedy``."""
    what = node_in_the_way(name)
    if what is not None:
        raise DeviceExistsError(
            errno.EEXIST, f"{what}; libdm leaves it: {remedy}", operation, name
        )


def create(
    name: str,
    targets: Iterable[TargetLike],
    *,
    uuid: str | None = None,
    read_only: bool = False,
) -> DeviceInfo:
    """Create a device, load its table and resume it, in three ioctls.

    If loading or resuming fails, the half-made device is removed again
    before the error is raised, so nothing is left behind.  When udev runs,
    this returns after udev has processed the new device; when it does
    not, libdevmapper makes ``/dev/mapper/<name>`` itself.

    Args:
        name: the device name (see :func:`libdm.dm.validate.check_name`).
        targets: a sequence of :class:`~libdm.Target` values starting at
            sector 0 with no gaps (start and length in 512-byte sectors).
        uuid: an optional uuid (at most 128 bytes; same character rules).
        read_only: load the table read-only.

    Returns:
        The new device's :class:`~libdm.DeviceInfo`.

    Raises:
        ValueError, TypeError: bad name, uuid or table (before any ioctl).
        DeviceExistsError: the name or uuid is taken, or another
            program's file stands where its node goes (see
            :func:`node_in_the_way`).
        KernelSupportError: a target type's module is not loaded, or there
            is no device-mapper driver.
        PermissionDeniedError: not root (CAP_SYS_ADMIN).
        DMError: the kernel refused the table (the kernel's reason is in
            ``log_lines``).
    """
    check_name(name)
    if uuid is not None:
        check_uuid(uuid)
    table = check_table(targets)
    refuse_node_in_the_way(name, "create")
    with Task(lib.DM_DEVICE_CREATE, "create", name) as t:
        if uuid is not None:
            t.set_uuid(uuid)
        with _taken_as_exists("a device with this name or uuid already exists"):
            t.run()
    try:
        _load(name, table, read_only, "create")
        with Task(lib.DM_DEVICE_RESUME, "create", name) as t:
            t.run(udev=True)
            return _info_of(t, name, "create")
    except BaseException as exc:
        _undo_create(name, exc)
        raise


@contextlib.contextmanager
def _taken_as_exists(text: str) -> Iterator[None]:
    # The kernel answers EBUSY, not EEXIST, when a name or uuid is taken.
    try:
        yield
    except DeviceBusyError as exc:
        raise DeviceExistsError(
            exc.errno, text, exc.operation, exc.device, exc.log_lines
        ) from None


def _undo_create(name: str, exc: BaseException) -> None:
    try:
        remove(name, retries=3)
    except DMError as undo:
        note = f"the half-made device {name!r} could not be removed: {undo.strerror}"
        logger.error("%s", note)
        if isinstance(exc, DMError):
            exc.log_lines += (note,)


def _load(name: str, table: tuple[Target, ...], read_only: bool, operation: str) -> None:
    with Task(lib.DM_DEVICE_RELOAD, operation, name) as t:
        if read_only:
            t.set_read_only()
        t.add_targets(table)
        try:
            t.run()
        except DMError as exc:
            # ENXIO/ENODEV from a load usually mean a device *named in the
            # table* is missing; only a missing device itself is
            # NoSuchDeviceError.
            if exc.errno in (errno.ENXIO, errno.ENODEV) and (
                operation == "create" or exists(name)
            ):
                raise DMError(
                    exc.errno,
                    f"{os.strerror(exc.errno)} (a device the table refers to is "
                    f"missing or cannot be opened)",
                    exc.operation,
                    exc.device,
                    exc.log_lines,
                ) from None
            raise


def reload(name: str, targets: Iterable[TargetLike], *, read_only: bool = False) -> None:
    """Load a new (inactive) table; it becomes live at the next resume.

    Args:
        name: the device name.
        targets: the new table (``Target`` values, sectors).
        read_only: load the table read-only.

    Raises:
        ValueError, TypeError: bad name or table.
        NoSuchDeviceError: no such device.
        KernelSupportError: a target type's module is not loaded.
        DMError: the kernel refused the table.
    """
    check_name(name)
    _load(name, check_table(targets), read_only, "reload")


def suspend(name: str, *, flush: bool = True, lockfs: bool = True) -> None:
    """Suspend I/O on a device.

    Args:
        name: the device name.
        flush: when False (``--noflush``), I/O the target has queued stays
            queued instead of being flushed; needed for a pool that is out
            of space.
        lockfs: when False (``--nolockfs``), a filesystem on the device is
            not frozen first.

    Raises:
        ValueError, TypeError: ``name`` is not a valid device name.
        NoSuchDeviceError: no such device.
        PermissionDeniedError: not root (CAP_SYS_ADMIN).
        DMError: any other failure.
    """
    check_name(name)
    with Task(lib.DM_DEVICE_SUSPEND, "suspend", name) as t:
        if not flush:
            t.no_flush()
        if not lockfs:
            t.skip_lockfs()
        t.run()


def resume(name: str, *, node: bool = True) -> DeviceInfo:
    """Resume a device, making an inactive table live if one is loaded.

    Args:
        name: the device name.
        node: make ``/dev/mapper/<name>`` if it is missing (libdevmapper
            does on a resume).  False leaves a missing node missing: a
            device whose deferred removal is pending has none, and a node
            made now would outlive the device, naming the device number
            the kernel hands out next.

    Returns:
        The device's :class:`~libdm.DeviceInfo` after the resume.

    Raises:
        NoSuchDeviceError: no such device.
        DMError: the kernel refused, for instance for a thin device whose
            pool is suspended.
    """
    check_name(name)
    with Task(lib.DM_DEVICE_RESUME, "resume", name) as t:
        if not node:
            t.set_add_node(on_create=True)  # nodes only on create: none now
        t.run(udev=True)
        return _info_of(t, name, "resume")


def _info_of(t: Task, name: str, operation: str) -> DeviceInfo:
    # After a successful create or resume the device exists, unless
    # something removed it in between.
    result = t.info()
    if result is None:
        raise error_for(errno.ENXIO, operation, name)
    return result


def remove(
    name: str, *, deferred: bool = False, retries: int = 5, retry_delay: float = 0.1
) -> None:
    """Remove a device.

    A busy device (EBUSY: open, mounted, or briefly held by udev or
    blkid) is retried ``retries`` times with exponential backoff starting
    at ``retry_delay`` seconds; the library lock is released while
    waiting.  With ``deferred=True`` a busy device is instead marked for
    removal and disappears when its last user closes it (driver 4.27+);
    :func:`cancel_deferred_remove` takes that back.

    Args:
        name: the device name.
        deferred: request deferred removal instead of retrying.
        retries: extra attempts on EBUSY (0 for a single try).
        retry_delay: first wait between attempts, in seconds (> 0; doubles
            each time, up to 2 s or ``retry_delay`` if that is longer).

    Raises:
        NoSuchDeviceError: no such device.
        DeviceBusyError: still busy after every attempt (its message says
            how many attempts and for how long).
        DMError: any other failure.
    """
    check_name(name)
    if retries < 0:
        raise ValueError("retries must be >= 0")
    if not retry_delay > 0:
        raise ValueError(f"retry_delay must be a positive number of seconds, not {retry_delay!r}")
    backoff = Backoff(retry_delay, max(retry_delay, 2.0))
    for attempt in range(retries + 1):
        try:
            with Task(lib.DM_DEVICE_REMOVE, "remove", name) as t:
                if deferred:
                    t.deferred_remove()
                t.run(udev=True)
            return
        except DeviceBusyError as exc:
            if deferred or attempt == retries:
                if attempt:
                    exc.advise(
                        Remedy("deferred", "removes it when its last user closes it"),
                        reason=f"{exc.reason} (still busy after {attempt + 1} attempts "
                        f"over {backoff.elapsed():.1f} s)",
                    )
                raise
            # The backoff's clock starts at the first busy answer, so a
            # remove that succeeds at once never reads it.
            backoff.wait()


def cancel_deferred_remove(name: str) -> None:
    """Cancel a pending deferred removal (message ``@cancel_deferred_remove``).

    Raises:
        NoSuchDeviceError: no such device.
        DMError: no deferred removal was pending (the kernel answers
            ENXIO; its reason is in ``log_lines``).
    """
    message(name, "@cancel_deferred_remove")


def info(name: str) -> DeviceInfo:
    """Return a device's :class:`~libdm.DeviceInfo` (``dmsetup info``).

    Raises:
        NoSuchDeviceError: no device of that name.
    """
    check_name(name)
    with Task(lib.DM_DEVICE_INFO, "info", name) as t:
        t.run()
        result = t.info()
    if result is None:
        raise error_for(errno.ENXIO, "info", name)
    return result


def exists(name: str) -> bool:
    """True if a device of that name exists.

    Returns:
        ``True`` or ``False``; a missing device is not an error here.

    Raises:
        ValueError, TypeError: ``name`` is not a valid device name.
        PermissionDeniedError: not root (CAP_SYS_ADMIN).
    """
    check_name(name)
    with Task(lib.DM_DEVICE_INFO, "info", name) as t:
        t.run()
        return t.exists()


def table(name: str, *, inactive: bool = False) -> list[Target]:
    """Return a device's table as a list of :class:`~libdm.Target`.

    Args:
        name: the device name.
        inactive: read the loaded-but-not-yet-live table instead.

    Raises:
        NoSuchDeviceError: no such device.
    """
    check_name(name)
    with Task(lib.DM_DEVICE_TABLE, "table", name) as t:
        if inactive:
            t.query_inactive_table()
        t.run()
        return t.targets()


def status(name: str, *, flush: bool = True) -> list[Target]:
    """Return a device's status lines; ``params`` holds each target's
    status string (for a thin pool, its transaction id, usage, mode...).

    Args:
        name: the device name.
        flush: when False, targets that would commit or flush to answer
            (a thin pool commits its metadata) skip that.

    Raises:
        NoSuchDeviceError: no such device.
    """
    check_name(name)
    with Task(lib.DM_DEVICE_STATUS, "status", name) as t:
        if not flush:
            t.no_flush()
        t.run()
        # libdevmapper turns the kernel's ENXIO for a status into success
        # with "no such device" in the info, as it does for info itself.
        if not t.exists():
            raise error_for(errno.ENXIO, "status", name)
        return t.targets()


def message(name: str, text: str, *, sector: Sectors | int = 0) -> str | None:
    """Send a message to the target at ``sector`` and return its answer.

    Args:
        name: the device name.
        text: the message, e.g. ``"create_thin 1"`` (no newline or control
            characters).
        sector: the sector (512 bytes) whose target receives the message.

    Returns:
        The target's response text, or ``None`` if it gave none.

    Raises:
        ValueError: empty message, or one with a newline or control char.
        NoSuchDeviceError: no such device.
        DeviceExistsError: the target refused an id already in use, e.g.
            ``create_thin`` of an existing thin id.
        DMError: the target rejected the message (its reason is in
            ``log_lines``).
    """
    check_name(name)
    check_message(text)
    given: object = sector
    if not isinstance(given, int) or given < 0:
        raise ValueError("sector must be a non-negative int")
    with Task(lib.DM_DEVICE_TARGET_MSG, "message", name) as t:
        t.set_sector(sector)
        t.set_message(text)
        t.run()
        return t.message_response() or None


def list_devices() -> list[DeviceEntry]:
    """Return every device-mapper device, sorted by name.

    Returns:
        A list of :class:`~libdm.DeviceEntry` values.

    Raises:
        PermissionDeniedError: not root (CAP_SYS_ADMIN).
        KernelSupportError: no device-mapper driver in the kernel.
    """
    with Task(lib.DM_DEVICE_LIST, "list") as t:
        t.run()
        return sorted(DeviceEntry(*n) for n in t.names())


def deps(name: str) -> list[tuple[int, int]]:
    """Return the (major, minor) numbers of the devices ``name`` uses.

    Raises:
        NoSuchDeviceError: no such device.
    """
    check_name(name)
    with Task(lib.DM_DEVICE_DEPS, "deps", name) as t:
        t.run()
        return t.deps()


def rename(name: str, new_name: str) -> None:
    """Rename a device; its node follows.

    Raises:
        ValueError: a bad old or new name.
        NoSuchDeviceError: no such device.
        DeviceExistsError: the new name is taken.
        DMError: any other failure.
    """
    check_name(name)
    check_name(new_name)
    with Task(lib.DM_DEVICE_RENAME, "rename", name) as t:
        t.set_newname(new_name)
        with _taken_as_exists(f"a device named {new_name!r} already exists"):
            t.run(udev=True)


def set_uuid(name: str, uuid: str) -> None:
    """Give a device that has no uuid one (the kernel never changes a set uuid).

    Raises:
        ValueError: bad name or uuid.
        NoSuchDeviceError: no such device.
        DeviceExistsError: another device already has that uuid.
        DMError: any other failure (EINVAL when the device already has a
            uuid).
    """
    check_name(name)
    check_uuid(uuid)
    with Task(lib.DM_DEVICE_RENAME, "set_uuid", name) as t:
        t.set_newuuid(uuid)
        with _taken_as_exists(f"another device already has uuid {uuid!r}"):
            t.run(udev=True)


def library_version() -> str:
    """libdevmapper's version (the library's; no ioctl is made).

    Returns:
        The version string, e.g. ``"1.02.185 (2022-05-18)"``.
    """
    buf = ffi.new("char[128]")
    lib.dm_get_library_version(buf, 128)
    return ffi.string(buf).decode()


def driver_version() -> tuple[int, ...]:
    """The kernel driver's version as a tuple of ints, e.g. ``(4, 47, 0)``.

    Raises:
        KernelSupportError: no device-mapper in the kernel.
        PermissionDeniedError: not root.
    """
    with Task(lib.DM_DEVICE_VERSION, "version") as t:
        t.run()
        text = t.driver_version()
    if text is None:
        raise error_for(0, "version", message="the driver did not report its version")
    return tuple(int(part) for part in text.split("."))


def target_versions() -> list[TargetVersion]:
    """The target types the kernel has loaded.

    Returns:
        A list of :class:`~libdm.TargetVersion` values sorted by name.

    Raises:
        PermissionDeniedError: not root (CAP_SYS_ADMIN).
        KernelSupportError: no device-mapper driver in the kernel.
    """
    with Task(lib.DM_DEVICE_LIST_VERSIONS, "targets") as t:
        t.run()
        return sorted(TargetVersion(n, v) for n, v in t.versions())


def mknodes(name: str | None = None) -> None:
    """Make sure ``/dev/mapper`` matches the kernel: create missing nodes
    and drop stale ones, for one device or (``name=None``) all of them.

    Raises:
        DMError: libdevmapper could not fix the nodes.
    """
    if name is not None:
        check_name(name)
    with Task(lib.DM_DEVICE_MKNODES, "mknodes", name) as t:
        t.run()
    with _task.LOCK:
        lib.dm_task_update_nodes()
