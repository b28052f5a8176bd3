"""One dm_task: build it, run it once under the library lock, read it.

This is the single choke point where libdevmapper's return codes become
Python exceptions.  libdevmapper is not thread-safe (its node-operation
stack, logging and control fd are process-global), so every task runs
under one process-wide lock, a recursive mutex in the C shim.  It is
re-entrant so a failure can be diagnosed with further tasks while it is
held.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, Self

from libdm.dm import kmsg, log
from libdm.dm._lib import ffi, lib
from libdm.dm.errors import (
    NEEDS_ROOT,
    KernelSupportError,
    PermissionDeniedError,
    error_for,
)
from libdm.dm.info import DeviceInfo
from libdm.dm.target import Target
from libdm.dm.units import Sectors

if TYPE_CHECKING:
    from libdm.dm._lib import CData

__all__ = ["LOCK", "Task", "dm_dir"]


class _LibraryLock:
    """The process-wide lock every libdevmapper task runs under (re-entrant;
    a recursive mutex in C, so taking it free costs no system call)."""

    __slots__ = ()

    def __enter__(self) -> Self:
        lib.libdm_lock()
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        lib.libdm_unlock()
        return False


LOCK = _LibraryLock()
lib.libdm_lock_init()
# A fork while another thread held the lock would leave the child's copy
# locked forever: the child starts with a fresh one.
os.register_at_fork(after_in_child=lib.libdm_lock_init)


def dm_dir() -> str:
    """The directory holding device-mapper nodes, normally ``/dev/mapper``."""
    return ffi.string(lib.dm_dir()).decode()


# Kernel messages about a failed ioctl are logged during it, so those from
# just before the failure was seen belong to it.  Reading the clock only on
# failure keeps a syscall off the success path.
KMSG_WINDOW_US: int = 250_000


def _now_us() -> int:
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)


class Task:
    """A dm_task of one type, destroyed when the ``with`` block ends.

    Args:
        kind: a ``DM_DEVICE_*`` task type from the binding.
        operation: the name errors will give, e.g. ``"create"``.
        name: the device the task is about, already validated, or ``None``.

    Raises:
        MemoryError: libdevmapper could not allocate the task.
    """

    __slots__ = ("_dmt", "device", "operation", "target_types")

    def __init__(self, kind: int, operation: str, name: str | None = None) -> None:
        self.operation = operation
        self.device = name
        self.target_types: tuple[str, ...] = ()
        # libdevmapper checks the driver's version when it makes the first
        # task, so a missing driver or a non-root caller shows up here.
        with LOCK, log.capture() as lines:
            self._dmt: CData | None = lib.dm_task_create(kind)
        if self._dmt == ffi.NULL:
            self._dmt = None
            raise _control_failure(operation, name, lines, fallback=MemoryError)
        if name is not None:
            self._set(lib.dm_task_set_name(self._dmt, name.encode()), "name")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.destroy()
        return False

    def destroy(self) -> None:
        if self._dmt is not None:
            lib.dm_task_destroy(self._dmt)
            self._dmt = None

    def _set(self, ok: int, what: str) -> None:
        # Setters fail only on bad input libdevmapper catches itself (it has
        # logged why) or on allocation failure.
        if not ok:
            raise ValueError(f"{self.operation}: libdevmapper refused the {what}")

    # -- building ----------------------------------------------------------

    def set_uuid(self, uuid: str) -> None:
        self._set(lib.dm_task_set_uuid(self._dmt, uuid.encode()), "uuid")

    def set_newname(self, newname: str) -> None:
        self._set(lib.dm_task_set_newname(self._dmt, newname.encode()), "new name")

    def set_newuuid(self, newuuid: str) -> None:
        self._set(lib.dm_task_set_newuuid(self._dmt, newuuid.encode()), "new uuid")

    def set_read_only(self) -> None:
        self._set(lib.dm_task_set_ro(self._dmt), "read-only flag")

    def set_sector(self, sector: Sectors | int) -> None:
        self._set(lib.dm_task_set_sector(self._dmt, int(sector)), "sector")

    def set_message(self, message: str) -> None:
        self._set(lib.dm_task_set_message(self._dmt, message.encode()), "message")

    def set_event_nr(self, event_nr: int) -> None:
        self._set(lib.dm_task_set_event_nr(self._dmt, event_nr), "event number")

    def set_add_node(self, on_create: bool) -> None:
        mode = lib.DM_ADD_NODE_ON_CREATE if on_create else lib.DM_ADD_NODE_ON_RESUME
        self._set(lib.dm_task_set_add_node(self._dmt, mode), "add-node mode")

    def no_flush(self) -> None:
        self._set(lib.dm_task_no_flush(self._dmt), "no-flush flag")

    def skip_lockfs(self) -> None:
        self._set(lib.dm_task_skip_lockfs(self._dmt), "skip-lockfs flag")

    def no_open_count(self) -> None:
        self._set(lib.dm_task_no_open_count(self._dmt), "no-open-count flag")

    def query_inactive_table(self) -> None:
        self._set(lib.dm_task_query_inactive_table(self._dmt), "inactive-table flag")

    def deferred_remove(self) -> None:
        self._set(lib.dm_task_deferred_remove(self._dmt), "deferred-remove flag")

    def add_targets(self, table: Sequence[Target]) -> None:
        for t in table:
            self._set(
                lib.dm_task_add_target(
                    self._dmt, int(t.start), int(t.length), t.type.encode(), t.params.encode()
                ),
                f"target {t}",
            )
        self.target_types = tuple(t.type for t in table)

    # -- running -----------------------------------------------------------

    def run(self, udev: bool = False) -> None:
        """Run the task once.

        Args:
            udev: the task makes, drops or renames a node: set a udev cookie
                and wait on it, so udev (or libdevmapper's fallback where
                udev does not run) has finished with ``/dev/mapper`` when
                this returns.  The wait always follows a cookie, success or
                not, so no SysV semaphore is leaked.

        Raises:
            DMError: or a subclass, with errno, operation, device and the
                log lines captured while the task ran.
        """
        log.sync_level()
        with LOCK, log.capture() as lines:
            if udev:
                # One C call: nothing can come between the cookie and its wait.
                no_cookie = ffi.new("int *")
                ok = lib.libdm_run_with_cookie(self._dmt, _udev_flags(), no_cookie)
                if no_cookie[0]:
                    raise error_for(
                        0,
                        self.operation,
                        self.device,
                        lines,
                        message="could not set a udev cookie (out of SysV semaphores?)",
                    )
            else:
                ok = lib.dm_task_run(self._dmt)
            if ok:
                return
            err = lib.dm_task_get_errno(self._dmt)
            raise self._failure(err, lines)

    def _failure(self, err: int, lines: Iterable[str]) -> Exception:
        lines = list(lines) + kmsg.device_mapper_messages(_now_us() - KMSG_WINDOW_US)
        if err == 0:
            return _control_failure(self.operation, self.device, lines)
        if err == errno.EINVAL and self.target_types:
            missing = _missing_target_types(self.target_types)
            if missing:
                modules = " ".join(f"dm-{t}" for t in missing)
                return KernelSupportError(
                    err,
                    f"target type {', '.join(missing)} is not available in the "
                    f"kernel: load its module (modprobe -a {modules})",
                    self.operation,
                    self.device,
                    lines,
                )
        return error_for(err, self.operation, self.device, lines)

    # -- reading -----------------------------------------------------------

    def info(self) -> DeviceInfo | None:
        """The device's info after the run, or ``None`` if it does not exist."""
        dmi = ffi.new("struct dm_info *")
        if not lib.dm_task_get_info(self._dmt, dmi) or not dmi.exists:
            return None
        name = lib.dm_task_get_name(self._dmt)
        c_uuid = lib.dm_task_get_uuid(self._dmt)
        uuid = ffi.string(c_uuid).decode() if c_uuid != ffi.NULL else ""
        return DeviceInfo(
            name=ffi.string(name).decode() if name != ffi.NULL else (self.device or ""),
            uuid=uuid or None,
            major=dmi.major,
            minor=dmi.minor,
            suspended=bool(dmi.suspended),
            live_table=bool(dmi.live_table),
            inactive_table=bool(dmi.inactive_table),
            open_count=dmi.open_count,
            event_nr=dmi.event_nr,
            read_only=bool(dmi.read_only),
            target_count=dmi.target_count,
            deferred_remove=bool(dmi.deferred_remove),
        )

    def exists(self) -> bool:
        """After a run: whether the device existed (cheaper than :meth:`info`)."""
        dmi = ffi.new("struct dm_info *")
        return bool(lib.dm_task_get_info(self._dmt, dmi) and dmi.exists)

    def targets(self) -> list[Target]:
        """The table or status lines the run returned, as ``Target`` values."""
        out: list[Target] = []
        start = ffi.new("uint64_t *")
        length = ffi.new("uint64_t *")
        ttype = ffi.new("char **")
        params = ffi.new("char **")
        nxt = ffi.NULL
        while True:
            nxt = lib.dm_get_next_target(self._dmt, nxt, start, length, ttype, params)
            if ttype[0] != ffi.NULL:
                out.append(
                    Target(
                        Sectors(start[0]),
                        Sectors(length[0]),
                        ffi.string(ttype[0]).decode(),
                        ffi.string(params[0]).decode() if params[0] != ffi.NULL else "",
                    )
                )
            if nxt == ffi.NULL:
                return out

    def message_response(self) -> str | None:
        text = lib.dm_task_get_message_response(self._dmt)
        if text == ffi.NULL:
            return None
        return ffi.string(text).decode()

    def names(self) -> list[tuple[str, int, int]]:
        """(name, major, minor) for each device of a LIST task."""
        names = lib.dm_task_get_names(self._dmt)
        out: list[tuple[str, int, int]] = []
        if names == ffi.NULL or names.dev == 0:
            return out
        while True:
            out.append((ffi.string(names.name).decode(), os.major(names.dev), os.minor(names.dev)))
            if not names.next:
                return out
            names = ffi.cast("struct dm_names *", ffi.cast("char *", names) + names.next)

    def deps(self) -> list[tuple[int, int]]:
        """(major, minor) of each device a DEPS task's device uses."""
        deps = lib.dm_task_get_deps(self._dmt)
        if deps == ffi.NULL:
            return []
        return [(os.major(deps.device[i]), os.minor(deps.device[i])) for i in range(deps.count)]

    def versions(self) -> list[tuple[str, tuple[int, int, int]]]:
        """(name, (major, minor, patch)) for each target type of a
        LIST_VERSIONS task."""
        out: list[tuple[str, tuple[int, int, int]]] = []
        v = lib.dm_task_get_versions(self._dmt)
        if v == ffi.NULL:
            return out
        while True:
            out.append((ffi.string(v.name).decode(), (v.version[0], v.version[1], v.version[2])))
            if not v.next:
                return out
            v = ffi.cast("struct dm_versions *", ffi.cast("char *", v) + v.next)

    def driver_version(self) -> str | None:
        buf = ffi.new("char[64]")
        if not lib.dm_task_get_driver_version(self._dmt, buf, 64):
            return None
        return ffi.string(buf).decode()


def _udev_flags() -> int:
    # Where udev synchronises, nodes are udev's alone (as dmsetup does it):
    # a fallback node made by libdevmapper would shadow udev's symlink.
    # Where it does not (containers, test kernels), libdevmapper's fallback
    # makes and drops the nodes when the cookie is waited on.
    if lib.dm_udev_get_sync_support():
        return lib.DM_UDEV_DISABLE_LIBRARY_FALLBACK
    return 0


def _control_failure(
    operation: str,
    device: str | None,
    lines: Sequence[str],
    fallback: type[Exception] | None = None,
) -> Exception:
    """Explain a failure that never reached the kernel (errno 0).

    ``fallback`` is the exception class to use when the control device
    looks fine (a ``DMError`` when ``None``)."""
    control = os.path.join(dm_dir(), "control")
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError as exc:
        return PermissionDeniedError(
            exc.errno or 0, f"cannot open {control}: {NEEDS_ROOT}", operation, device, lines
        )
    except OSError as exc:
        return KernelSupportError(
            exc.errno or 0,
            f"the kernel has no device-mapper driver ({control}: {exc.strerror}); "
            f"load module dm-mod (modprobe dm-mod)",
            operation,
            device,
            lines,
        )
    os.close(fd)
    if fallback is not None:
        return fallback(f"libdevmapper could not create a {operation} task: " + "; ".join(lines))
    return error_for(0, operation, device, lines)


def _missing_target_types(types: Iterable[str]) -> list[str]:
    """Target types of a failed load that the kernel does not know."""
    try:
        with Task(lib.DM_DEVICE_LIST_VERSIONS, "targets") as t:
            t.run()
            known = {name for name, _ in t.versions()}
    except Exception:  # diagnosis must never hide the original failure
        return []
    return sorted({t for t in types if t not in known})
