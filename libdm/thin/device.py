"""Thin devices and snapshots, as handed out by a :class:`~libdm.Pool`.

A ``ThinDevice`` is a view of one record in the pool's state store plus
the device-mapper device that makes it usable.  Its methods delegate to
the pool, which serialises every change (see ``Pool``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from libdm.dm import ops
from libdm.dm.errors import NoSuchDeviceError, error_for
from libdm.thin.errors import ForeignDeviceError
from libdm.thin.status import ThinFailed, ThinStatus, parse_thin_status
from libdm.thin.units import Bytes

if TYPE_CHECKING:
    from libdm.dm.info import DeviceInfo
    from libdm.thin.records import DeviceRecord

__all__ = ["DeviceOwner", "Snapshot", "ThinDevice"]


class DeviceOwner(Protocol):
    """What a device asks of the pool that handed it out (a
    :class:`~libdm.Pool`): its public methods, so this module needs
    nothing above it."""

    @property
    def name(self) -> str: ...

    @property
    def xfs_nospace_max_retries(self) -> int | None: ...

    def device_dm_name(self, name: str) -> str: ...

    def device(self, name: str) -> ThinDevice: ...

    def children(self, name: str) -> list[ThinDevice]: ...

    def live_device(self, name: str) -> DeviceInfo | None: ...

    def ready_device(self, name: str, operation: str = "use") -> str: ...

    def activate_device(self, name: str) -> None: ...

    def deactivate_device(self, name: str) -> None: ...

    def delete_device(self, name: str, *, discard: bool | None = None) -> None: ...

    def resize_device(
        self, name: str, size: int | str, *, force: bool = False, grow_filesystem: bool = False
    ) -> ThinDevice: ...

    def snapshot_device(self, origin: str, name: str) -> ThinDevice: ...


class ThinDevice:
    """A thin device in a pool.

    Attributes:
        pool: the :class:`~libdm.Pool` it lives in.
        name: its name within the pool.
        thin_id: its 24-bit id inside the pool's metadata.
        size: its size in ``Bytes`` (the pool does not record sizes; the
            state store does).
        parent_name: the name of the device it is a snapshot of, as
            recorded when this object was made, or ``None``.
        dm_name: the device-mapper device's name, ``<pool>-<name>``.
        path: the block device path, ``/dev/mapper/<pool>-<name>``.
    """

    def __init__(self, pool: DeviceOwner, record: DeviceRecord) -> None:
        self.pool = pool
        self.name: str = record.name
        self.thin_id: int = record.thin_id
        self.size: Bytes = record.size.bytes()
        self.parent_name: str | None = record.parent

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} id={self.thin_id} "
            f"size={int(self.size)} pool={self.pool.name!r}>"
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ThinDevice)
            and other.pool.name == self.pool.name
            and other.thin_id == self.thin_id
            and other.name == self.name
        )

    def __hash__(self) -> int:
        return hash((self.pool.name, self.thin_id))

    def __fspath__(self) -> str:
        return self.path

    @property
    def dm_name(self) -> str:
        return self.pool.device_dm_name(self.name)

    @property
    def path(self) -> str:
        return ops.device_path(self.dm_name)

    @property
    def parent(self) -> ThinDevice | None:
        """The device this one is a snapshot of, or ``None``."""
        if self.parent_name is None:
            return None
        return self.pool.device(self.parent_name)

    def children(self) -> list[ThinDevice]:
        """The snapshots taken of this device, sorted by name."""
        return self.pool.children(self.name)

    @property
    def active(self) -> bool:
        """True when its device-mapper device is live, and proven to be the
        one the pool made (its uuid and table); a device of its name that
        another pool or program made does not count, nor one deleted (or
        being deleted, by another process say) since this object was
        made."""
        try:
            return self.pool.live_device(self.name) is not None
        except (ForeignDeviceError, NoSuchDeviceError):
            return False

    def _live_path(self, operation: str) -> str:
        """:attr:`path`, once its device is proven live and the pool's (a
        device the pool should have active is activated: its first use
        after a lazy :meth:`Pool.open <libdm.Pool.open>`).

        Raises:
            NoSuchDeviceError: the device is not active.
            ForeignDeviceError: the device of its name is not the pool's.
        """
        return self.pool.ready_device(self.name, operation)

    def activate(self) -> ThinDevice:
        """Make the device usable at :attr:`path` (idempotent).

        Raises:
            StateError: a device-mapper device of that name exists with
                another table.
            DMError: the kernel refused (e.g. the pool is suspended).
        """
        self.pool.activate_device(self.name)
        return self

    def deactivate(self) -> None:
        """Remove the device-mapper device; data stays in the pool.

        With the pool's deferred removal (the default), a busy device is
        removed when its last user closes it.

        Raises:
            DeviceBusyError: busy and deferred removal is off.
        """
        self.pool.deactivate_device(self.name)

    def delete(self) -> None:
        """Deactivate the device and delete it from the pool.

        An origin can be deleted while it has snapshots: they keep their
        data (the pool shares blocks by reference count) and become roots
        of the lineage (their :attr:`parent` is ``None`` from then on).

        Raises:
            DeviceBusyError: it is busy and neither deferred removal nor
                deletion is on.
            PoolReadOnlyError, PoolFailedError: the pool refuses changes.
        """
        self.pool.delete_device(self.name)

    def resize(
        self, size: int | str, *, force: bool = False, grow_filesystem: bool = False
    ) -> ThinDevice:
        """Change the device's size, online (the libdm ``lvextend`` of a
        thin volume).  Growing reloads its table with the new length;
        shrinking is refused unless ``force`` and nothing has the device
        open, and the blocks past the new end are discarded first, so the
        pool gets them back.

        Args:
            size: the new size, bytes or a string such as ``"20G"`` (whole
                512-byte sectors).
            force: allow shrinking (what lies past the new end is lost).
            grow_filesystem: after growing, grow the ext4 or xfs filesystem
                on it too, mounted or not (resize2fs, xfs_growfs).

        Returns:
            The device, with its new :attr:`size`.

        Raises:
            ValueError: a bad size, or a shrink without ``force``.
            DeviceBusyError: a shrink of a device in use.
            PoolReadOnlyError, PoolFailedError: the pool refuses to grow it.
            FilesystemError: the filesystem tool failed (the device has
                grown; the message says so and has the tool's output).
        """
        return self.pool.resize_device(
            self.name, size, force=force, grow_filesystem=grow_filesystem
        )

    def snapshot(self, name: str) -> ThinDevice:
        """Take a snapshot of this device (suspending it around the message
        when it is active) and activate it.

        Args:
            name: the snapshot's name within the pool.

        Returns:
            The new :class:`Snapshot`.

        Raises:
            ValueError: a bad name.
            DeviceExistsError: the name is taken.
            PoolFullError, PoolReadOnlyError, PoolFailedError: the pool refuses.
        """
        return self.pool.snapshot_device(self.name, name)

    def status(self) -> ThinStatus | ThinFailed:
        """The kernel's status of the active device: a
        :class:`~libdm.thin.status.ThinStatus` (mapped sectors, highest
        mapped sector) or ``ThinFailed``.

        Raises:
            NoSuchDeviceError: the device is not active.
            ForeignDeviceError: the device of its name is not the pool's.
        """
        # A read: it does not activate a device a lazy open left down.
        if self.pool.live_device(self.name) is None:
            raise error_for(errno.ENXIO, "status", self.dm_name)
        status: ThinStatus | ThinFailed = parse_thin_status(ops.status(self.dm_name)[0].params)
        return status

    def format(
        self, fstype: str = "ext4", *, label: str | None = None, options: Iterable[str] = ()
    ) -> ThinDevice:
        """Make a filesystem on the device (runs ``mkfs.<fstype>``).

        Args:
            fstype: ``"ext4"`` or ``"xfs"``.
            label: an optional filesystem label.
            options: extra arguments for mkfs.

        Returns:
            This device.

        Raises:
            ValueError: an unsupported filesystem type.
            NoSuchDeviceError: the device is not active.
            ForeignDeviceError: the device of its name is not the pool's.
            FilesystemError: mkfs failed (its output is in the message).
        """
        from libdm.thin import fs

        fs.make_filesystem(self._live_path("format"), fstype, label=label, options=options)
        return self

    def mount(
        self, target: str | None = None, *, options: str | None = None
    ) -> AbstractContextManager[str]:
        """A context manager that mounts the device and unmounts it after.

        An xfs filesystem gets the pool's ``xfs_nospace_max_retries`` (see
        :meth:`Pool.configure`) once mounted.

        Args:
            target: the mount point (a temporary directory when ``None``).
            options: mount options, e.g. ``"ro"``.

        Yields:
            The mount point's path.

        Raises:
            NoSuchDeviceError: the device is not active.
            ForeignDeviceError: the device of its name is not the pool's.
            FilesystemError: mount or umount failed (their output is in
                the message).
        """
        from libdm.thin import fs

        return fs.mounted(
            self._live_path("mount"),
            target,
            options=options,
            xfs_nospace_max_retries=self.pool.xfs_nospace_max_retries,
        )


class Snapshot(ThinDevice):
    """A thin device taken as a snapshot of another (its :attr:`parent`,
    also called :attr:`origin`)."""

    @property
    def origin(self) -> ThinDevice | None:
        return self.parent
