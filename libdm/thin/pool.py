"""The thin pool: reopening it, its devices, and its guards.

A :class:`Pool` is a state directory (SQLite store + lock file, and for
loop pools the data and metadata files) plus a live ``thin-pool``
device-mapper device.  It is composed of parts, each with its own
module: the store (:mod:`.store`), the lock (:mod:`.lock`), the live pool
device (:mod:`.pooldev`), the backing (:mod:`.backing`), the journal that
every change goes through (:mod:`.journal`), growth (:mod:`.growth`) and
the thin devices' verbs (:mod:`.devices`);
its configuration is a :class:`~libdm.thin.config.PoolConfig`, and its
constructors live in :mod:`.creation`.

Units: sizes are accepted as ``int`` bytes or strings such as ``"10G"``
and must be whole 512-byte sectors; tables are in sectors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self

from libdm.dm import ops
from libdm.dm.errors import (
    DMError,
    NoSuchDeviceError,
    RemedyCall,
)
from libdm.dm.info import DeviceInfo
from libdm.thin import backing as backings
from libdm.thin import creation, ownership
from libdm.thin.config import ConfigChanges, PoolConfig, PoolKind
from libdm.thin.core import PoolCore, Recovery
from libdm.thin.device import Snapshot, ThinDevice
from libdm.thin.devices import Devices
from libdm.thin.errors import (
    ChangedByAnotherError,
    ForeignDeviceError,
    HandedOverError,
    StateError,
)
from libdm.thin.growth import Growth, Region
from libdm.thin.lock import LOCK_NAME
from libdm.thin.pooldev import PoolStatus
from libdm.thin.records import DeviceRecord, Op
from libdm.thin.status import ThinPoolFailed
from libdm.thin.store import STORE_FILES, Store
from libdm.thin.units import Bytes, DataBlocks, Sectors, parse_size

if TYPE_CHECKING:
    from libdm.thin.monitor import Monitor
    from libdm.thin.repair import RepairResult
    from libdm.thin.report import PoolInfo


__all__ = ["Pool"]

logger = logging.getLogger("libdm")

_Args = ParamSpec("_Args")


def _constructor(make: Callable[Concatenate[Any, _Args], Any]) -> classmethod[Pool, _Args, Pool]:
    """One of :mod:`.creation`'s constructors as a class method of
    :class:`Pool`, typed as one (they make the core, then ``from_core``)."""
    return classmethod(make)


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
            could not be activated, name -> the error (the others are up):
            a :class:`ForeignDeviceError` (another has its name) or a
            :class:`ChangedByAnotherError` (another program changed its
            device; its data is fine), or the kernel's refusal (each is
            logged; deleting such a device gives its space back).
        config: its stored configuration, a ``PoolConfig`` (frozen; changed
            through :meth:`configure` and the growth methods).
    """

    unavailable: Mapping[str, DMError] = MappingProxyType({})

    # -- getting a pool --------------------------------------------------------

    create_loop = _constructor(creation.create_loop)
    create = _constructor(creation.create)
    create_on_device = _constructor(creation.create_on_device)
    adopt = _constructor(creation.adopt)

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        lock_timeout: float = 30.0,
        _store: Store | None = None,
        _core: PoolCore | None = None,
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
        if _core is None:
            _core = PoolCore(directory, lock_timeout=lock_timeout, store=_store)
        self._front(_core)

    @classmethod
    def from_core(cls, core: PoolCore) -> Self:
        """The pool whose core is ``core`` (the constructors in
        :mod:`libdm.thin.creation` make the core, then its front).  Made
        through ``__init__``, so that a subclass's own runs for a created
        pool too, as for an opened one."""
        return cls(core.directory, lock_timeout=core.lock_timeout, _core=core)

    def _front(self, core: PoolCore) -> None:
        self._core = core
        self._growth = Growth(core)
        #: What the last recovery under the lock settled, per thread (see
        #: settle): a service's threads share one Pool, and one thread's
        #: settle must not report what another's change settled.
        self._settled = threading.local()
        self._devices = Devices(core)
        core.lend(Recovery(settle=self._recover_interrupted, finish_growth=self._growth.finish))

    # -- what the core holds ----------------------------------------------------------

    @property
    def block_size(self) -> Sectors:
        """The data block size in ``Sectors``."""
        return self._core.block_size

    def status(self) -> PoolStatus:
        """The pool's status from the kernel (committing its metadata): a
        :class:`~libdm.thin.status.ThinPoolStatus`, or ``ThinPoolFailed``
        for ``Fail`` / ``Error``.

        Raises:
            NoSuchDeviceError: the pool device is not live.
        """
        return self._core.status()

    def device_dm_name(self, name: str) -> str:
        """The device-mapper name of thin device ``name``: ``<pool>-<name>``."""
        return self._core.device_dm_name(name)

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def uuid(self) -> str:
        return self._core.uuid

    @property
    def kind(self) -> PoolKind:
        return self._core.kind

    @property
    def config(self) -> PoolConfig:
        return self._core.config

    @property
    def directory(self) -> str:
        return self._core.directory

    @property
    def lock_timeout(self) -> float:
        return self._core.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        # Settable, as when it was a plain attribute: the next change waits so long.
        self._core.lock_timeout = seconds

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
            with pool._core.changing("open"):
                was_there = ops.exists(pool.name)
                pieces_there = pool._pieces_live()
                try:
                    pool._bring_up("open", progress, lazy=lazy, mark_lazy=lazy or not was_there)
                    if not lazy:
                        pool._core.set_lazy(False)
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
        return any(ops.exists(name) for name in self._core.backing.piece_names())

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
                    for row in self._core.store.devices()
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
                if self._core.made_here(dm_name, uuid):
                    ops.remove(dm_name)
            owned = self._core.backing.capabilities.owns_devices
            if owned and self._core.made_here(self.name, self.uuid):
                ops.remove(self.name)
            self._core.device.forget()
            if owned and not keep_pieces:
                self._core.backing.teardown()
        except (DMError, OSError) as exc:
            logger.error(
                "pool %s: refused at %s, and taking it down again failed: %s",
                self.name,
                operation,
                exc,
            )

    # -- locking -------------------------------------------------------------------

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
        if self._core.interrupted() is None:
            return None
        # Read again under the lock (by the recovery the change runs): what
        # was read before it may be another process's change, done since.
        self._settled.what = None
        with self._core.changing("settle"):
            what: str | None = self._settled.what
            return what

    def _recover_interrupted(self, operation: str) -> None:
        """Before a change: finish or undo what an interrupted one left, as
        :meth:`open` does (the one recovery path, :meth:`_bring_up`), so
        that every entry point (a Pool however obtained, the CLI, the
        monitor, the snapshotter) meets a settled pool.  A pool that is not
        live is refused instead, saying what to run: bringing it up is
        :meth:`open`'s job."""
        what = self._core.interrupted()
        if what is None:
            return
        self._settled.what = what
        if not backings.exists_live(self.name):
            raise StateError(
                f"pool {self.name!r} is not active and holds a change a crash "
                f"interrupted ({what})",
                operation,
                self.name,
            ).advise(RemedyCall("open", "finishes it", self.directory))
        logger.warning(
            "pool %s: finishing a change that was interrupted (%s) before %s",
            self.name,
            what,
            operation,
        )
        # A pool that failed or is read-only keeps its intents: the journal
        # then refuses changes of thin ids, saying so.  A lazy pool stays
        # lazy: only open brings every recorded-active device up.
        self._bring_up(operation, lazy=self._core.store.lazy())

    # -- the pool device -----------------------------------------------------------

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
            row = self._core.store.device(entry.name[len(prefix) :])
            if row is None:
                continue
            try:
                live = self._core.live_or_gone(row, operation)
            except ForeignDeviceError as exc:
                if not row.active:  # an active one is reported by its activation
                    logger.warning("pool %s: %s", self.name, exc.strerror)
                continue
            if live is None:
                continue
            if not row.active and live.info.deferred_remove:
                # A deactivation that was done: its removal waits for the
                # device's last user, as recorded.
                continue
            present[row.name] = live
            if not row.active:
                with self._core.store.transaction():
                    self._core.store.set_active(row.name, True)
        return present

    def _bring_up(
        self,
        operation: str,
        progress: Callable[[int, int], None] | None = None,
        *,
        lazy: bool = False,
        mark_lazy: bool = False,
    ) -> None:
        if self.config.repair is not None:
            from libdm.thin import repair

            repair.finish_swap(self._core)

        def up() -> PoolStatus:
            self._core.activate_pool(operation)
            return self.status()

        # The origins a killed snapshot may have left suspended: the only
        # thin devices libdm suspends, each under its snapshot's intent.
        snapped = {
            intent.parent
            for intent in self._core.store.intents()
            if intent.op is Op.CREATE_SNAP and intent.parent is not None
        }
        # The one place a pool is reconciled with its journal.
        handed = self.config.handed_to is not None
        st = self._core.journal.recover(operation, up, thin_ids=not handed)
        if isinstance(st, ThinPoolFailed) or handed:
            # Nothing to activate: a failed pool's changes are refused with
            # the reason; a handed-over pool's thin devices are its user's.
            return
        present = self._adopt_live_devices(operation)
        resized = self._core.store.resize_intent() is not None
        if resized:
            self._discard_cut_off(present, operation)
        unavailable: dict[str, DMError] = {}
        self.unavailable = unavailable
        rows = self._core.store.active_devices()
        if mark_lazy:
            # Until the eager bring-up of a pool that was down has finished,
            # the pool is lazy: a kill leaves devices recorded active but
            # down, and the recovery a later change runs must not bring
            # thousands up under it (they come up on first use, or with the
            # next open).  Written only now, once the pool is up and proven:
            # an open refused before changes nothing.
            self._core.set_lazy(True)
        if lazy:
            # Only the live ones, so that each has its recorded table; the
            # others come up on first use (ready_device).
            rows = [row for row in rows if row.name in present]
        for done, row in enumerate(rows, 1):
            if progress is not None:
                progress(done, len(rows))
            try:
                live = present.get(row.name)
                self._core.activate(
                    row, operation, absent=live is None, live=live, resume=row.name in snapped
                )
            except (ForeignDeviceError, ChangedByAnotherError) as exc:
                # Its name is another's (it must come free), or another
                # program changed its device: its data is fine, nothing is
                # done to it, and deleting it is no remedy.
                unavailable[row.name] = exc
                logger.error(
                    "pool %s: device %s (thin id %s) could not be activated: %s",
                    self.name,
                    row.name,
                    row.thin_id,
                    exc,
                )
            except (DMError, ValueError) as exc:
                # One device the kernel refuses must not keep the others down.
                unavailable[row.name] = (
                    exc if isinstance(exc, DMError) else StateError(str(exc), operation, row.name)
                )
                logger.error(
                    "pool %s: device %s (thin id %s) could not be activated: %s; it stays "
                    "recorded, and deleting it gives its space back",
                    self.name,
                    row.name,
                    row.thin_id,
                    exc,
                )
        if resized:
            # Every live device now has its recorded table (activate
            # reloads one a killed resize left at its old length).
            self._core.drop_resize_intent()
        if self._core.store.activation_intent() is not None:
            # Every device is now live exactly when its record says so.
            self._core.drop_activation_intent()

    def _discard_cut_off(self, present: Mapping[str, ownership.Live], operation: str) -> None:
        """A shrink interrupted after its record: give back the blocks past
        the new end, as the shrink would have (before the reload, while a
        live device still reaches them; not if something has it open).
        Done again after a kill later in the shrink: a discard is
        idempotent.  A failure is logged: only space is at stake."""
        name, old = self._core.store.resize_intent(), self._core.store.resize_from()
        row = None if name is None else self._core.store.device(name)
        if row is None or old is None or old <= row.size:
            return
        try:
            self._core.discard_blocks(
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

    # -- devices ----------------------------------------------------------------------

    def _wrap(self, row: DeviceRecord) -> ThinDevice:
        return (Snapshot if row.parent is not None else ThinDevice)(self, row)

    def device(self, name: str) -> ThinDevice:
        """The thin device or snapshot called ``name``.

        Raises:
            NoSuchDeviceError: the pool has no such device.
        """
        return self._wrap(self._devices.record(name, "device"))

    def devices(self) -> list[ThinDevice]:
        """Every thin device and snapshot, sorted by name, as the pool's next
        change leaves them: not one whose delete was interrupted (that
        change finishes it), and one whose create was interrupted after the
        kernel made it (that change records it)."""
        return [self._wrap(row) for row in self._devices.listed()]

    def children(self, name: str) -> list[ThinDevice]:
        """The snapshots taken of device ``name`` (listed as by
        :meth:`devices`)."""
        return [self._wrap(row) for row in self._devices.children(name)]

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
            with self._core.changing("configure"):
                self._core.update_config(self.config.but(**changes))

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
        with self._core.changing("hand_over"):
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
                    ("devices", [record.name for record in self._core.store.devices()]),
                    ("changes in flight", [intent.name for intent in self._core.store.intents()]),
                    (
                        "deferred deletes",
                        [queued.name for queued in self._core.store.deferred_deletes()],
                    ),
                )
                if names
            ]
            if self._core.store.has_growth_intent():
                held.append("a growth in flight (open the pool to finish it)")
            if held:
                raise StateError(
                    f"pool {self.name!r} holds libdm's own {'; '.join(held)}; only a pool "
                    f"without them can be handed to {to}",
                    "hand_over",
                    self.name,
                )
            self._core.update_config(self.config.but(handed_to=to))

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
        return self._wrap(self._devices.create_thin(name, size))

    def snapshot_device(self, origin: str, name: str) -> ThinDevice:
        """Snapshot device ``origin`` as ``name`` (see :meth:`ThinDevice.snapshot`)."""
        return self._wrap(self._devices.snapshot(origin, name))

    def activate_device(self, name: str) -> None:
        """Activate device ``name`` (see :meth:`ThinDevice.activate`)."""
        self._devices.activate(name)

    def ready_device(self, name: str, operation: str = "use") -> str:
        """The path of device ``name``, live: a device recorded active
        whose device is not live (as :meth:`open` with ``lazy=True`` leaves
        them) is activated first.

        Raises:
            NoSuchDeviceError: the pool has no such device, or it is not
                active.
            ForeignDeviceError: the device of its name is not the pool's.
        """
        return self._devices.ready(name, operation)

    def live_device(self, name: str) -> DeviceInfo | None:
        """The info of device ``name``'s live device-mapper device, once
        proven to be this pool's own (its uuid and table), or ``None`` when
        none is live.

        Raises:
            NoSuchDeviceError: the pool has no such device.
            ForeignDeviceError: a device-mapper device of its name that
                this pool did not make (named, with its owner).
        """
        return self._devices.live_info(name)

    def resize_device(
        self, name: str, size: int | str, *, force: bool = False, grow_filesystem: bool = False
    ) -> ThinDevice:
        """Resize device ``name`` (see :meth:`ThinDevice.resize`)."""
        return self._wrap(
            self._devices.resize(name, size, force=force, grow_filesystem=grow_filesystem)
        )

    def deactivate_device(self, name: str) -> None:
        """Deactivate device ``name`` (see :meth:`ThinDevice.deactivate`)."""
        self._devices.deactivate(name)

    def delete_device(self, name: str, *, discard: bool | None = None) -> None:
        """Delete device ``name`` (see :meth:`ThinDevice.delete`).

        Args:
            discard: discard its blocks first; ``None`` (the default) as
                :attr:`discard_on_delete` says.
        """
        self._devices.delete(name, discard=discard)

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

        with self._core.changing("repair"):
            result = repair.repair_pool(self._core, partial, spare, force)
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
        return self._devices.discard_on_delete()

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
        self._core.device.message("reserve_metadata_snap", "reserve_metadata_snap")

    def release_metadata_snap(self) -> None:
        """Release the reserved metadata snapshot.

        Raises:
            DMError: none is reserved (EINVAL).
            ForeignDeviceError: the device of the pool's name is not its own.
        """
        self._core.device.message("release_metadata_snap", "release_metadata_snap")

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
        return self._devices.base_size()

    @property
    def base_device(self) -> ThinDevice | None:
        """The device set as base for layers (see :meth:`set_base_device`),
        or ``None``."""
        name = self.config.base_device
        row = None if name is None else self._core.store.device(name)
        return None if row is None else self._wrap(row)

    def set_base_device(self, name: str | None) -> None:
        """Mark device ``name`` as the pool's base device (shown in
        :meth:`info` as Base Device Size), or clear it with ``None``.

        Raises:
            NoSuchDeviceError: no such device.
        """
        with self._core.changing("set_base_device"):
            if name is not None:
                self._devices.record(name, "set_base_device")
            self._core.update_config(self.config.but(base_device=name))

    # -- reporting and ending ----------------------------------------------------------

    def info(self) -> PoolInfo:
        """The pool report, with the fields of ``docker info``'s listing
        (see :class:`~libdm.thin.report.PoolInfo`)."""
        from libdm.thin.report import pool_info

        return pool_info(self._core, self.base_device, self.base_size)

    def close(self) -> None:
        """Release the state store and lock; the devices stay live."""
        self._core.close()

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
        statedir = self._core.store.statedir
        if remove_files:
            # Before anything goes down: a refusal leaves the pool as it was.
            self._core.backing.check_removable()
        with self._core.changing("destroy"):
            # A create killed after its activation made a device its record
            # does not name yet: it goes too (the intent stays, and open
            # records it again), or it would hold the pool busy for good.
            rows = self._core.store.devices() + self._devices.pending()[1]
            for name in self._core.live_devices(rows, "destroy"):
                ops.remove(self.device_dm_name(name))
            if self._core.backing.capabilities.owns_devices:
                try:
                    if ownership.live_pool(self.name, self.uuid, self.directory, "destroy"):
                        ops.remove(self.name)
                except ForeignDeviceError as exc:
                    logger.warning("pool %s: %s", self.name, exc.strerror)
            self._core.device.forget()
            self._core.backing.teardown()
            if remove_files:
                self._core.backing.remove_files()
                self._core.store.close_db()
                for name in STORE_FILES:
                    statedir.unlink(name)
        if not remove_files:
            self.close()
            return
        statedir.unlink(LOCK_NAME)
        self._core.lock.close()
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

    def monitor(self, threshold: int = 80, percent: int = 20, **options: Any) -> Monitor[Pool]:
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

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} ({self.kind}) at {self.directory}>"
