"""The thin pool: reopening it, its devices, and its guards.

A :class:`Pool` is a state directory (SQLite store + lock file, and for
loop pools the data and metadata files) plus a live ``thin-pool``
device-mapper device.  It is composed of parts, each with its own
module: the store (:mod:`.store`), the lock (:mod:`.lock`), the live pool
device (:mod:`.pooldev`), the backing (:mod:`.backing`), the journal that
every change goes through (:mod:`.journal`), and growth (:mod:`.growth`);
its configuration is a :class:`~libdm.thin.config.PoolConfig`, and its
constructors live in :mod:`.creation`.

Units: sizes are accepted as ``int`` bytes or strings such as ``"10G"``
and must be whole 512-byte sectors; tables are in sectors.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from libdm.dm import blockdev, ops
from libdm.dm.errors import (
    DeviceBusyError,
    DeviceExistsError,
    DMError,
    NoSuchDeviceError,
    error_for,
)
from libdm.dm.info import DeviceInfo
from libdm.dm.target import Target
from libdm.dm.validate import check_name
from libdm.thin import backing as backings
from libdm.thin import crash, creation, ownership
from libdm.thin.config import ConfigChanges, PoolConfig, PoolKind
from libdm.thin.device import Snapshot, ThinDevice
from libdm.thin.errors import (
    REPAIR_HINT,
    FilesystemError,
    ForeignDeviceError,
    HandedOverError,
    PoolError,
    PoolFailedError,
    PoolFullError,
    PoolReadOnlyError,
    RefusedError,
    StateError,
)
from libdm.thin.growth import Growth, Region
from libdm.thin.journal import GrowthIntent, Journal, Op
from libdm.thin.lock import LOCK_NAME, PoolLock
from libdm.thin.pooldev import PoolDevice, PoolStatus
from libdm.thin.records import DeviceRecord
from libdm.thin.status import ThinPoolFailed, ThinPoolStatus
from libdm.thin.store import STORE_FILES, Store
from libdm.thin.table import ThinParams, ThinPoolParams
from libdm.thin.units import Bytes, DataBlocks, Sectors, format_size, parse_size

if TYPE_CHECKING:
    from libdm.thin.monitor import Monitor
    from libdm.thin.repair import RepairResult
    from libdm.thin.report import PoolInfo


__all__ = ["Pool"]

logger = logging.getLogger("libdm")

#: Docker's default ``dm.basesize``.
DEFAULT_BASE_SIZE = 10 << 30

#: Changes that settle the journal themselves (or must not wait for it):
#: everything else first finishes what an interrupted change left.
_OWN_RECOVERY = frozenset({"open", "create", "repair", "destroy"})

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


class Pool:
    """A thin pool and its thin devices.

    Get one with :meth:`create_loop`, :meth:`create`,
    :meth:`create_on_device`, :meth:`adopt` or :meth:`open`.  A ``Pool``
    can be shared by threads; several processes may open the same pool,
    and their changes are serialised by an exclusive lock on the state
    directory (a change waits up to ``lock_timeout`` seconds for it, then
    raises :class:`~libdm.PoolLockedError`).  A child of ``fork()`` opens
    the pool again: a change through its parent's ``Pool`` raises
    :class:`~libdm.StateError`, as the two would share one lock.

    Attributes:
        name: the pool's device-mapper name.
        directory: its state directory.
        kind: ``"loop"`` (files), ``"block"`` (block devices under linear
            pieces, one split or several) or ``"adopted"``.
        unavailable: after :meth:`open`, the devices recorded active that
            the kernel would not activate, name -> the error (the others
            are up; each is logged with the command that deletes it).
        config: its stored configuration, a ``PoolConfig`` (frozen; changed
            through :meth:`configure` and the growth methods).
    """

    unavailable: Mapping[str, str] = MappingProxyType({})

    name: str
    uuid: str
    kind: PoolKind
    config: PoolConfig
    _backing: backings.Backing

    # -- getting a pool --------------------------------------------------------

    create_loop = classmethod(creation.create_loop)
    create = classmethod(creation.create)
    create_on_device = classmethod(creation.create_on_device)
    adopt = classmethod(creation.adopt)

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        lock_timeout: float = 30.0,
        _store: Store | None = None,
    ) -> None:
        """Read the pool's state (see :meth:`load`).  The state directory
        must be private and its files are never reached through a symlink
        (see :class:`~libdm.thin.statedir.StateDir`).

        Raises:
            StateError: no, an unreadable or a damaged state store; a
                state directory that is not private; a symlinked lock file.
            PoolReadOnlyError: the directory is on a read-only filesystem.
            PermissionDeniedError: not allowed to read it.
        """
        self.directory = os.path.abspath(directory)
        self.lock_timeout = lock_timeout
        self._depth = 0  # nested _changing holds (under the lock)
        self._store = _store if _store is not None else Store(self.directory)
        self._lock = PoolLock(-1, os.path.join(self.directory, LOCK_NAME))
        self._store.share_lock(self._lock.thread_lock)
        try:
            self._lock.fd = self._store.statedir.open_file(
                LOCK_NAME, os.O_RDWR, "open", "lock file", create=True
            )
            self._load()
        except BaseException:
            self._lock.close()
            if _store is None:  # a creation cleans up its own store
                self._store.close()
            raise
        self._device = PoolDevice(self.name, self.uuid, self.directory)
        self._journal = Journal(self._store, self._device, self)
        self._growth = Growth(self)

    def _load(self) -> None:
        self._seen = self._store.sequence
        record = self._store.pool()
        self.name = record.name
        self.uuid = record.uuid
        self.kind = record.kind
        self._use_config(record.config)

    def _use_config(self, config: PoolConfig) -> None:
        """From now on, run on ``config`` (and the backing it records)."""
        self._backing = backings.from_config(self.kind, self._store.statedir, self.name, config)
        self.config = config

    def _update_config(self, config: PoolConfig) -> None:
        """Store ``config`` (this pool's, with changes made by
        :meth:`PoolConfig.but <libdm.thin.config.PoolConfig.but>`) and run on it."""
        with self._store.transaction():
            self._store.set_config(config)
        self._use_config(config)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, lock_timeout: float = 30.0) -> Pool:
        """Read a pool's state without touching any device: for reports and
        listings of a pool that may or may not be live (:meth:`open` makes
        it live).

        Raises:
            StateError: no or an unreadable state store.
            PermissionDeniedError: not allowed to read it.
        """
        return cls(directory, lock_timeout=lock_timeout)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        lock_timeout: float = 30.0,
        progress: Callable[[int, int], None] | None = None,
        lazy: bool = False,
    ) -> Pool:
        """Open a pool from its state directory and make it live.

        Idempotent: on a pool that is already live it verifies the live
        table against the stored one.  After a reboot it re-attaches loop
        files (or rebuilds the linear pieces of a split device), runs
        ``thin_check`` on the metadata first when thin-provisioning-tools
        is installed, loads the pool table from the *stored* block size and
        features (never from defaults), finishes or undoes a change a crash
        interrupted, retries deferred deletes, and re-activates the devices
        that were active.

        Args:
            directory: the state directory (for loop pools, the directory
                given to :meth:`create_loop`).
            lock_timeout: seconds to wait for another process's change.
            progress: called as ``progress(done, total)`` while the devices
                are re-activated (the CLI draws a counter with it).
            lazy: leave the devices that were active down, as Docker's
                driver does: each is activated on first use
                (:meth:`ThinDevice.activate`, :meth:`~ThinDevice.format`,
                :meth:`~ThinDevice.mount`), so opening a pool of many
                devices costs little.  Devices already live are checked as always.

        Returns:
            The :class:`Pool`.

        Raises:
            StateError: no or an unreadable state store, a live table that
                differs from the stored one (the difference is named), or a
                transaction id that neither the store nor its journal
                explains.
            PoolFailedError: thin_check found the metadata damaged.
            PoolLockedError: another process held the lock too long.
        """
        pool = cls(directory, lock_timeout=lock_timeout)
        try:
            with pool._changing("open"):
                was_there = ops.exists(pool.name)
                pieces_there = pool._pieces_live()
                try:
                    pool._bring_up("open", progress, lazy=lazy)
                except BaseException:
                    # A pool this call made live and then refused (a
                    # transaction id another program moved, say) goes down
                    # again: nothing may use it.
                    if not was_there:
                        pool._take_down_refused("open", keep_pieces=pieces_there)
                    raise
        except BaseException:
            pool.close()
            raise
        return pool

    def _pieces_live(self) -> bool:
        """True if a linear piece under the pool (a block pool's) exists."""
        return any(ops.exists(name) for name in self._backing.piece_names())

    def _take_down_refused(self, operation: str, *, keep_pieces: bool) -> None:
        """Undo what a refused :meth:`open` made live: the thin devices and
        the pool device it created (each proved ours by the uuid libdm set
        on it), then the linear pieces under them unless ``keep_pieces``
        (they were there before; loop devices detach by themselves).  A
        failure here is logged: the refusal is what the caller must see."""
        try:
            try:
                made = [
                    (
                        self.device_dm_name(row.name),
                        ownership.thin_uuid(self.config.token, row.thin_id),
                    )
                    for row in self._store.devices()
                ]
            except StateError:
                # A store that cannot list its devices (damaged): the pool
                # was not live before, so every live device with the uuid
                # libdm gives this pool's devices was made here.
                prefix = ownership.thin_uuid(self.config.token, 0)[:-1]
                made = []
                for entry in ops.list_devices():
                    with contextlib.suppress(NoSuchDeviceError):
                        uuid = ops.info(entry.name).uuid
                        if uuid is not None and uuid.startswith(prefix):
                            made.append((entry.name, uuid))
            for dm_name, uuid in made:
                if self._made_here(dm_name, uuid):
                    ops.remove(dm_name)
            owned = self._backing.capabilities.owns_devices
            if owned and self._made_here(self.name, self.uuid):
                ops.remove(self.name)
            self._device.forget()
            if owned and not keep_pieces:
                self._backing.teardown()
        except (DMError, OSError) as exc:
            logger.error(
                "pool %s: refused at %s, and taking it down again failed: %s",
                self.name,
                operation,
                exc,
            )

    @staticmethod
    def _made_here(dm_name: str, uuid: str) -> bool:
        """True if device ``dm_name`` exists with the uuid libdm gave it."""
        try:
            return ops.info(dm_name).uuid == uuid
        except NoSuchDeviceError:
            return False

    # -- locking -------------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self, operation: str) -> Iterator[None]:
        """Hold the pool for a change: this process's threads and other
        processes wait (up to ``lock_timeout``).  The state is read again
        when the lock is taken: another process may have changed it (and
        then, the lock held, no other process can: Store.held)."""
        with (
            self._lock.held(operation, self.name, self.lock_timeout, self._device.forget),
            self._store.held(),
        ):
            # The store has taken in other processes' changes (held); the
            # configuration is read again only if one of them changed it (a
            # change of this process's own goes through _use_config).
            if self._store.sequence != self._seen:
                self._load()
            self._depth += 1
            try:
                # Only the outermost change recovers: an inner one runs
                # inside a change whose intent is legitimately open.
                if self._depth == 1 and operation not in _OWN_RECOVERY:
                    self._recover_interrupted(operation)
                yield
            finally:
                self._depth -= 1
                self._seen = self._store.sequence

    def settle(self) -> str | None:
        """Finish or undo what a change interrupted by a crash left (in any
        process), as the pool's next change would: a long-running watcher
        calls this so that a pool left suspended by a killed growth does
        not wait for someone's next change.

        Returns:
            What was settled, said for people, or ``None`` if nothing was
            pending (then nothing is locked or written).

        Raises:
            StateError, PoolError: as the next change would (a pool that
                is not live is refused, saying what to run).
        """
        what = self._interrupted()
        if what is None:
            return None
        with self._changing("settle"):
            return what

    def _interrupted(self) -> str | None:
        """What a change interrupted by a kill (or by an error past its
        kernel step) left in the journal, said for people; ``None`` if
        nothing.  Under the pool's lock, an intent is always such a
        leftover: a change writes and settles its intent in one hold."""
        parts = []
        for intent in self._store.intents():
            parts.append(f"{intent.op.value.replace('_', ' ')} of {intent.name!r}")
        if self._store.has_growth_intent():
            try:
                growth = self._store.growth_intent()
                operation = "growth" if growth is None else growth.operation
            except StateError:
                operation = "growth"  # damaged: recovery names what is wrong with it
            parts.append(f"{operation} of the pool")
        resized = self._store.resize_intent()
        if resized is not None:
            parts.append(f"resize of {resized!r}")
        return ", ".join(parts) or None

    def _drop_resize_intent(self) -> None:
        """The live table is the recorded one: drop the mark.  Not durable,
        and a failure to write it is only logged: a mark left makes the
        next change check the tables again, which changes nothing."""
        try:
            with self._store.transaction(durable=False):
                self._store.drop_resize_intent()
        except (DMError, OSError, sqlite3.Error) as exc:
            logger.warning("pool %s: could not clear a finished resize's mark: %s", self.name, exc)

    def _recover_interrupted(self, operation: str) -> None:
        """Before a change: finish or undo what an interrupted one left, as
        :meth:`open` does (the one recovery path, :meth:`_bring_up`), so
        that every entry point (a Pool however obtained, the CLI, the
        monitor, the snapshotter) meets a settled pool.  A pool that is not
        live is refused instead, saying what to run: bringing it up is
        :meth:`open`'s job."""
        what = self._interrupted()
        if what is None:
            return
        if not backings.exists_live(self.name):
            raise StateError(
                f"pool {self.name!r} is not active and holds a change a crash "
                f"interrupted ({what}); libdm pool open {self.directory} (Pool.open) "
                f"finishes it",
                operation,
                self.name,
            )
        logger.warning(
            "pool %s: finishing a change that was interrupted (%s) before %s",
            self.name,
            what,
            operation,
        )
        # A pool that failed or is read-only keeps its intents: the journal
        # then refuses changes of thin ids, saying so.
        self._bring_up(operation)

    # -- the pool device -----------------------------------------------------------

    @property
    def block_size(self) -> Sectors:
        """The data block size in ``Sectors``."""
        return self.config.block_size

    @property
    def min_free_space(self) -> float:
        """Percent of data and metadata kept free (``dm.min_free_space``)."""
        return self.config.min_free_space

    @property
    def deferred_removal(self) -> bool:
        return self.config.deferred_removal

    @property
    def deferred_deletion(self) -> bool:
        return self.config.deferred_deletion

    @property
    def path(self) -> str:
        """The pool device's path, ``/dev/mapper/<name>``."""
        return ops.device_path(self.name)

    def _devno(self) -> str:
        return self._device.devno()

    def _expected_params(self, devs: backings._Devices) -> ThinPoolParams:
        return ThinPoolParams(
            devs.meta.devno,
            devs.data.devno,
            self.block_size,
            self.config.low_water_mark,
            self.config.features,
        )

    def _table_for(self, devs: backings._Devices) -> list[Target]:
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

    def _pool_is_live(self, operation: str) -> bool:
        """True if the pool device is live.  A device of its name that is
        not this pool's is refused (ForeignDeviceError); this pool's own
        without a live table (a create killed before its load) is removed,
        so the caller makes it afresh."""
        live = ownership.live_pool(self.name, self.uuid, self.directory, operation)
        if live is not None and not live.info.live_table:
            ops.remove(self.name)
            return False
        return live is not None

    def _activate_pool(self, operation: str) -> None:
        """Make the pool device live, or check the live one against the store."""
        if self._pool_is_live(operation):
            self._settle_live_pool(operation)
            self._verify_live_pool(operation)
            return
        if not self._backing.capabilities.owns_devices:
            raise StateError(
                f"adopted pool {self.name!r} is not live; libdm does not own its devices, "
                f"so whoever made it must activate it",
                operation,
                self.name,
            )
        with self._backing.attach() as devs:
            if operation == "open":
                self._check_superblock(devs.meta.path, operation)
                complaint = _thin_check_failure(devs.meta.path)
                if complaint is not None:
                    # Named by what lasts (the file, or the block devices),
                    # not by the loop device attached for the check.
                    where = self._backing.describe().metadata_file or devs.meta.path
                    raise PoolFailedError(
                        f"the metadata of pool {self.name!r} ({where}) is damaged; "
                        f"thin_check says: {complaint}; repair it with Pool.repair() "
                        f"(at a shell: libdm pool repair --pool {self.directory}), which "
                        f"keeps the damaged copy",
                        operation,
                        self.name,
                    )
            ops.create(self.name, self._table_for(devs), uuid=self.uuid)
        self._device.forget()
        self._record_moves(operation)

    def _record_moves(self, operation: str) -> None:
        """Record the block devices found by their label under new paths
        there; at open, warn of devices known by path and size only."""
        backing = self._backing.pieces()
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
            self._update_config(self.config.with_backing(**changes))

    def _settle_live_pool(self, operation: str) -> None:
        """A live pool left suspended, or with a table loaded but never
        resumed, by a process killed mid-change.  A growth's intent is
        finished before this (see :meth:`_finish_growth`); what is left
        was never recorded, so it is undone: the live table is loaded over
        the inactive one, and the pool is resumed."""
        info = ops.info(self.name)
        if not (info.suspended or info.inactive_table):
            return
        if not self._backing.capabilities.owns_devices:
            state = "suspended" if info.suspended else "carrying an inactive table"
            raise StateError(
                f"adopted pool {self.name!r} is {state}; its owner must resume "
                f"it (dmsetup resume {self.name})",
                operation,
                self.name,
            )
        if info.inactive_table:
            logger.warning("pool %s: dropping a table loaded by an interrupted change", self.name)
            ops.reload(self.name, ops.table(self.name))
        logger.warning("pool %s: resuming it after an interrupted change", self.name)
        ops.resume(self.name)

    def _ever_used(self) -> bool:
        """True if the store shows the pool held a device at some time (a
        pool handed to another program may hold any: it was used)."""
        return bool(
            self.config.handed_to is not None
            or self._store.transaction_id()
            or self._store.count_devices()
            or self._store.intents()
            or self._store.deferred_deletes()
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
        where = self._backing.describe().metadata_file or meta_path
        repair = (
            f"Pool.repair() (at a shell: libdm pool repair --pool {self.directory}) tries "
            f"to recover it and keeps the damaged copy; by hand: thin_repair -i {where} "
            f"-o <a new file or device of the same size>, thin_check it, and put it in "
            f"place of {where}"
        )
        if not any(head):
            if not self._ever_used():
                return
            # What the blank superblock lost, thin_repair must be told.
            blocks = int(self._data_sectors(self.config)) // int(self.block_size)
            repair = repair.replace(
                " -o <",
                f" --transaction-id {self._store.transaction_id()} --data-block-size "
                f"{int(self.block_size)} --nr-data-blocks {blocks} -o <",
            )
            raise PoolFailedError(
                f"the metadata superblock of pool {self.name!r} on {where} is blank, but "
                f"the store records transaction {self._store.transaction_id()} and "
                f"{self._store.count_devices()} devices: loading the pool would format "
                f"empty metadata over it; {repair}",
                operation,
                self.name,
            )
        if len(head) < 40 or int.from_bytes(head[32:40], "little") != THIN_SUPERBLOCK_MAGIC:
            raise PoolFailedError(
                f"the metadata of pool {self.name!r} ({where}) holds no thin-pool "
                f"superblock (bad magic); {repair}",
                operation,
                self.name,
            )

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
        if self._backing.capabilities.owns_devices:
            with self._backing.attach() as devs:
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
        return self._device.status()

    @property
    def suspended(self) -> bool:
        """True while the pool device is suspended: a growth a kill
        interrupted leaves it so, and the pool's next change (or
        :meth:`open`) finishes the growth and resumes it.  Its status then
        still says ``rw``, but every I/O to its devices waits.

        Raises:
            NoSuchDeviceError: the pool device is not live.
        """
        return ops.info(self.name).suspended

    def _writable_status(self, operation: str) -> ThinPoolStatus:
        st = self.status()
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

    def _check_free_space(self, st: ThinPoolStatus, operation: str) -> None:
        pct = self.min_free_space
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

    # -- bringing a pool up ------------------------------------------------------------

    def _adopt_live_devices(self, operation: str) -> dict[str, ownership.Live]:
        """A device whose device-mapper device is live is active, whatever
        the store says: a process killed between activating it and
        recording that (or between recording a deactivation and doing it)
        leaves the two apart, and the kernel is the truth here.  Only a
        device proven to be this pool's counts (another pool's or
        program's device of the same name is logged and left alone).
        Returns the pool's devices that are live, by name."""
        prefix = f"{self.name}-"
        present: dict[str, ownership.Live] = {}
        for entry in ops.list_devices():
            if not entry.name.startswith(prefix):
                continue
            row = self._store.device(entry.name[len(prefix) :])
            if row is None:
                continue
            try:
                live = self._live_or_gone(row, operation)
            except ForeignDeviceError as exc:
                if not row.active:  # an active one is reported by its activation
                    logger.warning("pool %s: %s", self.name, exc.strerror)
                continue
            if live is None:
                continue
            present[row.name] = live
            if not row.active:
                with self._store.transaction():
                    self._store.set_active(row.name, True)
        return present

    def _bring_up(
        self,
        operation: str,
        progress: Callable[[int, int], None] | None = None,
        *,
        lazy: bool = False,
    ) -> None:
        if self.config.repair is not None:
            from libdm.thin import repair

            repair.finish_swap(self)

        def up() -> PoolStatus:
            self._activate_pool(operation)
            return self.status()

        # The one place a pool is reconciled with its journal.
        handed = self.config.handed_to is not None
        st = self._journal.recover(operation, up, thin_ids=not handed)
        if isinstance(st, ThinPoolFailed) or handed:
            # Nothing to activate: a failed pool's changes are refused with
            # the reason; a handed-over pool's thin devices are its user's.
            return
        present = self._adopt_live_devices(operation)
        resized = self._store.resize_intent() is not None
        if resized:
            self._discard_cut_off(present, operation)
        unavailable: dict[str, str] = {}
        self.unavailable = unavailable
        rows = self._store.active_devices()
        if lazy:
            # Only the live ones, so that each has its recorded table; the
            # others come up on first use (ready_device).
            rows = [row for row in rows if row.name in present]
        for done, row in enumerate(rows, 1):
            if progress is not None:
                progress(done, len(rows))
            try:
                live = present.get(row.name)
                self._activate(row, operation, absent=live is None, live=live)
            except ForeignDeviceError as exc:
                # Its name is another's: nothing to delete, the name must come free.
                unavailable[row.name] = str(exc)
                logger.error(
                    "pool %s: device %s (thin id %s) could not be activated: %s",
                    self.name,
                    row.name,
                    row.thin_id,
                    exc,
                )
            except (DMError, ValueError) as exc:
                # One device the kernel refuses must not keep the others down.
                unavailable[row.name] = str(exc)
                logger.error(
                    "pool %s: device %s (thin id %s) could not be activated: %s; delete it "
                    "with: libdm thin delete --pool %s %s",
                    self.name,
                    row.name,
                    row.thin_id,
                    exc,
                    self.directory,
                    row.name,
                )
        if resized:
            # Every live device now has its recorded table (_activate
            # reloads one a killed resize left at its old length).
            self._drop_resize_intent()

    def _discard_cut_off(self, present: Mapping[str, ownership.Live], operation: str) -> None:
        """A shrink interrupted after its record: give back the blocks past
        the new end, as the shrink would have (before the reload, while a
        live device still reaches them; not if something has it open).
        Done again after a kill later in the shrink: a discard is
        idempotent.  A failure is logged: only space is at stake."""
        name, old = self._store.resize_intent(), self._store.resize_from()
        row = None if name is None else self._store.device(name)
        if row is None or old is None or old <= row.size:
            return
        try:
            self._discard_blocks(
                replace(row, size=old),
                row.size.bytes(),
                (old - row.size).bytes(),
                present.get(row.name),
            )
        except (DMError, OSError) as exc:
            logger.warning(
                "pool %s: %s: the blocks an interrupted shrink of %s cut off could not be "
                "given back: %s",
                self.name,
                operation,
                name,
                exc,
            )

    # -- the journal's host (see libdm.thin.journal.JournalHost) -----------------------

    def _finish_growth(self, intent: GrowthIntent, operation: str) -> bool:
        return self._growth.finish(intent, operation)

    # -- devices ----------------------------------------------------------------------

    def device_dm_name(self, name: str) -> str:
        """The device-mapper name of thin device ``name``: ``<pool>-<name>``."""
        return f"{self.name}-{name}"

    def _check_device_name(self, name: str) -> str:
        check_name(name)
        dm_name = self.device_dm_name(name)
        try:
            check_name(dm_name)
        except ValueError as exc:
            raise ValueError(
                f"device name {name!r} is too long for pool {self.name!r}: {exc}"
            ) from None
        return dm_name

    def _wrap(self, row: DeviceRecord) -> ThinDevice:
        return (Snapshot if row.parent is not None else ThinDevice)(self, row)

    def _row(self, name: str, operation: str) -> DeviceRecord:
        """The store's record of device ``name``.

        Raises:
            NoSuchDeviceError: the pool has no such device.
        """
        row: DeviceRecord | None = self._store.device(name)
        if row is None:
            if any(made.name == name for made in self._pending()[1]):
                raise error_for(
                    errno.ENXIO,
                    operation,
                    name,
                    message=f"device {name!r} of pool {self.name!r} is being created (a "
                    f"create was interrupted; the pool's next change, or libdm pool open "
                    f"{self.directory}, finishes it)",
                )
            raise error_for(
                errno.ENXIO,
                operation,
                name,
                message=f"pool {self.name!r} has no device named {name!r}",
            )
        if name in self._deleting():
            # Its data may be discarded already: never handed out again.
            raise error_for(
                errno.ENXIO,
                operation,
                name,
                message=f"device {name!r} of pool {self.name!r} is being deleted (a delete "
                f"was interrupted; the pool's next change, or libdm pool open "
                f"{self.directory}, finishes it)",
            )
        return row

    def _deleting(self) -> set[str]:
        """The devices whose delete an interrupted change left pending."""
        return {intent.name for intent in self._store.intents() if intent.op is Op.DELETE}

    def device(self, name: str) -> ThinDevice:
        """The thin device or snapshot called ``name``.

        Raises:
            NoSuchDeviceError: the pool has no such device.
        """
        row = self._row(name, "device")
        return self._wrap(row)

    def _pending(self) -> tuple[set[str], list[DeviceRecord]]:
        """What the pool's next change does to the devices listed: the names
        whose delete was interrupted (it finishes them), and the devices
        whose create was interrupted after the kernel made them (it records
        them, active, as a create leaves a device)."""
        intents = self._store.intents()
        deleting = {intent.name for intent in intents if intent.op is Op.DELETE}
        creates = [intent for intent in intents if intent.op.creates]
        if not creates or not backings.exists_live(self.name):
            return deleting, []
        try:
            st = self._device.status()
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

    def devices(self) -> list[ThinDevice]:
        """Every thin device and snapshot, sorted by name, as the pool's next
        change leaves them: not one whose delete was interrupted (that
        change finishes it), and one whose create was interrupted after the
        kernel made it (that change records it)."""
        deleting, made = self._pending()
        rows = [row for row in self._store.devices() if row.name not in deleting]
        return [self._wrap(row) for row in sorted(rows + made, key=lambda row: row.name)]

    def children(self, name: str) -> list[ThinDevice]:
        """The snapshots taken of device ``name`` (listed as by
        :meth:`devices`)."""
        deleting, made = self._pending()
        rows = [
            row
            for child in self._store.children(name)
            if child not in deleting and (row := self._store.device(child)) is not None
        ]
        rows += [row for row in made if row.parent == name]
        return [self._wrap(row) for row in sorted(rows, key=lambda row: row.name)]

    def create_thin(self, name: str, size: int | str | None = None) -> ThinDevice:
        """Create a thin device and activate it.

        Args:
            name: its name within the pool; its device-mapper name is
                ``<pool>-<name>``.
            size: its size, bytes or a string such as ``"10G"`` (whole
                512-byte sectors); by default the pool's :attr:`base_size`.

        Returns:
            The new, active :class:`~libdm.ThinDevice`.

        Raises:
            ValueError: a bad name or size.
            DeviceExistsError: the name is taken.
            PoolFullError: free space is below ``min_free_space``, or no
                thin id is left.
            PoolReadOnlyError, PoolFailedError: the pool refuses changes.
            DMError: the kernel refused the device's table; its thin id and
                record are deleted again before this is raised.
        """
        dm_name = self._check_device_name(name)
        # parse_size refuses sizes past the kernel's limit
        sectors = parse_size(self.base_size if size is None else size, what="size").sectors()
        with self._changing("create_thin"):
            self._before_change("create_thin", name, dm_name)
            return self._provision(Op.CREATE_THIN, name, sectors, None, "create_thin")

    def snapshot_device(self, origin: str, name: str) -> ThinDevice:
        """Snapshot device ``origin`` as ``name`` (see :meth:`ThinDevice.snapshot`)."""
        dm_name = self._check_device_name(name)
        with self._changing("snapshot"):
            row = self._row(origin, "snapshot")
            self._before_change("snapshot", name, dm_name)
            # Only a live origin is suspended around the message: asked
            # first, so that no suspend of a missing device fails (and is
            # logged), and no device of its name made by another is touched.
            origin_live = self._live(row, "snapshot") is not None
            return self._provision(
                Op.CREATE_SNAP,
                name,
                row.size,
                origin,
                "snapshot",
                row.thin_id,
                self.device_dm_name(origin) if origin_live else "",
            )

    def _provision(
        self,
        op: Op,
        name: str,
        size: Sectors,
        parent: str | None,
        operation: str,
        origin_id: int | None = None,
        origin_dm: str | None = None,
    ) -> ThinDevice:
        """Provision a device and activate it before its record says so
        (its device-mapper name was checked free under this lock); if the
        kernel refuses its table, delete its thin id and record again
        (journalled, as any delete) rather than leave a record no open can
        activate."""
        failed: list[Exception] = []

        def activate(thin_id: int) -> ThinDevice | None:
            record = DeviceRecord(name, thin_id, size, parent, active=True)
            try:
                return self._activate(record, operation, absent=True)
            except Exception as exc:
                failed.append(exc)  # undone once recorded, below
                return None

        device = self._journal.provision(
            op, name, size, parent, origin_id, origin_dm, activate=activate
        )
        if device is None:
            try:
                self._delete_unactivated(name)
            except DMError as undo:
                logger.error(
                    "pool %s: could not delete %s after its activation failed: %s",
                    self.name,
                    name,
                    undo,
                )
            raise failed[0]
        return device

    def _delete_unactivated(self, name: str) -> None:
        """Delete device ``name``, whose activation just failed, as a
        journalled delete that does not discard its blocks (it never held
        data), and takes down a device of its name only if proven this
        pool's (another program may have taken the name meanwhile)."""
        with self._changing("delete"):
            row = self._row(name, "delete")
            self._journal.delete(
                name, row.thin_id, row.active, lambda: self._deactivate(name), False
            )

    def _before_change(self, operation: str, name: str, dm_name: str) -> None:
        self._refuse_if_handed_over(operation)
        st = self._writable_status(operation)
        if self._journal.retry_deferred_deletes():
            st = self._writable_status(operation)  # what the retry freed counts
        self._check_free_space(st, operation)
        if self._store.device(name) is not None:
            raise DeviceExistsError(
                errno.EEXIST,
                f"pool {self.name!r} already has a device named {name!r}",
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
            other = f"{self.name}-{name[:cut]}"
            if ownership.libdm_pool_named(other):
                raise DeviceExistsError(
                    errno.EEXIST,
                    f"device name {name!r} would make {dm_name!r}, the name of device "
                    f"{name[cut + 1 :]!r} of libdm pool {other!r}; choose a name that "
                    f"does not start with {name[: cut + 1]!r}",
                    operation,
                    dm_name,
                )

    def activate_device(self, name: str) -> None:
        """Activate device ``name`` (see :meth:`ThinDevice.activate`)."""
        with self._changing("activate"):
            row = self._row(name, "activate")
            self._activate(row, "activate")

    def ready_device(self, name: str, operation: str = "use") -> str:
        """The path of device ``name``, live: a device recorded active
        whose device is not live (as :meth:`open` with ``lazy=True`` leaves
        them) is activated first.

        Raises:
            NoSuchDeviceError: the pool has no such device, or it is not
                active.
            ForeignDeviceError: the device of its name is not the pool's.
        """
        row = self._row(name, operation)
        if self._live(row, operation) is None:
            if not row.active:
                raise error_for(errno.ENXIO, operation, self.device_dm_name(name))
            with self._changing(operation):
                self._activate(self._row(name, operation), operation)
        return ops.device_path(self.device_dm_name(name))

    def _thin_table(self, row: DeviceRecord, pool_devno: str) -> list[Target]:
        return [Target(0, row.size, "thin", str(ThinParams(pool_devno, row.thin_id)))]

    def _live(self, row: DeviceRecord, operation: str) -> ownership.Live | None:
        """The live device-mapper device of device ``row``, proven to be
        the one this pool made (see :mod:`.ownership`), or ``None`` when no
        device has its name.  Every operation on a device asks this first.

        Raises:
            ForeignDeviceError: a device of its name that is not this
                pool's (named, with its owner); it is left alone.
        """
        try:
            devno: str | None = self._device.devno()
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

    def _live_or_gone(self, row: DeviceRecord, operation: str) -> ownership.Live | None:
        """:meth:`_live`, with this pool's own device that a create killed
        before its load left without a table removed (``None`` then)."""
        live = self._live(row, operation)
        if live is not None and not live.info.live_table:
            ops.remove(self.device_dm_name(row.name))
            return None
        return live

    def _live_devices(
        self, rows: Iterable[DeviceRecord], operation: str
    ) -> dict[str, ownership.Live]:
        """Those of ``rows`` whose device is live and proven this pool's,
        by name: what taking the pool down removes.  A device of one of
        their names made by another pool or program is logged and left
        out (this pool's device is not live then)."""
        live: dict[str, ownership.Live] = {}
        for row in rows:
            try:
                proven = self._live(row, operation)
            except ForeignDeviceError as exc:
                logger.warning("pool %s: %s", self.name, exc.strerror)
                continue
            if proven is not None:
                live[row.name] = proven
        return live

    def live_device(self, name: str) -> DeviceInfo | None:
        """The info of device ``name``'s live device-mapper device, once
        proven to be this pool's own (its uuid and table), or ``None`` when
        none is live.

        Raises:
            NoSuchDeviceError: the pool has no such device.
            ForeignDeviceError: a device-mapper device of its name that
                this pool did not make (named, with its owner).
        """
        live = self._live(self._row(name, "info"), "info")
        return None if live is None else live.info

    def _activate(
        self,
        row: DeviceRecord,
        operation: str,
        *,
        absent: bool = False,
        live: ownership.Live | None = None,
    ) -> ThinDevice:
        """Make device ``row`` live (or check the live one).  ``absent``:
        the caller knows no device-mapper device of its name exists, so
        none is looked for; ``live``: the caller has just proven it."""
        dm_name = self.device_dm_name(row.name)
        table = self._thin_table(row, self._device.devno())
        uuid = ownership.thin_uuid(self.config.token, row.thin_id)
        if not absent and live is None:
            live = self._live_or_gone(row, operation)
        if absent:
            try:
                ops.create(dm_name, table, uuid=uuid)
            except DeviceExistsError:
                return self._activate(row, operation)  # made meanwhile: check it
        elif live is not None:
            info, live_table = live
            if (
                len(live_table) == 1
                and live_table[0]._replace(length=table[0].length) == table[0]
                and live_table != table
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
                    with self._store.transaction():
                        self._store.set_size(row.name, kept)
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
                raise StateError(
                    f"{dm_name} exists with table {'; '.join(map(str, live_table))}, "
                    f"expected {table[0]}",
                    operation,
                    dm_name,
                )
            if info.deferred_remove:
                # Wanted again while a deferred removal is pending (Docker's
                # activateDeviceIfNeeded does the same): take the removal back.
                try:
                    ops.cancel_deferred_remove(dm_name)
                except DMError:
                    if ops.exists(dm_name):
                        raise
                    return self._activate(row, operation)  # gone meanwhile: recreate
                # Without udev, libdevmapper dropped the /dev/mapper node when
                # the deferred removal was requested: put it back.
                ops.mknodes(dm_name)
            elif not os.path.lexists(f"/dev/mapper/{dm_name}"):
                # A kill between the create ioctl and libdevmapper making
                # the node leaves the device without one.
                ops.mknodes(dm_name)
            if info.suspended:
                ops.resume(dm_name)
        else:
            ops.create(dm_name, table, uuid=uuid)
            absent = True
        if not row.active:
            try:
                with self._store.transaction():
                    self._store.set_active(row.name, True)
            except StateError:
                # Not stored, so not done: the device this call made goes
                # again, and the kernel keeps agreeing with the records.
                if absent:
                    self._undo_kernel_step(operation, dm_name, ops.remove, dm_name)
                raise
        return self._wrap(replace(row, active=True))

    def _undo_kernel_step(
        self, operation: str, what: str, undo: Callable[..., object], *args: object
    ) -> None:
        """Take back a kernel step whose record could not be written (a
        full or failing state filesystem), so that the error the caller
        raises means "nothing changed".  A failure to undo is logged: the
        next :meth:`open` settles the device from the records."""
        try:
            undo(*args)
        except (DMError, StateError) as exc:
            logger.error(
                "pool %s: %s: could not take back the kernel step on %s after the "
                "state could not be written (%s); libdm pool open settles it",
                self.name,
                operation,
                what,
                exc,
            )

    def resize_device(
        self, name: str, size: int | str, *, force: bool = False, grow_filesystem: bool = False
    ) -> ThinDevice:
        """Resize device ``name`` (see :meth:`ThinDevice.resize`)."""
        new = parse_size(size, what="size").sectors()
        with self._changing("resize_device"):
            row = self._row(name, "resize_device")
            old = row.size
            dm_name = self.device_dm_name(name)
            proven = self._live_or_gone(row, "resize_device")
            live = proven is not None
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
                if grow_filesystem:
                    # Asked again (after a kill, say): the filesystem may
                    # still lag the device.
                    self._grow_filesystem(name, old, new)
                return self.device(name)
            if new < old:
                if not force:
                    raise ValueError(
                        f"{name!r} would shrink from {format_size(old.bytes())} to "
                        f"{format_size(new.bytes())}, cutting off whatever is stored past "
                        f"the new end; pass force=True (--force) if that is meant"
                    )
                if "ignore_discard" in self.config.features:
                    # The cut-off blocks cannot be discarded, so they would
                    # read back, stale, if the device grew again.
                    raise PoolError(
                        errno.EOPNOTSUPP,
                        f"{name!r} cannot shrink: pool {self.name!r} ignores discards "
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
                self._writable_status("resize_device")
            # The store first, with a mark that the live table may lag and
            # the size it had: a kill before the reload leaves it shorter or
            # longer than the record, and the next change through any entry
            # point (the mark makes it run the bring-up) finishes it.  A
            # store that cannot be written stops it here, before any block
            # is touched.
            with self._store.transaction():
                self._store.set_size(name, new)
                self._store.set_resize_intent(name, old)
            crash.point("resize_device:recorded")
            if new < old:
                # Give the cut-off blocks back to the pool, active or not:
                # what lies past the new end must not come back if the
                # device grows again.
                self._discard_blocks(row, new.bytes(), (old - new).bytes(), proven)
            if live:
                ops.reload(dm_name, self._thin_table(replace(row, size=new), self._devno()))
                ops.resume(dm_name)
            self._drop_resize_intent()
            if grow_filesystem and new > old:
                self._grow_filesystem(name, old, new)
            return self.device(name)

    def _grow_filesystem(self, name: str, old: Sectors, new: Sectors) -> None:
        """Grow the filesystem on live device ``name`` to its size."""
        from libdm.thin import fs

        dm_name = self.device_dm_name(name)
        try:
            fs.grow_filesystem(ops.device_path(dm_name))
        except FilesystemError as exc:
            raise FilesystemError(
                f"{self._resized(name, old, new)}, but its filesystem did not grow: "
                f"{exc.strerror}",
                "resize_device",
                dm_name,
            ) from exc
        except RefusedError as exc:
            raise RefusedError(
                exc.errno,
                f"{self._resized(name, old, new)}, but its filesystem was not grown: "
                f"{exc.strerror}",
                "resize_device",
                dm_name,
            ) from exc

    @staticmethod
    def _resized(name: str, old: Sectors, new: Sectors) -> str:
        if new == old:
            return f"device {name!r} is {format_size(new.bytes())} already"
        return (
            f"device {name!r} grew from {format_size(old.bytes())} to {format_size(new.bytes())}"
        )

    def deactivate_device(self, name: str) -> None:
        """Deactivate device ``name`` (see :meth:`ThinDevice.deactivate`)."""
        with self._changing("deactivate"):
            row = self._row(name, "deactivate")
            self._live(row, "deactivate")  # refuses another's
            self._deactivate(name)
            try:
                with self._store.transaction():
                    self._store.set_active(name, False)
            except StateError:
                # Not stored, so not done: the device comes back up (or its
                # deferred removal is taken back) as its record still says.
                self._undo_kernel_step(
                    "deactivate", self.device_dm_name(name), self._activate, row, "deactivate"
                )
                raise

    def _deactivate(self, name: str) -> None:
        """Take device ``name``'s device-mapper device down, if it is up
        and proven to be this pool's: a device of its name that another
        pool or program made is logged and left alone (this pool's device
        is not up then)."""
        row = self._store.device(name)
        if row is None:
            return  # nothing recorded, nothing to prove
        try:
            live = self._live(row, "deactivate")
        except ForeignDeviceError as exc:
            logger.warning("pool %s: %s", self.name, exc.strerror)
            return
        if live is not None:
            with contextlib.suppress(NoSuchDeviceError):
                ops.remove(self.device_dm_name(name), deferred=self.deferred_removal)

    def delete_device(self, name: str, *, discard: bool | None = None) -> None:
        """Delete device ``name`` (see :meth:`ThinDevice.delete`).

        Args:
            discard: discard its blocks first; ``None`` (the default) as
                :attr:`discard_on_delete` says.
        """
        with self._changing("delete"):
            row = self._row(name, "delete")
            # An origin may go before its snapshots, as the kernel and LVM
            # allow: they share its blocks by reference count, and become
            # roots of the lineage (Store.drop_device).
            self._writable_status("delete")
            # Proven once, before anything changes: a device of its name
            # made by another is refused, never discarded or removed.
            live = self._live_or_gone(row, "delete")
            self._journal.retry_deferred_deletes()
            if discard is None:
                discard = self.discard_on_delete

            def take_down() -> None:
                if discard:
                    self._discard_device(row, live)
                if live is not None:
                    with contextlib.suppress(NoSuchDeviceError):
                        ops.remove(self.device_dm_name(name), deferred=self.deferred_removal)

            self._journal.delete(name, row.thin_id, row.active, take_down, self.deferred_deletion)
            if self.config.base_device == name:
                self._update_config(self.config.but(base_device=None))

    # -- settings -----------------------------------------------------------------------

    def configure(
        self,
        *,
        base_size: int | str | None = None,
        discard_on_delete: bool | None = None,
        deferred_removal: bool | None = None,
        deferred_deletion: bool | None = None,
        xfs_nospace_max_retries: int | None = None,
    ) -> None:
        """Change the pool's settings; ``None`` leaves one as it is.

        Args:
            base_size: :attr:`base_size`, for devices created from now on
                (bytes or a string such as ``"20G"``).
            discard_on_delete: :attr:`discard_on_delete`.
            deferred_removal: remove busy devices when their last user
                closes them (``dm.use_deferred_removal``).
            deferred_deletion: queue deletes that meet EBUSY
                (``dm.use_deferred_deletion``).
            xfs_nospace_max_retries: :attr:`xfs_nospace_max_retries`; -1
                for xfs's own default (retry forever).

        Raises:
            ValueError: a bad size.
        """
        changes: ConfigChanges = {}
        if base_size is not None:
            changes["base_size"] = parse_size(base_size, what="base_size")
        if discard_on_delete is not None:
            changes["discard_on_delete"] = bool(discard_on_delete)
        if deferred_removal is not None:
            changes["deferred_removal"] = bool(deferred_removal)
        if deferred_deletion is not None:
            changes["deferred_deletion"] = bool(deferred_deletion)
        if xfs_nospace_max_retries is not None:
            if int(xfs_nospace_max_retries) < -1:
                raise ValueError("xfs_nospace_max_retries must be -1 (forever) or more")
            changes["xfs_nospace_max_retries"] = int(xfs_nospace_max_retries)
        if changes:
            with self._changing("configure"):
                self._update_config(self.config.but(**changes))

    # -- handing the thin devices to another program -------------------------------------

    @property
    def handed_to(self) -> str | None:
        """The program this pool's thin devices were handed to (see
        :meth:`hand_over`), or ``None`` while they are libdm's."""
        return self.config.handed_to

    def hand_over(self, to: str = "docker") -> None:
        """Hand the pool's thin devices to another program, such as
        Docker's devicemapper driver (``dm.thinpooldev``), and keep
        managing the pool itself, as the guide has LVM do.

        From then on the thin ids, the devices on them and the pool's
        transaction id are that program's: libdm creates, deletes and
        activates none, and :meth:`open` brings the pool up (its files
        attached, its table loaded from the stored configuration, a growth
        a crash interrupted finished) without touching a thin device or
        checking the transaction id.  The pool still grows (:meth:`resize`,
        :meth:`extend`, the monitor service) and reports (:meth:`info`).
        A pool that libdm already holds devices in cannot be handed over;
        one that another program has used already can (opening it was
        refused because its transaction id moved: :meth:`load` it and
        hand it over).  Idempotent for the same program.

        Args:
            to: the program's name, as reports show it.

        Raises:
            HandedOverError: the pool was handed to another program already.
            StateError: libdm holds devices, changes in flight or deferred
                deletes in the pool (named).
            ValueError: a bad program name.
        """
        if not to or not all(c.isalnum() or c in "-_." for c in to) or not to.isascii():
            raise ValueError(f"program name {to!r}: use letters, digits, '-', '_' or '.'")
        with self._changing("hand_over"):
            if self.config.handed_to == to:
                return
            if self.config.handed_to is not None:
                raise HandedOverError(
                    f"pool {self.name!r} was handed to {self.config.handed_to} already",
                    "hand_over",
                    self.name,
                )
            held = [
                f"{what}: {', '.join(names)}"
                for what, names in (
                    ("devices", [record.name for record in self._store.devices()]),
                    ("changes in flight", [intent.name for intent in self._store.intents()]),
                    (
                        "deferred deletes",
                        [queued.name for queued in self._store.deferred_deletes()],
                    ),
                )
                if names
            ]
            if self._store.has_growth_intent():
                held.append("a growth in flight (open the pool to finish it)")
            if held:
                raise StateError(
                    f"pool {self.name!r} holds libdm's own {'; '.join(held)}; only a pool "
                    f"without them can be handed to {to}",
                    "hand_over",
                    self.name,
                )
            self._update_config(self.config.but(handed_to=to))

    def _refuse_if_handed_over(self, operation: str) -> None:
        if self.config.handed_to is not None:
            raise HandedOverError(
                f"the thin devices of pool {self.name!r} were handed to "
                f"{self.config.handed_to}; libdm manages only the pool itself (growth, "
                f"monitoring, reports)",
                operation,
                self.name,
            )

    # -- repair -------------------------------------------------------------------------

    def repair(
        self, *, partial: bool = False, spare: str | None = None, force: bool = False
    ) -> RepairResult:
        """Repair the pool's metadata, as ``lvconvert --repair`` does: take
        the pool down, let ``thin_repair`` write what it recovers into a
        spare, check that with ``thin_check``, compare what each device
        maps in the damaged copy and in the repaired one, and only if
        nothing was lost swap the repaired copy in (the damaged copy is
        kept) and bring the pool and its active devices back up.  See
        :mod:`libdm.thin.repair` for where the copies are kept.

        Args:
            partial: swap in a repaired copy that lost mappings or devices,
                or whose devices cannot be verified (a damaged superblock
                hides what they mapped before), all the same; devices it
                lacks are reported by :meth:`open` as unavailable, and can
                be deleted; the result names them.
            spare: a block pool only: the device to write the repaired copy
                to, when the pool records no spare and its devices have no
                free region as large as its metadata.  It becomes the
                pool's metadata device.
            force: use a ``spare`` that carries a signature.

        Returns:
            A :class:`~libdm.thin.repair.RepairResult`: per device, the
            blocks it mapped before and after, and where both copies are.

        Raises:
            MetadataLossError: a device lost mappings, is missing from the
                repaired copy, or cannot be verified (its ``result`` says
                which and how many); nothing was swapped in, both copies
                are kept and the pool stays down.
            ValueError: an adopted pool; a block pool without room for a
                spare and no ``spare`` given.
            DeviceBusyError: a device of the pool is open.
            PoolFailedError: thin_repair or thin_check failed; nothing was
                swapped in and the pool stays down.
        """
        from libdm.thin import repair

        with self._changing("repair"):
            result = repair.repair_pool(self, partial, spare, force)
            self._bring_up("repair")
            return result

    # -- giving space back ---------------------------------------------------------------

    @property
    def xfs_nospace_max_retries(self) -> int | None:
        """How often xfs on the pool's devices retries a metadata write
        that met ENOSPC, applied by :meth:`ThinDevice.mount` (Docker's
        ``dm.xfs_nospace_max_retries``); ``None`` leaves xfs's default."""
        value = self.config.xfs_nospace_max_retries
        return None if value is None or value == -1 else value

    @property
    def discard_on_delete(self) -> bool:
        """Discard a device's blocks before deleting it (Docker's
        ``dm.blkdiscard``), so that the pool passes the discards down and a
        loop pool's data file gets its space back as holes.  On by default
        for loop pools, off for the others (see :meth:`configure`)."""
        value = self.config.discard_on_delete
        return self._backing.capabilities.discard_by_default if value is None else value

    def _discard_blocks(
        self, row: DeviceRecord, start: Bytes, length: Bytes, live: ownership.Live | None
    ) -> None:
        """Discard ``length`` bytes at ``start`` of device ``row``, so the
        pool gets the blocks back, unless something holds it open (its
        user's data must not vanish under it) or the pool ignores
        discards.  ``live``: its device as the caller proved it
        (:meth:`_live_or_gone`); an inactive device is activated for it,
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
                self._thin_table(row, self._device.devno()),
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

    def _discard_device(self, row: DeviceRecord, live: ownership.Live | None) -> None:
        """Discard all of a device about to be deleted (see
        :meth:`_discard_blocks`); giving space back is a courtesy, so a
        failure is logged and the delete goes on (its data goes anyway)."""
        try:
            self._discard_blocks(row, Bytes(0), row.size.bytes(), live)
        except (DMError, OSError, ValueError) as exc:
            logger.warning(
                "pool %s: %s not discarded before its delete: %s",
                self.name,
                self.device_dm_name(row.name),
                exc,
            )

    def trim(self) -> Bytes:
        """Give back the space the filesystems on the pool's devices have
        freed (``fstrim`` on every mounted one, with the FITRIM ioctl): the
        thin devices unmap it, and the pool passes the discards down to its
        data device (a loop pool's file gets holes).

        Returns:
            ``Bytes`` the filesystems reported trimmed.

        Raises:
            OSError: a filesystem refused FITRIM.
        """
        from libdm.thin import fs

        total = 0
        for device in self.devices():
            point = fs.mount_point(device.path) if device.active else None
            if point is not None:
                total += int(fs.trim(point))
        return Bytes(total)

    # -- metadata snapshots ------------------------------------------------------------

    def reserve_metadata_snap(self) -> None:
        """Reserve a metadata snapshot, so ``thin_ls`` / ``thin_dump -m`` can
        read the live pool; release it with :meth:`release_metadata_snap`.

        Raises:
            DMError: one is reserved already (EINVAL), or the pool refuses.
            ForeignDeviceError: the device of the pool's name is not its own.
        """
        self._device.message("reserve_metadata_snap", "reserve_metadata_snap")

    def release_metadata_snap(self) -> None:
        """Release the reserved metadata snapshot.

        Raises:
            DMError: none is reserved (EINVAL).
            ForeignDeviceError: the device of the pool's name is not its own.
        """
        self._device.message("release_metadata_snap", "release_metadata_snap")

    @contextlib.contextmanager
    def metadata_snap(self) -> Iterator[Pool]:
        """``with pool.metadata_snap(): ...`` reserves a metadata snapshot
        for the block and always releases it."""
        self.reserve_metadata_snap()
        try:
            yield self
        finally:
            self.release_metadata_snap()

    # -- base device -------------------------------------------------------------------

    @property
    def base_size(self) -> Bytes:
        """The size of new devices created without one, in ``Bytes``
        (Docker's ``dm.basesize``; 10 GiB unless set by :meth:`configure`)."""
        size = self.config.base_size
        return Bytes(DEFAULT_BASE_SIZE) if size is None else size

    @property
    def base_device(self) -> ThinDevice | None:
        """The device set as base for layers (see :meth:`set_base_device`),
        or ``None``."""
        name = self.config.base_device
        row = None if name is None else self._store.device(name)
        return None if row is None else self._wrap(row)

    def set_base_device(self, name: str | None) -> None:
        """Mark device ``name`` as the pool's base device (shown in
        :meth:`info` as Base Device Size), or clear it with ``None``.

        Raises:
            NoSuchDeviceError: no such device.
        """
        with self._changing("set_base_device"):
            if name is not None:
                self._row(name, "set_base_device")
            self._update_config(self.config.but(base_device=name))

    # -- reporting and ending ----------------------------------------------------------

    def info(self) -> PoolInfo:
        """The pool report, with the fields of ``docker info``'s listing
        (see :class:`~libdm.thin.report.PoolInfo`)."""
        from libdm.thin.report import pool_info

        return pool_info(self)

    def close(self) -> None:
        """Release the state store and lock; the devices stay live."""
        if not self._lock.closed:
            self._store.close()
            self._lock.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def destroy(self, *, remove_files: bool = False, force: bool = False) -> None:
        """Remove every thin device, the pool device and what backs it.

        Thin devices are removed (waiting out short-lived openers), then
        the pool, then linear pieces; loop devices detach by themselves.
        With ``remove_files`` the pool's own files go too: the state store
        and lock, and a loop pool's data and metadata files (nothing else
        in the directory); the directory itself only if libdm made it
        (stores written before that was recorded keep it).  A pool
        destroyed without it can be brought back with :meth:`open`.  An
        adopted pool's device is left alone.

        A pool handed to another program (:meth:`hand_over`) holds that
        program's devices, which libdm cannot see: removing its files
        needs ``force``.

        Raises:
            DeviceBusyError: a thin device is still in use.
            HandedOverError: ``remove_files`` on a handed-over pool
                without ``force``.
            StateError: ``remove_files`` when a file in the place of a loop
                pool's data or metadata file is not the one the pool made
                (nothing is removed or taken down).
        """
        if remove_files and not force and self.config.handed_to is not None:
            raise HandedOverError(
                f"pool {self.name!r} holds the thin devices of {self.config.handed_to}, "
                f"which removing its files would destroy; remove them through "
                f"{self.config.handed_to} first, then destroy with force",
                "destroy",
                self.name,
            )
        statedir = self._store.statedir
        if remove_files:
            # Before anything goes down: a refusal leaves the pool as it was.
            self._backing.check_removable()
        with self._changing("destroy"):
            for name in self._live_devices(self._store.devices(), "destroy"):
                ops.remove(self.device_dm_name(name))
            if self._backing.capabilities.owns_devices:
                try:
                    if ownership.live_pool(self.name, self.uuid, self.directory, "destroy"):
                        ops.remove(self.name)
                except ForeignDeviceError as exc:
                    logger.warning("pool %s: %s", self.name, exc.strerror)
            self._device.forget()
            self._backing.teardown()
            if remove_files:
                self._backing.remove_files()
                self._store.close_db()
                for name in STORE_FILES:
                    statedir.unlink(name)
        if not remove_files:
            self.close()
            return
        statedir.unlink(LOCK_NAME)
        self._lock.close()
        statedir.close()
        if self.config.made_directory is True:
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)

    # -- growth (the growth part does it) ------------------------------------------------

    def resize(
        self,
        data_size: int | str | None = None,
        metadata_size: int | str | None = None,
        *,
        low_water_mark: int | None = None,
    ) -> PoolStatus:
        """Grow a loop pool's data and/or metadata online, like the guide's
        ``device_tool resize``.

        Args:
            data_size: the new data size, bytes or a string such as
                ``"200G"``; ``None`` leaves it.
            metadata_size: the new metadata size; ``None`` leaves it.
            low_water_mark: a new low water mark (data blocks) to load in
                the same reload as the data growth (the monitor's re-arm,
                without a second suspend); ``None`` leaves it.

        Returns:
            The pool's status after the resize.

        Raises:
            ValueError: a size below the current one (pools never shrink),
                a bad size, or a pool that is not on loop files (use
                :meth:`extend` or :meth:`refresh`).
            PoolFullError: the metadata is too small to map that much data
                (the message says how much metadata it takes; give
                ``metadata_size`` too, and the metadata grows first).
            PoolFailedError, PoolReadOnlyError: the pool failed or needs
                checking (``needs_check``); the kernel refuses to grow it.
            DMError: the kernel refused; the pool is back as it was.
        """
        return self._growth.resize(data_size, metadata_size, low_water_mark=low_water_mark)

    def refresh(self) -> PoolStatus:
        """Reload the pool so it uses all of its devices' current size (after
        they were grown outside libdm, e.g. an LVM volume extended).

        Returns:
            The pool's status after the reload.

        Raises:
            PoolFullError: the metadata cannot map the grown data.
            PoolFailedError, PoolReadOnlyError: as for :meth:`resize`.
        """
        return self._growth.refresh()

    def extend(
        self,
        device: str,
        *,
        metadata: bool = False,
        force: bool = False,
        start: int | str | None = None,
        length: int | str | None = None,
    ) -> PoolStatus:
        """Add a block device (or a region of one) to a block pool's data
        (or, with ``metadata=True``, its metadata), online: the libdm
        equivalent of the guide's ``vgextend`` + ``lvextend``.

        The new segment is appended to ``<pool>-tdata`` (``-tmeta``), so
        the pool keeps its devices while they grow; its position in the
        concatenation is sector math.  The device passes the same checks
        as at creation (not in use; no signature unless ``force``).  The
        new segment is recorded before the kernel sees it, so a crash
        midway is finished by :meth:`open`.

        A device the pool already sits on (a split device's headroom, see
        :meth:`free_regions`) can give its free part: by default the
        region starts after the last sector the pool uses there, and one
        that directly follows the side's last segment lengthens it.

        Args:
            device: the block device path.
            metadata: grow the metadata instead of the data.
            force: use a device that carries a signature.
            start: where the region starts on the device, bytes or a string
                (default 0, or the free tail of a device the pool uses).
            length: the region's length, bytes or a string (default: to the
                end of the device).

        Returns:
            The pool's status after the extension.

        Raises:
            ValueError: a loop or adopted pool (use :meth:`resize`), a
                region the pool uses already (named), a region that does not
                fit.
            DeviceNotBlankError, DeviceBusyError: as for :meth:`create`.
            PoolFailedError, PoolReadOnlyError: the pool cannot grow.
        """
        return self._growth.extend(
            device, metadata=metadata, force=force, start=start, length=length
        )

    def free_regions(self) -> list[Region]:
        """The free tails of the block devices the pool sits on: where
        :meth:`extend` (and the monitor) can grow without another device,
        such as what ``create_on_device(thinp_percent=...)`` left free.

        Returns:
            A list of ``(device path, start, length)``, in ``Sectors``,
            largest first; empty for loop and adopted pools.
        """
        return self._growth.free_regions()

    def set_low_water_mark(self, blocks: DataBlocks | int) -> None:
        """Set the pool's low water mark: when free data blocks fall below
        it the kernel raises one device-mapper event (see
        :func:`libdm.wait_event`).  Stored, and applied by a reload.

        Args:
            blocks: free data blocks (``DataBlocks`` or int), 0 for never.
        """
        self._growth.set_low_water_mark(blocks)

    def monitor(self, threshold: int = 80, percent: int = 20, **options: Any) -> Monitor:
        """An autoextend :class:`~libdm.thin.monitor.Monitor` for this pool
        (``dm.thinp_autoextend_threshold`` / ``_percent``): not running yet;
        call its ``run()``, ``start()``, or use it in a ``with`` block.

        Args:
            threshold: percent used at which to grow (default 80).
            percent: growth in percent of the current size (default 20).
            options: see :class:`~libdm.thin.monitor.Monitor`.
        """
        from libdm.thin.monitor import Monitor

        return Monitor(self, threshold, percent, **options)

    def data_size(self) -> Bytes:
        """The pool's data size in ``Bytes`` as the kernel sees it."""
        return Sectors(int(ops.table(self.name)[0].length)).bytes()

    def _data_sectors(self, config: PoolConfig) -> Sectors:
        """The data device's size under ``config``."""
        return self._growth.data_sectors(config)

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} ({self.kind}) at {self.directory}>"
