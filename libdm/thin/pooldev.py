"""The live thin-pool device as the pool's other parts talk to it: its
status, its messages, and its device number (cached for a change).

Each method is one round trip to the kernel, or as few as it takes: the
status task also gives the device number, which thin tables name and
which cannot change while the pool device lives.  The uuid comes with
the same answers, so the device is proven to be the pool's own (see
:mod:`.ownership`) at no extra cost before a change uses it.
"""

from __future__ import annotations

import errno

from libdm.dm import ops
from libdm.dm._lib import lib
from libdm.dm.errors import DMError, NoSuchDeviceError, RemedyCall, error_for
from libdm.dm.info import DeviceInfo
from libdm.dm.task import Task
from libdm.thin import crash, ownership
from libdm.thin.status import ThinPoolFailed, ThinPoolStatus, parse_pool_status

__all__ = ["PoolDevice", "PoolStatus"]

PoolStatus = ThinPoolStatus | ThinPoolFailed


class PoolDevice:
    """The ``thin-pool`` device-mapper device called ``name``, whose uuid
    is ``uuid``, of the pool whose state is in ``directory``."""

    def __init__(self, name: str, uuid: str = "", directory: str = "") -> None:
        self.name = name
        self.uuid = uuid
        self.directory = directory
        self._devno: str | None = None
        #: The device's info as the last :meth:`status` read it (whether it
        #: is suspended or carries an inactive table), or None.
        self.last_info: DeviceInfo | None = None

    def _proven(self, info: DeviceInfo, operation: str) -> None:
        """Refuse a device of the pool's name that is not the pool's."""
        if (info.uuid or "") != (self.uuid or ""):
            ownership.live_pool(self.name, self.uuid, self.directory, operation)
            # It changed while it was looked at: nothing is proven.
            raise error_for(errno.ENXIO, operation, self.name)

    def _not_live(self, operation: str) -> DMError:
        """The pool device is not live: what to do about it."""
        exc = error_for(
            errno.ENXIO,
            operation,
            self.name,
            message=f"pool {self.name!r} is not active (not brought up since a reboot, "
            f"or taken down)",
        )
        if self.directory:
            exc.advise(RemedyCall("open", "brings it up", self.directory))
        return exc

    def forget(self) -> None:
        """Drop the cached device number (the device may be made anew)."""
        self._devno = None

    def status(self) -> PoolStatus:
        """The kernel's status (committing the pool's metadata); also caches
        the device number, from the same task.

        Raises:
            NoSuchDeviceError: the pool device is not live.
        """
        with Task(lib.DM_DEVICE_STATUS, "status", self.name) as task:
            try:
                task.run()
            except NoSuchDeviceError:
                raise self._not_live("status") from None
            info = task.info()
            if info is None:
                raise self._not_live("status")
            targets = task.targets()
        self._proven(info, "status")
        self._devno = f"{info.major}:{info.minor}"
        self.last_info = info
        status: PoolStatus = parse_pool_status(targets[0].params)
        return status

    def devno(self) -> str:
        """``major:minor``, as thin tables name the pool."""
        if self._devno is None:
            try:
                info = ops.info(self.name)
            except NoSuchDeviceError:
                raise self._not_live("status") from None
            self._proven(info, "status")
            self._devno = f"{info.major}:{info.minor}"
        return self._devno

    def message(self, text: str, operation: str | None = None) -> None:
        """Send ``text``.  With ``operation`` (a call outside a change,
        whose status has not proven the device), the device is proven the
        pool's own first."""
        if operation is not None:
            self._proven(ops.info(self.name), operation)
        ops.message(self.name, text)

    def set_transaction(self, old: int, new: int) -> None:
        """Move the transaction id and commit the metadata: a status read
        without no-flush commits it, so the change is durable before the
        store records its outcome."""
        ops.message(self.name, f"set_transaction_id {old} {new}")
        self.status()

    def create_thin(self, thin_id: int) -> None:
        ops.message(self.name, f"create_thin {thin_id}")

    def create_snap(self, thin_id: int, origin_id: int, origin_dm: str) -> None:
        """Snapshot thin id ``origin_id``.  The kernel does not stop a
        snapshot of an origin with writes in flight, and such a snapshot is
        silently inconsistent: an active origin (``origin_dm``, its proven
        live device; empty when it is not live) is suspended around the
        message, and always resumed."""
        if not origin_dm:
            ops.message(self.name, f"create_snap {thin_id} {origin_id}")
            return
        # An origin whose deferred removal is pending has no node: its
        # resume must not make one (see ops.resume).
        node = ops.has_node(origin_dm)
        try:
            ops.suspend(origin_dm)
        except NoSuchDeviceError:
            ops.message(self.name, f"create_snap {thin_id} {origin_id}")
            return
        try:
            crash.point("snapshot:suspended")
            ops.message(self.name, f"create_snap {thin_id} {origin_id}")
        finally:
            ops.resume(origin_dm, node=node)

    def delete_thin_id(self, thin_id: int) -> None:
        """Send ``delete``; an id the kernel does not hold is fine."""
        try:
            ops.message(self.name, f"delete {thin_id}")
        except DMError as exc:
            if exc.errno != errno.ENODATA:
                raise
