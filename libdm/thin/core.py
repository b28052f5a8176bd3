"""The pool's core: the state and the primitives every part of a pool
works on, below the public :class:`~libdm.Pool`.

A :class:`PoolCore` holds what a pool is (its name, uuid and kind, its
state store and lock, the live pool device, its backing, its
configuration, its journal) and does what every change needs: the
change context (:meth:`PoolCore.changing`), the pool device's table and
activation, the proof that a live thin device is the pool's own, and a
thin device's activation and removal.  The parts take it as their
argument: :mod:`.creation` makes one, :mod:`.growth`, :mod:`.repair` and
:mod:`.report` work on it, and :class:`~libdm.Pool` is the front that
holds one.  Nothing here imports them: the one recovery path (the
pool's bring-up, which needs growth and repair) is lent to the core by
the front (:class:`Recovery`), so the imports go one way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from libdm.dm import blockdev, ops
from libdm.dm.errors import DeviceExistsError, DMError, NoSuchDeviceError, RemedyCall
from libdm.dm.info import DeviceInfo
from libdm.dm.target import Target
from libdm.thin import backing as backings
from libdm.thin import crash, ownership
from libdm.thin.config import PoolConfig, PoolKind
from libdm.thin.errors import (
    REPAIR_HINT,
    ChangedByAnotherError,
    ForeignDeviceError,
    PoolFailedError,
    PoolFullError,
    PoolReadOnlyError,
    RefusedError,
    StateError,
)
from libdm.thin.journal import GrowthIntent, Journal
from libdm.thin.lock import LOCK_NAME, PoolLock
from libdm.thin.pooldev import PoolDevice, PoolStatus
from libdm.thin.records import DeviceRecord
from libdm.thin.status import ThinPoolFailed, ThinPoolStatus
from libdm.thin.store import Store
from libdm.thin.table import ThinParams, ThinPoolParams
from libdm.thin.units import Bytes, Sectors

__all__ = ["OWN_RECOVERY", "PoolCore", "Recovery"]

logger = logging.getLogger("libdm")

#: Changes that settle the journal themselves (or must not wait for it):
#: everything else first finishes what an interrupted change left.
OWN_RECOVERY = frozenset({"open", "create", "repair", "destroy"})

#: The magic number of a thin-pool metadata superblock (at byte 32).
THIN_SUPERBLOCK_MAGIC = 27022010


def _thin_check_failure(meta_path: str) -> str | None:
    """Run thin_check on an inactive pool's metadata (clearing the
    needs_check flag when it is clean); return its complaint or ``None``.
    Skipped (``None``) where thin-provisioning-tools is not installed,
    and for metadata never written (all zeros: a pool whose creation
    stopped before the kernel formatted it)."""
    tool = shutil.which("thin_check")
    if tool is None:
        return None
    fd = os.open(meta_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not any(os.pread(fd, 4096, 0)):
            return None
    finally:
        os.close(fd)
    # As LVM does by default: metadata that checks clean gets its
    # needs_check flag cleared, or the kernel would keep the pool read-only.
    # Not quiet (-q says nothing at all): its complaint is what it prints
    # besides its progress ("examining ...") and its figures on stdout.
    proc = subprocess.run(
        [tool, "--clear-needs-check-flag", meta_path], capture_output=True, text=True
    )
    if proc.returncode == 0:
        return None
    words = [
        line.strip()
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith("examining ")
    ]
    return "; ".join(words) or f"it exited with status {proc.returncode} and said nothing"


def _unlent(what: str) -> Callable[..., bool]:
    def refuse(*args: object) -> bool:
        raise StateError(
            f"this pool's core was not given its {what} (it is used through a Pool)",
            what,
            "",
        )

    return refuse


@dataclass(frozen=True)
class Recovery:
    """What the front lends the core, so that the core needs nothing above it.

    Attributes:
        settle: ``settle(operation)`` finishes or undoes what an
            interrupted change left, before ``operation`` (the one
            recovery path: the pool's bring-up).
        finish_growth: ``finish_growth(intent, operation)`` brings the
            pool to ``intent.new`` (True) or back to ``intent.old``
            (False); the journal's recovery calls it.
    """

    settle: Callable[[str], object]
    finish_growth: Callable[[GrowthIntent, str], bool]


#: A core's recovery until its front lends it one (a creation needs none).
_UNLENT = Recovery(_unlent("recovery"), _unlent("growth"))


class PoolCore:
    """A pool's state and primitives (see the module doc).

    Args:
        directory: the state directory.
        lock_timeout: seconds a change waits for another process's.
        store: a store opened already (a creation's); by default the
            directory's is opened.

    Raises:
        StateError, PoolReadOnlyError, PermissionDeniedError: as
            :class:`~libdm.Pool` says.
    """

    name: str
    uuid: str
    kind: PoolKind
    config: PoolConfig
    backing: backings.Backing

    def __init__(
        self, directory: str | os.PathLike[str], *, lock_timeout: float, store: Store | None = None
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.lock_timeout = lock_timeout
        self.recovery = _UNLENT
        self._depth = 0  # nested changing() holds (under the lock)
        self.store = store if store is not None else Store(self.directory)
        self.lock = PoolLock(-1, os.path.join(self.directory, LOCK_NAME))
        self.store.share_lock(self.lock.thread_lock)
        try:
            self.lock.fd = self.store.statedir.open_file(
                LOCK_NAME, os.O_RDWR, "open", "lock file", create=True
            )
            self.load()
        except BaseException:
            self.lock.close()
            if store is None:  # a creation cleans up its own store
                self.store.close()
            raise
        self.device = PoolDevice(self.name, self.uuid, self.directory)
        self.journal = Journal(self.store, self.device, self)

    def lend(self, recovery: Recovery) -> None:
        """Take the front's recovery path (see :class:`Recovery`)."""
        self.recovery = recovery

    def finish_growth(self, intent: GrowthIntent, operation: str) -> bool:
        """For the journal (:class:`~libdm.thin.journal.JournalHost`)."""
        return self.recovery.finish_growth(intent, operation)

    def data_sectors(self, config: PoolConfig) -> Sectors:
        """The data device's size under ``config``."""
        backing = backings.from_config(self.kind, self.store.statedir, self.name, config)
        return backing.data_sectors()

    def close(self) -> None:
        """Release the state store and lock; the devices stay live."""
        if not self.lock.closed:
            self.store.close()
            self.lock.close()

    def load(self) -> None:
        self._seen = self.store.sequence
        record = self.store.pool()
        self.name = record.name
        self.uuid = record.uuid
        self.kind = record.kind
        self.use_config(record.config)

    def use_config(self, config: PoolConfig) -> None:
        """From now on, run on ``config`` (and the backing it records)."""
        self.backing = backings.from_config(self.kind, self.store.statedir, self.name, config)
        self.config = config

    def update_config(self, config: PoolConfig) -> None:
        """Store ``config`` (this pool's, with changes made by
        :meth:`PoolConfig.but <libdm.thin.config.PoolConfig.but>`) and run on it."""
        with self.store.transaction():
            self.store.set_config(config)
        self.use_config(config)

    @staticmethod
    def made_here(dm_name: str, uuid: str) -> bool:
        """True if device ``dm_name`` exists with the uuid libdm gave it."""
        try:
            return ops.info(dm_name).uuid == uuid
        except NoSuchDeviceError:
            return False

    @contextlib.contextmanager
    def changing(self, operation: str) -> Iterator[None]:
        """Hold the pool for a change: this process's threads and other
        processes wait (up to ``lock_timeout``).  The state is read again
        when the lock is taken: another process may have changed it (and
        then, the lock held, no other process can: Store.held)."""
        with (
            self.lock.held(operation, self.name, self.lock_timeout, self.device.forget),
            self.store.held(),
        ):
            # The store has taken in other processes' changes (held); the
            # configuration is read again only if one of them changed it (a
            # change of this process's own goes through use_config).
            if self.store.sequence != self._seen:
                self.load()
            self._depth += 1
            try:
                # Only the outermost change recovers: an inner one runs
                # inside a change whose intent is legitimately open.
                if self._depth == 1 and operation not in OWN_RECOVERY:
                    self.recovery.settle(operation)
                yield
            finally:
                self._depth -= 1
                self._seen = self.store.sequence

    def interrupted(self) -> str | None:
        """What a change interrupted by a kill (or by an error past its
        kernel step) left in the journal, said for people; ``None`` if
        nothing.  Under the pool's lock, an intent is always such a
        leftover: a change writes and settles its intent in one hold."""
        parts = []
        for intent in self.store.intents():
            parts.append(f"{intent.op.value.replace('_', ' ')} of {intent.name!r}")
        if self.store.has_growth_intent():
            try:
                growth = self.store.growth_intent()
                operation = "growth" if growth is None else growth.operation
            except StateError:
                operation = "growth"  # damaged: recovery names what is wrong with it
            parts.append(f"{operation} of the pool")
        resized = self.store.resize_intent()
        if resized is not None:
            parts.append(f"resize of {resized!r}")
        switched = self.store.activation_intent()
        if switched is not None:
            parts.append(f"activation or deactivation of {switched!r}")
        return ", ".join(parts) or None

    def drop_resize_intent(self) -> None:
        """The live table is the recorded one: drop the mark.  Not durable,
        and a failure to write it is only logged: a mark left makes the
        next change check the tables again, which changes nothing."""
        try:
            with self.store.transaction(durable=False):
                self.store.drop_resize_intent()
        except (DMError, OSError, sqlite3.Error) as exc:
            logger.warning("pool %s: could not clear a finished resize's mark: %s", self.name, exc)

    def set_lazy(self, lazy: bool) -> None:
        """Record whether devices recorded active may be down until first
        use (:meth:`Store.lazy <libdm.thin.store.Store.lazy>`).  Not
        durable: after a power cut nothing is live, and only an open
        brings the pool back; a failure to write it is logged, since it
        only decides how much a later recovery activates."""
        if self.store.lazy() == lazy:
            return
        try:
            with self.store.transaction(durable=False):
                self.store.set_lazy(lazy)
        except (DMError, OSError, sqlite3.Error) as exc:
            logger.warning("pool %s: could not record how it was opened: %s", self.name, exc)

    def drop_activation_intent(self) -> None:
        """Every device is live exactly when its record says: drop the mark
        (see :meth:`mark_activation`); as :meth:`drop_resize_intent`, a
        failure is only logged."""
        try:
            with self.store.transaction(durable=False):
                self.store.drop_activation_intent()
        except (DMError, OSError, sqlite3.Error) as exc:
            logger.warning("pool %s: could not clear an activation's mark: %s", self.name, exc)

    @property
    def block_size(self) -> Sectors:
        """The data block size in ``Sectors``."""
        return self.config.block_size

    def _expected_params(self, devs: backings._Devices) -> ThinPoolParams:
        return ThinPoolParams(
            devs.meta.devno,
            devs.data.devno,
            self.block_size,
            self.config.low_water_mark,
            self.config.features,
        )

    def table_for(self, devs: backings._Devices) -> list[Target]:
        length = (
            Bytes(devs.data.size)
            .whole_sectors()
            .data_blocks(self.block_size)
            .sectors(self.block_size)
        )
        if length == 0:
            raise RefusedError(
                errno.ENOSPC,
                f"the data device of pool {self.name!r} is smaller than one data block",
                "table",
                self.name,
            )
        return [Target(0, int(length), "thin-pool", str(self._expected_params(devs)))]

    def pool_is_live(self, operation: str) -> bool:
        """True if the pool device is live.  A device of its name that is
        not this pool's is refused (ForeignDeviceError); this pool's own
        without a live table (a create killed before its load) is removed,
        so the caller makes it afresh."""
        live = ownership.live_pool(self.name, self.uuid, self.directory, operation)
        if live is not None and not live.info.live_table:
            ops.remove(self.name)
            return False
        return live is not None

    def activate_pool(self, operation: str) -> None:
        """Make the pool device live, or check the live one against the store."""
        if self.pool_is_live(operation):
            self._settle_live_pool(operation)
            self._verify_live_pool(operation)
            return
        if not self.backing.capabilities.owns_devices:
            raise StateError(
                f"adopted pool {self.name!r} is not live; libdm does not own its devices, "
                f"so whoever made it must activate it",
                operation,
                self.name,
            )
        with self.backing.attach() as devs:
            if operation == "open":
                self._check_superblock(devs.meta.path, operation)
                complaint = _thin_check_failure(devs.meta.path)
                if complaint is not None:
                    # Named by what lasts (the file, or the block devices),
                    # not by the loop device attached for the check.
                    where = self.backing.describe().metadata_file or devs.meta.path
                    raise PoolFailedError(
                        f"the metadata of pool {self.name!r} ({where}) is damaged; "
                        f"thin_check says: {complaint}",
                        operation,
                        self.name,
                    ).advise(
                        RemedyCall(
                            "repair", "repairs it and keeps the damaged copy", self.directory
                        )
                    )
            ops.create(self.name, self.table_for(devs), uuid=self.uuid)
        self.device.forget()
        self._record_moves(operation)

    def _record_moves(self, operation: str) -> None:
        """Record the block devices found by their label under new paths
        there; at open, warn of devices known by path and size only."""
        backing = self.backing.pieces()
        if backing is None:
            return
        if operation == "open" and backing.unlabelled():
            logger.warning(
                "pool %s: %s carry no libdm label (the pool was made before labels): "
                "they are identified by path and size only",
                self.name,
                ", ".join(backing.unlabelled()),
            )
        changes = backing.relocation()
        if changes:
            self.update_config(self.config.with_backing(**changes))

    def _settle_live_pool(self, operation: str) -> None:
        """Refuse a live pool that is suspended or carries a table loaded
        but never resumed (see :meth:`refuse_if_held`)."""
        self.refuse_if_held(ops.info(self.name), operation)

    def refuse_if_held(self, info: DeviceInfo, operation: str) -> None:
        """Refuse a change of a pool (``info``, its device's) that is
        suspended or carries an inactive table while no growth of libdm's
        is under way.  Every change of libdm's that suspends the pool or
        loads its table is a growth, finished from its intent before any
        other change: this state is another program's, which libdm can
        neither prove its own nor know the end of, so it is left alone
        (a change sent meanwhile would fail half way, or wait on the
        suspended pool holding the lock)."""
        if not (info.suspended or info.inactive_table) or self.store.has_growth_intent():
            return
        state = ", ".join(
            what
            for what, held in (
                ("suspended", info.suspended),
                ("carrying an inactive table", info.inactive_table),
            )
            if held
        )
        if not self.backing.capabilities.owns_devices:
            raise StateError(
                f"adopted pool {self.name!r} is {state}; its owner must resume "
                f"it (dmsetup resume {self.name})",
                operation,
                self.name,
            )
        raise ChangedByAnotherError(
            f"pool {self.name!r} is {state}, and no change of libdm's left it so: "
            f"another program did, and libdm leaves it as it is; once that program is "
            f"done, resume it (dmsetup resume {self.name}, after dmsetup clear "
            f"{self.name} to drop a table it loaded) and try again",
            operation,
            self.name,
        )

    def _ever_used(self) -> bool:
        """True if the store shows the pool held a device at some time (a
        pool handed to another program may hold any: it was used)."""
        return bool(
            self.config.handed_to is not None
            or self.store.transaction_id()
            or self.store.count_devices()
            or self.store.intents()
            or self.store.deferred_deletes()
        )

    def _check_superblock(self, meta_path: str, operation: str) -> None:
        """Refuse metadata whose superblock is blank or foreign before any
        table is loaded: given a blank superblock the kernel formats fresh,
        empty metadata, which is right only for a pool that never held a
        device (and destroys what thin_repair could still recover)."""
        fd = os.open(meta_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, 4096, 0)
        except OSError as exc:
            raise PoolFailedError(
                f"cannot read the metadata of pool {self.name!r} on "
                f"{meta_path}: {exc}; {REPAIR_HINT}",
                operation,
                self.name,
            ) from exc
        finally:
            os.close(fd)
        # Named by what lasts (the file, or the block device), not by the
        # loop device attached for the check, which is gone afterwards.
        where = self.backing.describe().metadata_file or meta_path
        repair = RemedyCall(
            "repair", "tries to recover it and keeps the damaged copy", self.directory
        )
        by_hand = (
            f"by hand: thin_repair -i {where} -o <a new file or device of the same size>, "
            f"thin_check it, and put it in place of {where}"
        )
        if not any(head):
            if not self._ever_used():
                return
            # What the blank superblock lost, thin_repair must be told.
            blocks = int(self.data_sectors(self.config)) // int(self.block_size)
            by_hand = by_hand.replace(
                " -o <",
                f" --transaction-id {self.store.transaction_id()} --data-block-size "
                f"{int(self.block_size)} --nr-data-blocks {blocks} -o <",
            )
            raise PoolFailedError(
                f"the metadata superblock of pool {self.name!r} on {where} is blank, but "
                f"the store records transaction {self.store.transaction_id()} and "
                f"{self.store.count_devices()} devices: loading the pool would format "
                f"empty metadata over it; {by_hand}",
                operation,
                self.name,
            ).advise(repair)
        if len(head) < 40 or int.from_bytes(head[32:40], "little") != THIN_SUPERBLOCK_MAGIC:
            raise PoolFailedError(
                f"the metadata of pool {self.name!r} ({where}) holds no thin-pool "
                f"superblock (bad magic); {by_hand}",
                operation,
                self.name,
            ).advise(repair)

    def _verify_live_pool(self, operation: str) -> None:
        live = ops.table(self.name)
        if len(live) != 1 or live[0].type != "thin-pool":
            raise StateError(
                f"device {self.name!r} is not a thin pool (table: "
                f"{'; '.join(map(str, live)) or 'none'})",
                operation,
                self.name,
            )
        got = ThinPoolParams.parse(live[0].params)
        diffs: list[str] = []
        if got.block_size != self.block_size:
            diffs.append(
                f"block size {int(got.block_size)} sectors, stored {int(self.block_size)}"
            )
        if sorted(got.features) != sorted(self.config.features):
            diffs.append(f"features {sorted(got.features)}, stored {sorted(self.config.features)}")
        if int(got.low_water_mark) != int(self.config.low_water_mark):
            diffs.append(
                f"low water mark {int(got.low_water_mark)}, "
                f"stored {int(self.config.low_water_mark)}"
            )
        if self.backing.capabilities.owns_devices:
            with self.backing.attach() as devs:
                for what, have, want in (
                    ("metadata device", got.metadata_dev, devs.meta.devno),
                    ("data device", got.data_dev, devs.data.devno),
                ):
                    if have != want:
                        diffs.append(f"{what} {have}, expected {want}")
        if diffs:
            raise StateError(
                f"the live table of pool {self.name!r} differs from its stored "
                f"configuration: {'; '.join(diffs)}",
                operation,
                self.name,
            )

    def status(self) -> PoolStatus:
        """The pool's status from the kernel (committing its metadata): a
        :class:`~libdm.thin.status.ThinPoolStatus`, or ``ThinPoolFailed``
        for ``Fail`` / ``Error``.

        Raises:
            NoSuchDeviceError: the pool device is not live.
        """
        return self.device.status()

    def writable_status(self, operation: str) -> ThinPoolStatus:
        st = self.status()
        if self.device.last_info is not None:
            self.refuse_if_held(self.device.last_info, operation)
        if isinstance(st, ThinPoolFailed):
            raise PoolFailedError(
                f"pool {self.name!r} has failed (the kernel reports {st.state}); {REPAIR_HINT}",
                operation,
                self.name,
            )
        if st.needs_check:
            raise PoolReadOnlyError(
                f"pool {self.name!r} needs its metadata checked (needs_check); {REPAIR_HINT}",
                operation,
                self.name,
            )
        if st.mode == "ro":
            raise PoolReadOnlyError(
                f"pool {self.name!r} is read-only (a metadata error or "
                f"no metadata space); {REPAIR_HINT}",
                operation,
                self.name,
            )
        return st

    def check_free_space(self, st: ThinPoolStatus, operation: str) -> None:
        pct = self.config.min_free_space
        for what, free, total in (
            ("data", st.free_data, st.total_data),
            ("metadata", st.free_meta, st.total_meta),
        ):
            if int(free) * 100 < int(total) * pct:
                raise PoolFullError(
                    f"pool {self.name!r} has {int(free)} of {int(total)} {what} blocks free "
                    f"({100 * int(free) / max(int(total), 1):.1f}%), below its minimum free "
                    f"space of {pct}%; grow the pool or delete devices",
                    operation,
                    self.name,
                )

    def device_dm_name(self, name: str) -> str:
        """The device-mapper name of thin device ``name``: ``<pool>-<name>``."""
        return f"{self.name}-{name}"

    def thin_table(self, row: DeviceRecord, pool_devno: str) -> list[Target]:
        return [Target(0, row.size, "thin", str(ThinParams(pool_devno, row.thin_id)))]

    def live(self, row: DeviceRecord, operation: str) -> ownership.Live | None:
        """The live device-mapper device of device ``row``, proven to be
        the one this pool made (see :mod:`.ownership`), or ``None`` when no
        device has its name.  Every operation on a device asks this first.

        Raises:
            ForeignDeviceError: a device of its name that is not this
                pool's (named, with its owner); it is left alone.
        """
        try:
            return self._live(row, operation)
        except ForeignDeviceError:
            # The pool's device number is cached, and goes stale when
            # another process takes the pool down and brings it up again
            # (a change reads it afresh; a read may not): once more, with
            # the number read now.
            self.device.forget()
            return self._live(row, operation)

    def _live(self, row: DeviceRecord, operation: str) -> ownership.Live | None:
        try:
            devno: str | None = self.device.devno()
        except (NoSuchDeviceError, ForeignDeviceError):
            devno = None  # the pool is not live, so none of its devices is
        claim = ownership.ThinClaim(
            self.name,
            row.name,
            self.device_dm_name(row.name),
            ownership.thin_uuid(self.config.token, row.thin_id),
            row.thin_id,
            devno,
        )
        return ownership.live_thin(claim, operation)

    def live_or_gone(self, row: DeviceRecord, operation: str) -> ownership.Live | None:
        """:meth:`live`, with this pool's own device that a create killed
        before its load left without a table removed (``None`` then)."""
        live = self.live(row, operation)
        if live is not None and not live.info.live_table:
            ops.remove(self.device_dm_name(row.name))
            return None
        return live

    def live_devices(
        self, rows: Iterable[DeviceRecord], operation: str
    ) -> dict[str, ownership.Live]:
        """Those of ``rows`` whose device is live and proven this pool's,
        by name: what taking the pool down removes.  A device of one of
        their names made by another pool or program is logged and left
        out (this pool's device is not live then)."""
        live: dict[str, ownership.Live] = {}
        for row in rows:
            try:
                proven = self.live(row, operation)
            except ForeignDeviceError as exc:
                logger.warning("pool %s: %s", self.name, exc.strerror)
                continue
            if proven is not None:
                live[row.name] = proven
        return live

    def activate(
        self,
        row: DeviceRecord,
        operation: str,
        *,
        absent: bool = False,
        live: ownership.Live | None = None,
        resume: bool = False,
    ) -> DeviceRecord:
        """Make device ``row`` live (or check the live one), and return its
        record as it now is.  ``absent``:
        the caller knows no device-mapper device of its name exists, so
        none is looked for; ``live``: the caller has just proven it;
        ``resume``: a change of libdm's that a kill interrupted may have
        left it suspended (a snapshot's origin), so a suspended device is
        resumed; any other suspended device is another program's doing,
        and refused."""
        dm_name = self.device_dm_name(row.name)
        table = self.thin_table(row, self.device.devno())
        uuid = ownership.thin_uuid(self.config.token, row.thin_id)
        if not absent and live is None:
            live = self.live_or_gone(row, operation)  # refuses another's device
        if not row.active:
            # Marked once the device is proven ours, before the kernel step: a
            # kill between it and the record leaves the mark, and the next
            # change through any entry point runs the bring-up, which records
            # what the kernel has.  Not durable: a power cut takes the device
            # down too.
            self.mark_activation(row.name)
        try:
            if absent:
                try:
                    ops.create(dm_name, table, uuid=uuid)
                except DeviceExistsError:
                    if not ops.exists(dm_name):
                        raise  # not the device: a file where its node goes
                    return self.activate(row, operation)  # made meanwhile: check it
            elif live is not None:
                info, live_table = live
                if (
                    len(live_table) == 1
                    and live_table[0]._replace(length=table[0].length) == table[0]
                    and live_table != table
                    # Only a resize of libdm's (its mark) is finished here: a
                    # length another program loaded is refused, not undone.
                    and self.store.resize_intent() == row.name
                ):
                    # A resize killed between its record and its reload.
                    if table[0].length < live_table[0].length and info.open_count:
                        # A shrink, and the device was opened since: it is not
                        # cut under its user (as a shrink refuses an open
                        # device); the record takes the live size back.
                        kept = Sectors(live_table[0].length)
                        logger.warning(
                            "pool %s: %s keeps %s sectors, not its recorded %s: an "
                            "interrupted shrink meets it open; shrink it again when "
                            "nothing has it open",
                            self.name,
                            dm_name,
                            kept,
                            table[0].length,
                        )
                        with self.store.transaction():
                            self.store.set_size(row.name, kept)
                        row = replace(row, size=kept)
                        table = live_table
                    else:
                        logger.warning(
                            "pool %s: %s resized to its recorded %s sectors",
                            self.name,
                            dm_name,
                            table[0].length,
                        )
                        ops.reload(dm_name, table)
                        ops.resume(dm_name)
                        live_table = table
                if live_table != table:
                    # Only a resize of libdm's changes a table, under its mark.
                    raise ChangedByAnotherError(
                        f"{dm_name} exists with table {'; '.join(map(str, live_table))}, "
                        f"expected {table[0]}: another program loaded it, and libdm "
                        f"leaves it as it is",
                        operation,
                        dm_name,
                    )
                if info.deferred_remove:
                    # Wanted again while a deferred removal is pending (Docker's
                    # activateDeviceIfNeeded does the same): take the removal back,
                    # unless another program's file stands where its node goes.
                    ops.refuse_node_in_the_way(
                        dm_name, operation, "remove it, then activate the device again"
                    )
                    try:
                        ops.cancel_deferred_remove(dm_name)
                    except DMError:
                        if ops.exists(dm_name):
                            raise
                        return self.activate(row, operation)  # gone meanwhile: recreate
                    # Without udev, libdevmapper dropped the /dev/mapper node when
                    # the deferred removal was requested: put it back.
                    ops.mknodes(dm_name)
                elif not ops.has_node(dm_name):
                    # A kill between the create ioctl and libdevmapper making
                    # the node leaves the device without one; another
                    # program's file there is refused, not replaced.
                    ops.refuse_node_in_the_way(
                        dm_name, operation, "remove it, then activate the device again"
                    )
                    ops.mknodes(dm_name)
                if info.suspended:
                    if not resume:
                        raise ChangedByAnotherError(
                            f"{dm_name} is suspended, and no change of libdm's left it so: "
                            f"another program did, and libdm leaves it as it is; once that "
                            f"program is done, resume it (dmsetup resume {dm_name})",
                            operation,
                            dm_name,
                        )
                    ops.resume(dm_name)
            else:
                ops.create(dm_name, table, uuid=uuid)
                absent = True
        except DMError:
            if not row.active and not ops.exists(dm_name):
                # Refused, and nothing of it is live: nothing to settle.
                self.drop_activation_intent()
            raise
        if not row.active:
            crash.point("activate:made")
            try:
                with self.store.transaction():
                    self.store.set_active(row.name, True)
                    self.store.drop_activation_intent()
            except StateError:
                # Not stored, so not done: the device this call made goes
                # again, and the kernel keeps agreeing with the records.
                if absent:
                    self.undo_kernel_step(operation, dm_name, ops.remove, dm_name)
                raise
        return replace(row, active=True)

    def mark_activation(self, name: str) -> None:
        """Mark device ``name``'s activation or deactivation as under way
        (see :meth:`activate`); the record of its outcome drops the mark."""
        with self.store.transaction(durable=False):
            self.store.set_activation_intent(name)

    def undo_kernel_step(
        self, operation: str, what: str, undo: Callable[..., object], *args: object
    ) -> None:
        """Take back a kernel step whose record could not be written (a
        full or failing state filesystem), so that the error the caller
        raises means "nothing changed".  A failure to undo is logged: the
        next :meth:`Pool.open <libdm.Pool.open>` settles the device from the records."""
        try:
            undo(*args)
        except (DMError, StateError) as exc:
            logger.error(
                "pool %s: %s: could not take back the kernel step on %s after the "
                "state could not be written (%s); the pool's next change or open settles it",
                self.name,
                operation,
                what,
                exc,
            )

    def deactivate(self, name: str) -> None:
        """Take device ``name``'s device-mapper device down, if it is up
        and proven to be this pool's: a device of its name that another
        pool or program made is logged and left alone (this pool's device
        is not up then)."""
        row = self.store.device(name)
        if row is None:
            return  # nothing recorded, nothing to prove
        try:
            live = self.live(row, "deactivate")
        except ForeignDeviceError as exc:
            logger.warning("pool %s: %s", self.name, exc.strerror)
            return
        if live is not None:
            with contextlib.suppress(NoSuchDeviceError):
                ops.remove(self.device_dm_name(name), deferred=self.config.deferred_removal)

    def discard_blocks(
        self, row: DeviceRecord, start: Bytes, length: Bytes, live: ownership.Live | None
    ) -> None:
        """Discard ``length`` bytes at ``start`` of device ``row``, so the
        pool gets the blocks back, unless something holds it open (its
        user's data must not vanish under it) or the pool ignores
        discards.  ``live``: its device as the caller proved it
        (:meth:`live_or_gone`); an inactive device is activated for it,
        under its own uuid, and removed again.

        Raises:
            DMError, OSError: the device could not be made or discarded.
        """
        if "ignore_discard" in self.config.features:
            return
        dm_name = self.device_dm_name(row.name)
        if live is None:
            ops.create(
                dm_name,
                self.thin_table(row, self.device.devno()),
                uuid=ownership.thin_uuid(self.config.token, row.thin_id),
            )
        try:
            if live is not None and live.info.open_count:
                logger.info(
                    "pool %s: %s is open, so its blocks are not discarded",
                    self.name,
                    dm_name,
                )
                return
            blockdev.discard(ops.device_path(dm_name), int(start), int(length))
        finally:
            if live is None:
                ops.remove(dm_name)
