"""The changes of a pool's thin devices, on its core.

:class:`Devices` creates, snapshots, activates, resizes, deactivates and
deletes a pool's thin devices, each a change under the pool's lock
(:meth:`PoolCore.changing <libdm.thin.core.PoolCore.changing>`, which
settles first what a crash left), through the journal and the core's
ownership proofs.  It deals in :class:`~libdm.thin.records.DeviceRecord`
values; :class:`~libdm.thin.pool.Pool` wraps them as
:class:`~libdm.ThinDevice` objects for its callers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import replace

from libdm.dm import ops
from libdm.dm.errors import (
    DeviceBusyError,
    DeviceExistsError,
    DMError,
    NoSuchDeviceError,
    RemedyCall,
    error_for,
)
from libdm.dm.info import DeviceInfo
from libdm.dm.validate import check_name
from libdm.thin import backing as backings
from libdm.thin import crash, ownership
from libdm.thin.core import PoolCore
from libdm.thin.errors import (
    FilesystemError,
    HandedOverError,
    PoolError,
    RefusedError,
    StateError,
)
from libdm.thin.journal import Op
from libdm.thin.records import DeviceRecord
from libdm.thin.status import ThinPoolFailed
from libdm.thin.units import Bytes, Sectors, format_size, parse_size

__all__ = ["DEFAULT_BASE_SIZE", "Devices"]

logger = logging.getLogger("libdm")

#: Docker's default ``dm.basesize``.
DEFAULT_BASE_SIZE = 10 << 30


class Devices:
    """The thin devices of the pool whose core is ``core``."""

    def __init__(self, core: PoolCore) -> None:
        self.core = core

    def base_size(self) -> Bytes:
        """The size of a device created without one (Docker's
        ``dm.basesize``; 10 GiB unless configured)."""
        size = self.core.config.base_size
        return Bytes(DEFAULT_BASE_SIZE) if size is None else size

    def discard_on_delete(self) -> bool:
        """Whether a delete discards the device's blocks first: as
        configured, else as the backing's default (on for loop pools)."""
        value = self.core.config.discard_on_delete
        return self.core.backing.capabilities.discard_by_default if value is None else value

    def listed(self) -> list[DeviceRecord]:
        """Every device, sorted by name, as the pool's next change leaves
        them (see :meth:`pending`)."""
        deleting, made = self.pending()
        rows = [row for row in self.core.store.devices() if row.name not in deleting]
        return sorted(rows + made, key=lambda row: row.name)

    def children(self, name: str) -> list[DeviceRecord]:
        """The snapshots taken of device ``name``, listed as by :meth:`listed`."""
        deleting, made = self.pending()
        rows = [
            row
            for child in self.core.store.children(name)
            if child not in deleting and (row := self.core.store.device(child)) is not None
        ]
        rows += [row for row in made if row.parent == name]
        return sorted(rows, key=lambda row: row.name)

    def check_name(self, name: str) -> str:
        check_name(name)
        dm_name = self.core.device_dm_name(name)
        try:
            check_name(dm_name)
        except ValueError as exc:
            raise ValueError(
                f"device name {name!r} is too long for pool {self.core.name!r}: {exc}"
            ) from None
        return dm_name

    def record(self, name: str, operation: str) -> DeviceRecord:
        """The store's record of device ``name``.

        Raises:
            NoSuchDeviceError: the pool has no such device.
        """
        row: DeviceRecord | None = self.core.store.device(name)
        if row is None:
            # A create the kernel has but the store does not yet (killed
            # past its activation, or still under way in another process):
            # as listed, and as the next change records it.
            made = next((made for made in self.pending()[1] if made.name == name), None)
            if made is not None:
                return made
            raise error_for(
                errno.ENXIO,
                operation,
                name,
                message=f"pool {self.core.name!r} has no device named {name!r}",
            )
        if name in self.deleting():
            # Its data may be discarded already: never handed out again.
            raise error_for(
                errno.ENXIO,
                operation,
                name,
                message=f"device {name!r} of pool {self.core.name!r} is being deleted (by a "
                f"delete under way, or one a crash interrupted, which the pool's next change "
                f"finishes)",
            ).advise(RemedyCall("open", "finishes it now", self.core.directory))
        return row

    def deleting(self) -> set[str]:
        """The devices whose delete an interrupted change left pending."""
        return {intent.name for intent in self.core.store.intents() if intent.op is Op.DELETE}

    def pending(self) -> tuple[set[str], list[DeviceRecord]]:
        """What the pool's next change does to the devices listed: the names
        whose delete was interrupted (it finishes them), and the devices
        whose create was interrupted after the kernel made them (it records
        them, active, as a create leaves a device)."""
        intents = self.core.store.intents()
        deleting = {intent.name for intent in intents if intent.op is Op.DELETE}
        creates = [intent for intent in intents if intent.op.creates]
        if not creates or not backings.exists_live(self.core.name):
            return deleting, []
        try:
            st = self.core.device.status()
        except DMError:
            return deleting, []  # the next change says what is wrong with the pool
        if isinstance(st, ThinPoolFailed):
            return deleting, []
        made = [
            DeviceRecord(intent.name, intent.thin_id, intent.size, intent.parent, active=True)
            for intent in creates
            if intent.size is not None and intent.txid == st.transaction_id
        ]
        return deleting, made

    def create_thin(self, name: str, size: int | str | None = None) -> DeviceRecord:
        """Create device ``name`` and activate it (see :meth:`Pool.create_thin
        <libdm.Pool.create_thin>`); its record."""
        dm_name = self.check_name(name)
        # parse_size refuses sizes past the kernel's limit
        sectors = parse_size(self.base_size() if size is None else size, what="size").sectors()
        with self.core.changing("create_thin"):
            self.before_change("create_thin", name, dm_name)
            return self.provision(Op.CREATE_THIN, name, sectors, None, "create_thin")

    def snapshot(self, origin: str, name: str) -> DeviceRecord:
        """Snapshot device ``origin`` as ``name`` (see :meth:`ThinDevice.snapshot`)."""
        dm_name = self.check_name(name)
        with self.core.changing("snapshot"):
            row = self.record(origin, "snapshot")
            self.before_change("snapshot", name, dm_name)
            # Only a live origin is suspended around the message: asked
            # first, so that no suspend of a missing device fails (and is
            # logged), and no device of its name made by another is touched.
            origin_live = self.core.live(row, "snapshot") is not None
            return self.provision(
                Op.CREATE_SNAP,
                name,
                row.size,
                origin,
                "snapshot",
                row.thin_id,
                self.core.device_dm_name(origin) if origin_live else "",
            )

    def provision(
        self,
        op: Op,
        name: str,
        size: Sectors,
        parent: str | None,
        operation: str,
        origin_id: int | None = None,
        origin_dm: str | None = None,
    ) -> DeviceRecord:
        """Provision a device and activate it before its record says so
        (its device-mapper name was checked free under this lock); if the
        kernel refuses its table, delete its thin id and record again
        (journalled, as any delete) rather than leave a record no open can
        activate."""
        failed: list[Exception] = []

        def activate(thin_id: int) -> DeviceRecord | None:
            record = DeviceRecord(name, thin_id, size, parent, active=True)
            try:
                return self.core.activate(record, operation, absent=True)
            except Exception as exc:
                failed.append(exc)  # undone once recorded, below
                return None

        device = self.core.journal.provision(
            op, name, size, parent, origin_id, origin_dm, activate=activate
        )
        if device is None:
            try:
                self.delete_unactivated(name)
            except DMError as undo:
                logger.error(
                    "pool %s: could not delete %s after its activation failed: %s",
                    self.core.name,
                    name,
                    undo,
                )
            raise failed[0]
        return device

    def delete_unactivated(self, name: str) -> None:
        """Delete device ``name``, whose activation just failed, as a
        journalled delete that does not discard its blocks (it never held
        data), and takes down a device of its name only if proven this
        pool's (another program may have taken the name meanwhile)."""
        with self.core.changing("delete"):
            row = self.record(name, "delete")
            self.core.journal.delete(
                name, row.thin_id, row.active, lambda: self.core.deactivate(name), False
            )

    def before_change(self, operation: str, name: str, dm_name: str) -> None:
        self.refuse_if_handed_over(operation)
        st = self.core.writable_status(operation)
        if self.core.journal.retry_deferred_deletes():
            st = self.core.writable_status(operation)  # what the retry freed counts
        self.core.check_free_space(st, operation)
        if self.core.store.device(name) is not None:
            raise DeviceExistsError(
                errno.EEXIST,
                f"pool {self.core.name!r} already has a device named {name!r}",
                operation,
                name,
            )
        if ops.exists(dm_name):
            raise DeviceExistsError(
                errno.EEXIST,
                f"a device-mapper device named {dm_name!r} exists already",
                operation,
                dm_name,
            )
        # Pool "a"'s device "b-x" and pool "a-b"'s device "x" would share
        # a name: refuse one inside a live libdm pool's namespace.
        for cut in (i for i, char in enumerate(name) if char == "-"):
            other = f"{self.core.name}-{name[:cut]}"
            if ownership.libdm_pool_named(other):
                raise DeviceExistsError(
                    errno.EEXIST,
                    f"device name {name!r} would make {dm_name!r}, the name of device "
                    f"{name[cut + 1 :]!r} of libdm pool {other!r}; choose a name that "
                    f"does not start with {name[: cut + 1]!r}",
                    operation,
                    dm_name,
                )

    def activate(self, name: str) -> None:
        """Activate device ``name`` (see :meth:`ThinDevice.activate`)."""
        with self.core.changing("activate"):
            row = self.record(name, "activate")
            self.core.activate(row, "activate")

    def ready(self, name: str, operation: str = "use") -> str:
        """The path of device ``name``, live (see :meth:`Pool.ready_device
        <libdm.Pool.ready_device>`); a live device without its node gets one."""
        row = self.record(name, operation)
        if self.core.live(row, operation) is None:
            if not row.active:
                raise error_for(errno.ENXIO, operation, self.core.device_dm_name(name))
            with self.core.changing(operation):
                self.core.activate(self.record(name, operation), operation)
        dm_name = self.core.device_dm_name(name)
        path = ops.device_path(dm_name)
        if not os.path.lexists(path):
            # Live and proven ours, but without its node (a kill between
            # the create ioctl and the node): make it, as activate does.
            ops.mknodes(dm_name)
        return path

    def live_info(self, name: str) -> DeviceInfo | None:
        """See :meth:`Pool.live_device <libdm.Pool.live_device>`."""
        live = self.core.live(self.record(name, "info"), "info")
        return None if live is None else live.info

    def resize(
        self, name: str, size: int | str, *, force: bool = False, grow_filesystem: bool = False
    ) -> DeviceRecord:
        """Resize device ``name`` (see :meth:`ThinDevice.resize`)."""
        new = parse_size(size, what="size").sectors()
        with self.core.changing("resize_device"):
            row = self.record(name, "resize_device")
            old = row.size
            dm_name = self.core.device_dm_name(name)
            proven = self.core.live_or_gone(row, "resize_device")
            live = proven is not None
            if proven is not None and len(proven.table) == 1:
                # Another program may have loaded another length: the
                # device is as long as its live table, and this resize,
                # asked for by name, settles it from there.
                old = proven.table[0].length
            if grow_filesystem and not live:
                # Refused before anything changes: an inactive device's
                # filesystem cannot be grown (nor even seen).
                raise RefusedError(
                    errno.ENXIO,
                    f"device {name!r} is not active, so its filesystem cannot be grown; "
                    f"activate it first",
                    "resize_device",
                    dm_name,
                )
            if new == old:
                if row.size != new:
                    with self.core.store.transaction():
                        self.core.store.set_size(name, new)
                if grow_filesystem:
                    # Asked again (after a kill, say): the filesystem may
                    # still lag the device.
                    self.grow_filesystem(name, old, new)
                return self.record(name, "device")
            if new < old:
                if not force:
                    raise ValueError(
                        f"{name!r} would shrink from {format_size(old.bytes())} to "
                        f"{format_size(new.bytes())}, cutting off whatever is stored past "
                        f"the new end; pass force=True (--force) if that is meant"
                    )
                if "ignore_discard" in self.core.config.features:
                    # The cut-off blocks cannot be discarded, so they would
                    # read back, stale, if the device grew again.
                    raise PoolError(
                        errno.EOPNOTSUPP,
                        f"{name!r} cannot shrink: pool {self.core.name!r} ignores discards "
                        f"(feature ignore_discard), so the blocks past the new end could "
                        f"not be given back, and their old data would return if the device "
                        f"grew again",
                        "resize_device",
                        dm_name,
                    )
                if proven is not None and proven.info.open_count:
                    raise DeviceBusyError(
                        errno.EBUSY,
                        f"{dm_name} is in use; a device is shrunk only when nothing has it open",
                        "resize_device",
                        dm_name,
                    )
            else:
                self.core.writable_status("resize_device")
            # The store first, with a mark that the live table may lag and
            # the size it had: a kill before the reload leaves it shorter or
            # longer than the record, and the next change through any entry
            # point (the mark makes it run the bring-up) finishes it.  A
            # store that cannot be written stops it here, before any block
            # is touched.
            with self.core.store.transaction():
                self.core.store.set_size(name, new)
                self.core.store.set_resize_intent(name, old)
            crash.point("resize_device:recorded")
            if new < old:
                # Give the cut-off blocks back to the pool, active or not:
                # what lies past the new end must not come back if the
                # device grows again.
                self.core.discard_blocks(row, new.bytes(), (old - new).bytes(), proven)
            if live:
                ops.reload(
                    dm_name,
                    self.core.thin_table(replace(row, size=new), self.core.device.devno()),
                )
                # A device whose deferred removal is pending has no node:
                # none is made that would outlive it (see ops.resume).
                ops.resume(dm_name, node=ops.has_node(dm_name))
            self.core.drop_resize_intent()
            if grow_filesystem and new > old:
                self.grow_filesystem(name, old, new)
            return self.record(name, "device")

    def grow_filesystem(self, name: str, old: Sectors, new: Sectors) -> None:
        """Grow the filesystem on live device ``name`` to its size."""
        from libdm.thin import fs

        dm_name = self.core.device_dm_name(name)
        try:
            fs.grow_filesystem(ops.device_path(dm_name))
        except FilesystemError as exc:
            raise FilesystemError(
                f"{_resized(name, old, new)}, but its filesystem did not grow: {exc.strerror}",
                "resize_device",
                dm_name,
            ) from exc
        except RefusedError as exc:
            raise RefusedError(
                exc.errno,
                f"{_resized(name, old, new)}, but its filesystem was not grown: {exc.strerror}",
                "resize_device",
                dm_name,
            ) from exc

    def deactivate(self, name: str) -> None:
        """Deactivate device ``name`` (see :meth:`ThinDevice.deactivate`)."""
        with self.core.changing("deactivate"):
            row = self.record(name, "deactivate")
            self.core.live(row, "deactivate")  # refuses another's
            # As an activation is (see PoolCore.activate): a kill past the
            # kernel step leaves the mark, and the next change's bring-up
            # brings the device back up as its record still says.
            self.core.mark_activation(name)
            try:
                self.core.deactivate(name)
            except DMError as exc:
                if ops.exists(self.core.device_dm_name(name)):
                    # Refused (busy): the device is up, as recorded.
                    self.core.drop_activation_intent()
                if isinstance(exc, DeviceBusyError):
                    self.advise_deferral(exc, "deferred_removal")
                raise
            crash.point("deactivate:removed")
            try:
                with self.core.store.transaction():
                    self.core.store.set_active(name, False)
                    self.core.store.drop_activation_intent()
            except StateError:
                # Not stored, so not done: the device comes back up (or its
                # deferred removal is taken back) as its record still says.
                self.core.undo_kernel_step(
                    "deactivate",
                    self.core.device_dm_name(name),
                    self.core.activate,
                    row,
                    "deactivate",
                )
                raise

    def delete(self, name: str, *, discard: bool | None = None) -> None:
        """Delete device ``name`` (see :meth:`Pool.delete_device
        <libdm.Pool.delete_device>`)."""
        with self.core.changing("delete"):
            row = self.record(name, "delete")
            # An origin may go before its snapshots, as the kernel and LVM
            # allow: they share its blocks by reference count, and become
            # roots of the lineage (Store.drop_device).
            self.core.writable_status("delete")
            # Proven once, before anything changes: a device of its name
            # made by another is refused, never discarded or removed.
            live = self.core.live_or_gone(row, "delete")
            self.core.journal.retry_deferred_deletes()
            if discard is None:
                discard = self.discard_on_delete()

            def take_down() -> None:
                if discard:
                    self.discard_device(row, live)
                if live is not None:
                    with contextlib.suppress(NoSuchDeviceError):
                        ops.remove(
                            self.core.device_dm_name(name),
                            deferred=self.core.config.deferred_removal,
                        )

            try:
                self.core.journal.delete(
                    name, row.thin_id, row.active, take_down, self.core.config.deferred_deletion
                )
            except DeviceBusyError as exc:
                # Refused by the removal when it is not deferred, else by
                # the thin id's delete when that is not queued.
                deferral = (
                    "deferred_deletion"
                    if self.core.config.deferred_removal
                    else "deferred_removal"
                )
                self.advise_deferral(exc, deferral)
                raise
            if self.core.config.base_device == name:
                self.core.update_config(self.core.config.but(base_device=None))

    def advise_deferral(self, exc: DeviceBusyError, setting: str) -> None:
        """Name the pool setting that gets past ``exc`` (a busy device), in
        place of the device call's own ``deferred=True``, which the pool's
        callers cannot pass."""
        exc.advise(
            RemedyCall("configure", _DEFERRALS[setting], self.core.directory, ((setting, True),))
        )

    def refuse_if_handed_over(self, operation: str) -> None:
        if self.core.config.handed_to is not None:
            raise HandedOverError(
                f"the thin devices of pool {self.core.name!r} were handed to "
                f"{self.core.config.handed_to}; libdm manages only the pool itself (growth, "
                f"monitoring, reports)",
                operation,
                self.core.name,
            )

    def discard_device(self, row: DeviceRecord, live: ownership.Live | None) -> None:
        """Discard all of a device about to be deleted (see the core's
        ``discard_blocks``); giving space back is a courtesy, so a failure
        is logged and the delete goes on (its data goes anyway)."""
        try:
            self.core.discard_blocks(row, Bytes(0), row.size.bytes(), live)
        except (DMError, OSError, ValueError) as exc:
            logger.warning(
                "pool %s: %s not discarded before its delete: %s",
                self.core.name,
                self.core.device_dm_name(row.name),
                exc,
            )


#: What each deferral setting does for a busy device, said after the call
#: that turns it on.
_DEFERRALS = {
    "deferred_removal": "removes a busy device when its last user closes it",
    "deferred_deletion": "deletes a busy device when its last user closes it",
}


def _resized(name: str, old: Sectors, new: Sectors) -> str:
    if new == old:
        return f"device {name!r} is {format_size(new.bytes())} already"
    return f"device {name!r} grew from {format_size(old.bytes())} to {format_size(new.bytes())}"
