"""Remove what a test left behind: mounts, device-mapper devices, loops.

Used by the pytest plugin's fixtures after every test (also a failed one),
and usable on its own inside a test kernel.  Device-mapper devices are
removed through libdm itself; loop devices are detached with the
``LOOP_CLR_FD`` ioctl; nothing here runs dmsetup or losetup.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = [
    "CleanupError",
    "cleanup_devices",
    "detach_loops",
    "removal_order",
    "unmount",
]

MNT_DETACH = 2


class CleanupError(Exception):
    """Something a test left behind could not be removed.

    Attributes:
        failures: one line per object that stayed, saying why.
    """

    def __init__(self, failures: Iterable[str]) -> None:
        self.failures = list(failures)
        super().__init__("cleanup left objects behind:\n  " + "\n  ".join(self.failures))


#: A device number, (major, minor).
DevNo = tuple[int, int]


def removal_order(
    names: list[str],
    devno_of: Mapping[str, Iterable[int]],
    deps_of: Mapping[str, Iterable[Iterable[int]]],
) -> list[str]:
    """Order devices so that each comes before every device it uses.

    Args:
        names: device names.
        devno_of: mapping name -> (major, minor) of that device.
        deps_of: mapping name -> iterable of (major, minor) it uses; numbers
            of devices outside ``names`` are ignored.

    Returns:
        A list of the names: holders (say a thin device) before what they
        hold (its pool), ties broken by name.  Names caught in a dependency
        cycle, which the kernel does not allow, come last in name order.
    """
    by_devno: dict[tuple[int, ...], str] = {tuple(devno_of[n]): n for n in names}
    uses = {
        n: {by_devno[tuple(d)] for d in deps_of.get(n, ()) if tuple(d) in by_devno} - {n}
        for n in names
    }
    users = dict.fromkeys(names, 0)
    for n in names:
        for used in uses[n]:
            users[used] += 1
    order: list[str] = []
    ready = sorted(n for n in names if users[n] == 0)
    while ready:
        n = ready.pop(0)
        order.append(n)
        for used in sorted(uses[n]):
            users[used] -= 1
            if users[used] == 0:
                ready.append(used)
        ready.sort()
    order += sorted(set(names) - set(order))
    return order


def _mountinfo() -> Iterator[tuple[str, DevNo]]:
    """Yield (mount point, (major, minor)) from /proc/self/mountinfo, in
    mount order."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        major, minor = fields[2].split(":")
        # The kernel escapes space, tab, newline and backslash as \ooo.
        point = (
            fields[4]
            .encode()
            .decode("unicode_escape")
            .encode("latin-1")
            .decode("utf-8", "replace")
        )
        yield point, (int(major), int(minor))


def _umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and libc.umount2(os.fsencode(path), MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


def _below(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def unmount(
    *, under: str | os.PathLike[str] | None = None, devices: Iterable[Iterable[int]] = ()
) -> list[str]:
    """Unmount filesystems mounted below a directory or from given devices,
    deepest (latest) first; a busy one is detached lazily.

    Args:
        under: a directory path; mounts at or below it are unmounted.
        devices: (major, minor) pairs; mounts of those devices are unmounted.

    Returns:
        The mount points unmounted.

    Raises:
        CleanupError: some could not be unmounted.
    """
    wanted = {tuple(d) for d in devices}
    points = [
        p
        for p, dev in _mountinfo()
        if dev in wanted or (under is not None and _below(p, os.fspath(under)))
    ]
    done: list[str] = []
    failures: list[str] = []
    for point in reversed(points):
        try:
            _umount(point)
            done.append(point)
        except OSError as exc:
            failures.append(f"mount {point}: {exc.strerror}")
    if failures:
        raise CleanupError(failures)
    return done


def cleanup_devices(prefix: str, *, dm: Any = None) -> list[str]:
    """Remove every device-mapper device whose name starts with ``prefix``.

    Filesystems mounted from those devices are unmounted first.  Then
    suspended devices are resumed, used devices before their users (so
    that a thin device is never resumed over a suspended pool), and all
    are removed holders first (a thin device before its pool), as each
    device's dependency list says.

    Args:
        prefix: the name prefix; must not be empty.
        dm: the device-mapper API to use (default: the ``libdm`` package);
            needs ``list_devices()``, ``deps(name)``, ``remove(name,
            retries=)``, ``resume(name)`` and optionally ``info(name)``
            with a ``suspended`` attribute.

    Returns:
        The names removed, in removal order.

    Raises:
        ValueError: empty prefix.
        CleanupError: some devices (or their mounts) stayed; the message
            lists each with the error.
    """
    if not prefix:
        raise ValueError("an empty prefix would remove every device")
    if dm is None:
        import libdm as dm
    entries = [e for e in dm.list_devices() if e.name.startswith(prefix)]
    if not entries:
        return []
    devno_of = {e.name: (e.major, e.minor) for e in entries}
    failures: list[str] = []
    deps_of: dict[str, Iterable[Iterable[int]]] = {}
    for name in devno_of:
        try:
            deps_of[name] = dm.deps(name)
        except Exception:  # gone meanwhile, or unreadable: removal tells
            deps_of[name] = ()
    order = removal_order(list(devno_of), devno_of, deps_of)
    try:
        unmount(devices=devno_of.values())
    except CleanupError as exc:
        failures += exc.failures
    info = getattr(dm, "info", None)
    for name in reversed(order):
        try:
            # Resuming swaps in a loaded inactive table, so resume only
            # what is actually suspended when that can be told.
            if info is None or info(name).suspended:
                dm.resume(name)
        except Exception:
            pass  # removal below reports what matters
    removed: list[str] = []
    for name in order:
        try:
            dm.remove(name, retries=5)
            removed.append(name)
        except Exception as exc:
            if isinstance(exc, FileNotFoundError):
                continue  # already gone (a deferred removal completed)
            failures.append(f"device {name}: {exc}")
    if failures:
        raise CleanupError(failures)
    return removed


def detach_loops(under: str | os.PathLike[str]) -> list[str]:
    """Detach every loop device whose backing file lies below a directory.

    Args:
        under: a directory path (as the backing file paths are shown in
            ``/sys/block/loop*/loop/backing_file``, i.e. resolved).

    Returns:
        The loop device paths detached (``/dev/loopN``).  A loop still open
        elsewhere is marked to detach on last close by the kernel.

    Raises:
        CleanupError: some could not be detached.
    """
    directory = os.fspath(under)
    done: list[str] = []
    failures: list[str] = []
    for backing in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        try:
            with open(backing) as f:
                path = f.read().rstrip("\n")
        except OSError:
            continue  # detached meanwhile
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        if not _below(path, directory):
            continue
        dev = "/dev/" + backing.split("/")[3]
        from libdm.dm.blockdev import LOOP_CLR_FD

        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD)
            finally:
                os.close(fd)
            done.append(dev)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: not bound any more
                failures.append(f"loop {dev} ({path}): {exc.strerror}")
    if failures:
        raise CleanupError(failures)
    return done
