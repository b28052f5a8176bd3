"""Errors of the thin-pool model, all ``DMError`` subclasses.

They carry an errno a shell user would recognise (ENOSPC for a full pool,
EROFS for a read-only one...) and say what to do next.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from libdm.dm.errors import DMError

__all__ = [
    "ChangedByAnotherError",
    "DeviceNotBlankError",
    "FilesystemError",
    "ForeignDeviceError",
    "HandedOverError",
    "PoolError",
    "PoolFailedError",
    "PoolFullError",
    "PoolLockedError",
    "PoolReadOnlyError",
    "RefusedError",
    "StateError",
]

REPAIR_HINT = (
    "check the metadata with thin_check and repair it with thin_repair "
    "(thin-provisioning-tools) before using the pool again"
)


class PoolError(DMError):
    """A thin-pool operation was refused or failed."""

    def __init__(
        self,
        err: int,
        message: str,
        operation: str,
        device: str | None = None,
        log_lines: Iterable[str] = (),
    ) -> None:
        super().__init__(err, message, operation, device, log_lines)


class PoolFullError(PoolError):
    """Free data or metadata space is below the pool's minimum (ENOSPC)."""

    def __init__(self, message: str, operation: str, device: str | None = None) -> None:
        super().__init__(errno.ENOSPC, message, operation, device)


class PoolReadOnlyError(PoolError):
    """The pool is read-only or its metadata needs checking (EROFS)."""

    def __init__(self, message: str, operation: str, device: str | None = None) -> None:
        super().__init__(errno.EROFS, message, operation, device)


class PoolFailedError(PoolError):
    """The kernel reports the pool as Fail or Error (EIO)."""

    def __init__(self, message: str, operation: str, device: str | None = None) -> None:
        super().__init__(errno.EIO, message, operation, device)


class PoolLockedError(PoolError):
    """Another process is changing the pool and did not finish in time
    (EWOULDBLOCK)."""

    def __init__(self, message: str, operation: str, device: str | None = None) -> None:
        super().__init__(errno.EWOULDBLOCK, message, operation, device)


class StateError(PoolError):
    """The state store is missing, unreadable, or disagrees with the kernel
    in a way libdm will not resolve on its own (EUCLEAN)."""

    def __init__(self, message: str, operation: str, device: str | None = None) -> None:
        super().__init__(errno.EUCLEAN, message, operation, device)


class HandedOverError(PoolError):
    """The pool's thin devices were handed to another program (see
    :meth:`~libdm.Pool.hand_over`): libdm manages the pool itself (growth,
    monitoring, reports, reactivation) and never its thin devices (EPERM)."""

    def __init__(self, message: str, operation: str, device: str | None = None) -> None:
        super().__init__(errno.EPERM, message, operation, device)


class RefusedError(PoolError):
    """The pool, or a device given to it, is in a state that does not allow
    the change asked for; the message says which, and nothing was changed.
    Not a ``ValueError``: the arguments were well formed, and the same call
    may work once the state is another (the CLI exits 1, not 2).  The errno
    says what kind of state: EPERM (not libdm's to change), EOPNOTSUPP (not
    on this kind of pool), EBUSY (in use already), EINVAL (not the kind of
    device asked for), EBADF (the pool was closed), ENOSPC (too small)."""


class ForeignDeviceError(StateError):
    """A device-mapper device has the name of one of the pool's devices (or
    of the pool itself) but is not the one libdm made: its uuid or table
    says it belongs to another pool or another program.  libdm leaves it
    alone; the message names it and, where it can tell, its owner."""


class ChangedByAnotherError(StateError):
    """The pool device or one of its thin devices is in a state no change
    of libdm's leaves it in: suspended, carrying a table libdm did not
    load, or live with a table (a length, say) that is not its record's.
    Another program did it; libdm can neither prove the state its own nor
    know when that program is done, so it leaves it as it is, and the
    message names the state.  Nothing of the device's data is at stake."""


class DeviceNotBlankError(PoolError):
    """A block device holds a filesystem, partition table or LVM signature
    and ``force`` was not given (ENOTEMPTY)."""

    def __init__(self, message: str, operation: str, device: str | None = None) -> None:
        super().__init__(errno.ENOTEMPTY, message, operation, device)


class FilesystemError(PoolError):
    """A filesystem tool (mkfs, mount, umount, resize2fs, xfs_growfs) failed
    on a device; the message names the command and has its output.  No
    errno: the kernel's device-mapper did not refuse anything."""

    def __init__(self, message: str, operation: str, device: str | None = None) -> None:
        super().__init__(0, message, operation, device)
