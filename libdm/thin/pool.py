"""The thin pool: creation, reopening, and every change to its devices.

A :class:`Pool` is a state directory (SQLite store + lock file, and for
loop pools the data and metadata files) plus a live ``thin-pool``
device-mapper device.  Every change follows the same journal:

1. under an exclusive lock on the state directory, an *intent* naming the
   change and its new transaction id is committed to the store;
2. the kernel is sent the message (``create_thin``, ``create_snap`` or
   ``delete``), then ``set_transaction_id <old> <new>``, and the pool's
   metadata is committed (a status read without no-flush);
3. the outcome is recorded and the intent dropped in one store
   transaction.

So after a crash at any point, comparing the kernel's transaction id with
the store's tells ``Pool.open`` whether the change reached the kernel
(roll the store forward) or not (roll the kernel back: delete the thin id
it may hold), and no thin id leaks.

Units: sizes are accepted as ``int`` bytes or strings such as ``"10G"``
and must be whole 512-byte sectors; tables are in sectors.
"""

import contextlib
import errno
import fcntl
import os
import shutil
import subprocess
import threading
import time
import uuid as uuidlib

from libdm.dm import ops
from libdm.dm.blockdev import check_unused, open_block_device, signatures
from libdm.dm.errors import DeviceBusyError, DeviceExistsError, DMError, error_for
from libdm.dm.target import Target
from libdm.dm.validate import check_name
from libdm.thin import backing as backings
from libdm.thin import crash
from libdm.thin.device import Snapshot, ThinDevice
from libdm.thin.errors import (
    REPAIR_HINT,
    DeviceNotBlankError,
    PoolFailedError,
    PoolFullError,
    PoolLockedError,
    PoolReadOnlyError,
    StateError,
)
from libdm.thin.status import parse_pool_status
from libdm.thin.store import DB_NAME, Store
from libdm.thin.table import FEATURES, MAX_THIN_ID, ThinParams, ThinPoolParams, check_block_size
from libdm.thin.units import Bytes, DataBlocks, Sectors, parse_size

__all__ = ["Pool"]

LOCK_NAME = "lock"
DEFAULT_BLOCK_SIZE = "64K"
DEFAULT_MIN_FREE_SPACE = 10


def _thin_check_failure(meta_path):
    """Run thin_check on an inactive pool's metadata; return its complaint
    or ``None``.  Skipped (``None``) where thin-provisioning-tools is not
    installed, and for metadata never written (all zeros: a pool whose
    creation stopped before the kernel formatted it)."""
    tool = shutil.which("thin_check")
    if tool is None:
        return None
    fd = os.open(meta_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not any(os.pread(fd, 4096, 0)):
            return None
    finally:
        os.close(fd)
    proc = subprocess.run([tool, "-q", meta_path], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"


class Pool:
    """A thin pool and its thin devices.

    Get one with :meth:`create_loop`, :meth:`create`,
    :meth:`create_on_device`, :meth:`adopt` or :meth:`open`.  A ``Pool``
    can be shared by threads; several processes may open the same pool,
    and their changes are serialised by an exclusive lock on the state
    directory (a change waits up to ``lock_timeout`` seconds for it, then
    raises :class:`~libdm.PoolLockedError`).

    Attributes:
        name: the pool's device-mapper name.
        directory: its state directory.
        kind: ``"loop"``, ``"block"``, ``"split"`` or ``"adopted"``.
    """

    # -- getting a pool --------------------------------------------------------

    def __init__(self, directory, *, lock_timeout=30.0, _store=None):
        self.directory = os.path.abspath(directory)
        self.lock_timeout = lock_timeout
        self._store = _store if _store is not None else Store(self.directory)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._lock_fd = os.open(os.path.join(self.directory, LOCK_NAME),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._load()

    def _load(self):
        row = self._store.pool()
        self.name = row["name"]
        self.uuid = row["uuid"]
        self.kind = row["kind"]
        self._config = row["config"]
        self._backing = backings.from_config(self.kind, self.directory, self.name, self._config)

    @classmethod
    def create_loop(cls, name, directory, data_size="100G", metadata_size=None,
                    block_size=DEFAULT_BLOCK_SIZE, **options):
        """Create a pool on sparse files in ``directory`` (loop mode).

        The files ``data`` and ``metadata`` are created sparse, attached to
        loop devices with the loop ioctls, and the first 4 KiB of metadata
        is zeroed.  ``directory`` becomes the pool's state directory.

        Args:
            name: the pool's device-mapper name.
            directory: created if missing; must not hold a pool already.
            data_size: bytes or a string such as ``"10G"``.
            metadata_size: bytes or a string; by default 48 bytes per data
                block, at least 2 MiB, at most 16 GiB.
            block_size: the data block size, bytes or a string (64 KiB to
                1 GiB, a multiple of 64 KiB); fixed for the pool's life.
            options: keyword options, see :meth:`create` (``low_water_mark``,
                ``features``, ``min_free_space``, ``deferred_removal``,
                ``deferred_deletion``, ``lock_timeout``).

        Returns:
            The new, active :class:`Pool`.

        Raises:
            ValueError: a bad name, size or option.
            DeviceExistsError: a device of that name exists, or the
                directory holds a pool already.
            DMError: the kernel refused; nothing is left behind.
        """
        check_name(name)
        bs = check_block_size(parse_size(block_size, what="block_size").sectors())
        data = parse_size(data_size, what="data_size")
        if data < bs.bytes():
            raise ValueError(f"data_size {data_size!r} is smaller than one data block")
        meta = (backings.default_metadata_size(data, bs) if metadata_size is None
                else parse_size(metadata_size, what="metadata_size"))
        if meta < Bytes(2 << 20):
            raise ValueError(f"metadata_size {metadata_size!r} is below the 2 MiB minimum")
        directory = os.path.abspath(directory)
        cls._refuse_existing(name, directory)
        backing = backings.LoopBacking(directory)
        config = {"data_size": int(data), "metadata_size": int(meta)}

        def make():
            backing.make(data, meta)

        return cls._create(name, directory, backing, bs, config, options, make,
                           cleanup=backing.remove_files)

    @classmethod
    def create(cls, name, data_device, metadata_device, *, state_dir,
               block_size=DEFAULT_BLOCK_SIZE, force=False, **options):
        """Create a pool on two block devices (direct mode).

        Both devices are checked first: each must be a block device that is
        not in use, and without ``force`` must carry no filesystem,
        partition table, LVM, LUKS or thin-pool signature.  The first 4 KiB
        of the metadata device is zeroed.

        Args:
            name: the pool's device-mapper name.
            data_device, metadata_device: block device paths.
            state_dir: the pool's state directory (created; must not hold a
                pool already).
            block_size: data block size, bytes or a string (64K..1G).
            force: use devices that carry signatures (their data is lost).
            low_water_mark: free data blocks below which the pool raises
                an event (default 0: never).
            features: thin-pool feature args, a subset of
                ``skip_block_zeroing``, ``ignore_discard``,
                ``no_discard_passdown``, ``read_only``, ``error_if_no_space``.
            min_free_space: percent of data and metadata that must stay
                free for new devices and snapshots (default 10, as
                ``dm.min_free_space``).
            deferred_removal: remove busy devices when their last user
                closes them (default True).
            deferred_deletion: queue deletes that meet EBUSY and retry them
                later (default True).
            lock_timeout: seconds a change waits for another process.

        Returns:
            The new, active :class:`Pool`.

        Raises:
            ValueError: a path that is not a block device, a bad option.
            DeviceNotBlankError: a device carries a signature (named) and
                ``force`` is False.
            DeviceBusyError: a device is in use.
            DeviceExistsError: the name or the state directory is taken.
        """
        check_name(name)
        bs = check_block_size(parse_size(block_size, what="block_size").sectors())
        state_dir = os.path.abspath(state_dir)
        cls._refuse_existing(name, state_dir)
        if os.path.realpath(data_device) == os.path.realpath(metadata_device):
            raise ValueError("data_device and metadata_device must be different devices")
        for path in (metadata_device, data_device):
            cls._check_device(path, force, "create")
        backing = backings.BlockBacking(data_device, metadata_device)

        def make():
            _zero_head(metadata_device)

        return cls._create(name, state_dir, backing, bs, {}, options, make)

    @classmethod
    def create_on_device(cls, name, device, thinp_percent=95, thinp_metapercent=1,
                         force=False, *, state_dir, block_size=DEFAULT_BLOCK_SIZE, **options):
        """Create a pool on one raw block device, split into metadata and data
        by two linear devices, ``<name>-tmeta`` and ``<name>-tdata``.

        Metadata takes ``thinp_metapercent`` percent of the device (at
        least 2 MiB) from its start; data follows, aligned to a data block,
        and takes ``thinp_percent`` percent rounded down to whole blocks.
        The rest is left free for growing later.

        Args:
            name: the pool's device-mapper name.
            device: the block device path.
            thinp_percent: percent of the device for data (as the guide's
                ``dm.thinp_percent``).
            thinp_metapercent: percent for metadata (``dm.thinp_metapercent``).
            force: use a device that carries a signature.
            state_dir, block_size: as for :meth:`create`; so are the other
                keyword options.

        Returns:
            The new, active :class:`Pool`.

        Raises:
            As :meth:`create`; ValueError also for percentages that do not
            fit or a device too small.
        """
        check_name(name)
        bs = check_block_size(parse_size(block_size, what="block_size").sectors())
        state_dir = os.path.abspath(state_dir)
        cls._refuse_existing(name, state_dir)
        for piece in (f"{name}-tmeta", f"{name}-tdata"):
            check_name(piece)
            if ops.exists(piece):
                raise error_for(errno.EEXIST, "create_on_device", piece,
                                message=f"a device named {piece!r} exists already")
        dev = cls._check_device(device, force, "create_on_device")
        layout = backings.split_layout(Bytes(dev.size).sectors(), bs, thinp_percent,
                                       thinp_metapercent)
        backing = backings.SplitBacking(name, device, layout)

        def make():
            _zero_head(device, offset=int(layout[0].bytes()))

        return cls._create(name, state_dir, backing, bs, {}, options, make,
                           cleanup=backing.teardown)

    @classmethod
    def adopt(cls, pool_device_name, *, state_dir, **options):
        """Take over an existing, unused thin-pool device (``dm.thinpooldev``).

        As Docker required, the pool must be unused: transaction id 0 and
        no data blocks used.  Its table (block size, low water mark,
        features) is read from the kernel; libdm does not own its devices,
        so :meth:`destroy` never removes them and :meth:`open` needs the
        pool device to be live.

        Args:
            pool_device_name: the thin-pool device-mapper device's name.
            state_dir: where to keep libdm's state for it.
            options: keyword options ``min_free_space``, ``deferred_removal``,
                ``deferred_deletion``, ``lock_timeout``.

        Returns:
            The adopted :class:`Pool`.

        Raises:
            NoSuchDeviceError: no such device.
            ValueError: it is not a thin-pool device.
            PoolError: it is in use (transaction id or data in use), failed
                or read-only.
        """
        check_name(pool_device_name)
        state_dir = os.path.abspath(state_dir)
        if os.path.exists(os.path.join(state_dir, DB_NAME)):
            raise error_for(errno.EEXIST, "adopt", pool_device_name,
                            message=f"{state_dir} holds a pool already")
        table = ops.table(pool_device_name)
        if len(table) != 1 or table[0].type != "thin-pool":
            raise ValueError(f"{pool_device_name} is not a thin-pool device "
                             f"(its table is {', '.join(str(t) for t in table) or 'empty'})")
        params = ThinPoolParams.parse(table[0].params)
        st = parse_pool_status(ops.status(pool_device_name)[0].params)
        if st.failed:
            raise PoolFailedError(f"pool {pool_device_name} has failed ({st}); {REPAIR_HINT}",
                                  "adopt", pool_device_name)
        if st.transaction_id != 0 or st.used_data != 0:
            raise StateError(
                f"pool {pool_device_name} is in use (transaction id {st.transaction_id}, "
                f"{int(st.used_data)} data blocks used); libdm adopts only unused pools, "
                f"so that it never disturbs another owner's transactions",
                "adopt", pool_device_name,
            )
        uuid = ops.info(pool_device_name).uuid or ""
        options = dict(options)
        options.setdefault("low_water_mark", int(params.low_water_mark))
        options.setdefault("features", sorted(params.features))
        return cls._create(pool_device_name, state_dir, backings.AdoptedBacking(),
                           params.block_size, {}, options, make=None, uuid=uuid)

    @classmethod
    def open(cls, directory, *, lock_timeout=30.0):
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
                pool._bring_up("open")
        except BaseException:
            pool.close()
            raise
        return pool

    # -- creation helpers --------------------------------------------------------

    @staticmethod
    def _refuse_existing(name, directory):
        if os.path.exists(os.path.join(directory, DB_NAME)):
            raise DeviceExistsError(errno.EEXIST, f"{directory} holds a pool already",
                                    "create", name)
        if ops.exists(name):
            raise DeviceExistsError(errno.EEXIST, f"a device named {name!r} exists already",
                                    "create", name)

    @staticmethod
    def _check_device(path, force, operation):
        try:
            dev = open_block_device(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such block device", path) from None
        check_unused(path)
        found = signatures(path)
        if found and not force:
            raise DeviceNotBlankError(
                f"{path} holds {' and '.join(found)}; pass force=True to use it anyway "
                f"(its contents will be lost)",
                operation, path,
            )
        return dev

    @classmethod
    def _create(cls, name, directory, backing, block_size, config, options, make,
                cleanup=None, uuid=None):
        options = dict(options)
        lock_timeout = options.pop("lock_timeout", 30.0)
        features = sorted(set(options.pop("features", ())))
        unknown = sorted(set(features) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown thin-pool feature {', '.join(unknown)}; "
                             f"known: {', '.join(FEATURES)}")
        lwm = int(options.pop("low_water_mark", 0))
        min_free = options.pop("min_free_space", DEFAULT_MIN_FREE_SPACE)
        if not 0 <= min_free < 100:
            raise ValueError(f"min_free_space must be a percentage from 0 to 99, got {min_free}")
        config = dict(config)
        config.update(
            block_size=int(block_size),
            low_water_mark=lwm,
            features=features,
            min_free_space=min_free,
            deferred_removal=bool(options.pop("deferred_removal", True)),
            deferred_deletion=bool(options.pop("deferred_deletion", True)),
            base_device=None,
            token=uuidlib.uuid4().hex,  # names this pool's thin devices' uuids
        )
        config.update(backing.config())
        if options:
            raise TypeError(f"unknown option {', '.join(sorted(options))}")
        made_dir = not os.path.isdir(directory)
        store = Store(directory, create=True)
        pool = None
        try:
            if make is not None:
                make()
            # The pool row goes in before the device exists: a crash from
            # here on leaves a pool that Pool.open finishes bringing up.
            store.init_pool(name, uuid if uuid is not None else
                            f"LIBDM-POOL-{uuidlib.uuid4().hex}", backing.kind, config)
            pool = cls(directory, lock_timeout=lock_timeout, _store=store)
            with pool._changing("create"):
                if backing.kind != "adopted":
                    pool._activate_pool("create")
                crash.point("pool:created")
                st = pool.status()
                if not st.failed:
                    with store.transaction():
                        store.set_transaction_id(st.transaction_id)
            return pool
        except BaseException:
            if pool is not None and backing.kind != "adopted" and ops.exists(name):
                ops.remove(name)
            if cleanup is not None:
                cleanup()
            store.close()
            for leftover in os.listdir(directory):
                if leftover.startswith(DB_NAME) or leftover == LOCK_NAME:
                    os.unlink(os.path.join(directory, leftover))
            if made_dir and not os.listdir(directory):
                os.rmdir(directory)
            if pool is not None:
                os.close(pool._lock_fd)
            raise

    # -- locking -------------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self, operation):
        """Hold the pool for a change: this process's threads and other
        processes wait (up to ``lock_timeout``)."""
        with self._thread_lock:
            if self._depth == 0:
                self._acquire(operation)
                try:
                    self._load()  # another process may have changed the state
                except BaseException:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    raise
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _acquire(self, operation):
        if self._lock_fd < 0:
            raise ValueError(f"pool {self.name!r} is closed")
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PoolLockedError(
                        f"another process has been changing pool {self.name!r} for more "
                        f"than {self.lock_timeout} s (lock {self.directory}/{LOCK_NAME})",
                        operation, self.name,
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    # -- the pool device -----------------------------------------------------------

    @property
    def block_size(self):
        """The data block size in ``Sectors``."""
        return Sectors(self._config["block_size"])

    @property
    def min_free_space(self):
        """Percent of data and metadata kept free (``dm.min_free_space``)."""
        return self._config["min_free_space"]

    @property
    def deferred_removal(self):
        return self._config["deferred_removal"]

    @property
    def deferred_deletion(self):
        return self._config["deferred_deletion"]

    @property
    def path(self):
        """The pool device's path, ``/dev/mapper/<name>``."""
        return ops.device_path(self.name)

    def _devno(self):
        info = ops.info(self.name)
        return f"{info.major}:{info.minor}"

    def _expected_params(self, devs):
        return ThinPoolParams(devs.meta.devno, devs.data.devno, self.block_size,
                              DataBlocks(self._config["low_water_mark"]),
                              frozenset(self._config["features"]))

    def _table_for(self, devs):
        length = Sectors(devs.data.size // 512).data_blocks(self.block_size).sectors(self.block_size)
        if length == 0:
            raise ValueError(f"the data device of pool {self.name!r} is smaller than one data block")
        return [Target(0, int(length), "thin-pool", str(self._expected_params(devs)))]

    def _activate_pool(self, operation):
        """Make the pool device live, or check the live one against the store."""
        if ops.exists(self.name):
            self._verify_live_pool(operation)
            return
        if self.kind == "adopted":
            raise StateError(
                f"adopted pool {self.name!r} is not live; libdm does not own its devices, "
                f"so whoever made it must activate it", operation, self.name)
        with self._backing.attach() as devs:
            if operation == "open":
                complaint = _thin_check_failure(devs.meta.path)
                if complaint is not None:
                    raise PoolFailedError(
                        f"thin_check found damaged metadata on {devs.meta.path}: {complaint}; "
                        f"repair it with thin_repair before opening the pool", operation, self.name)
            ops.create(self.name, self._table_for(devs), uuid=self.uuid)

    def _verify_live_pool(self, operation):
        live = ops.table(self.name)
        if len(live) != 1 or live[0].type != "thin-pool":
            raise StateError(f"device {self.name!r} is not a thin pool (table: "
                             f"{'; '.join(map(str, live)) or 'none'})", operation, self.name)
        got = ThinPoolParams.parse(live[0].params)
        diffs = []
        if got.block_size != self.block_size:
            diffs.append(f"block size {int(got.block_size)} sectors, stored {int(self.block_size)}")
        if sorted(got.features) != sorted(self._config["features"]):
            diffs.append(f"features {sorted(got.features)}, stored {self._config['features']}")
        if int(got.low_water_mark) != self._config["low_water_mark"]:
            diffs.append(f"low water mark {int(got.low_water_mark)}, "
                         f"stored {self._config['low_water_mark']}")
        if self.kind != "adopted":
            with self._backing.attach() as devs:
                for what, have, want in (("metadata device", got.metadata_dev, devs.meta.devno),
                                         ("data device", got.data_dev, devs.data.devno)):
                    if have != want:
                        diffs.append(f"{what} {have}, expected {want}")
        if diffs:
            raise StateError(f"the live table of pool {self.name!r} differs from its stored "
                             f"configuration: {'; '.join(diffs)}", operation, self.name)

    def status(self):
        """The pool's status from the kernel (committing its metadata): a
        :class:`~libdm.thin.status.ThinPoolStatus`, or ``ThinPoolFailed``
        for ``Fail`` / ``Error``.

        Raises:
            NoSuchDeviceError: the pool device is not live.
        """
        return parse_pool_status(ops.status(self.name)[0].params)

    def _writable_status(self, operation):
        st = self.status()
        if st.failed:
            raise PoolFailedError(f"pool {self.name!r} has failed (the kernel reports "
                                  f"{st.state}); {REPAIR_HINT}", operation, self.name)
        if st.needs_check:
            raise PoolReadOnlyError(f"pool {self.name!r} needs its metadata checked "
                                    f"(needs_check); {REPAIR_HINT}", operation, self.name)
        if st.mode == "ro":
            raise PoolReadOnlyError(f"pool {self.name!r} is read-only (a metadata error or "
                                    f"no metadata space); {REPAIR_HINT}", operation, self.name)
        return st

    def _check_free_space(self, st, operation):
        pct = self.min_free_space
        for what, free, total in (("data", st.free_data, st.total_data),
                                  ("metadata", st.free_meta, st.total_meta)):
            if int(free) * 100 < int(total) * pct:
                raise PoolFullError(
                    f"pool {self.name!r} has {int(free)} of {int(total)} {what} blocks free "
                    f"({100 * int(free) / max(int(total), 1):.1f}%), below its minimum free "
                    f"space of {pct}%; grow the pool or delete devices",
                    operation, self.name)

    def _set_transaction(self, old, new):
        ops.message(self.name, f"set_transaction_id {old} {new}")
        # Reading status without no-flush commits the pool's metadata, so
        # the change is durable before the store records its outcome.
        ops.status(self.name)

    # -- bringing a pool up ------------------------------------------------------------

    def _bring_up(self, operation):
        self._activate_pool(operation)
        st = self.status()
        if st.failed:
            return  # nothing can be activated; changes are refused with the reason
        if st.mode == "rw" and not st.needs_check:
            self._reconcile(st, operation)
            self._retry_deferred_deletes()
        for row in self._store.active_devices():
            self._activate(row, operation)

    def _reconcile(self, st, operation):
        kernel = st.transaction_id
        for intent in self._store.intents():
            stored = self._store.transaction_id()
            if intent["txid"] != stored + 1:
                raise StateError(f"the journal of pool {self.name!r} holds an intent for "
                                 f"transaction {intent['txid']}, but the store is at {stored}",
                                 operation, self.name)
            if kernel == intent["txid"]:
                self._roll_forward(intent)
            elif kernel == stored:
                kernel = self._roll_back(intent)
            else:
                raise StateError(
                    f"pool {self.name!r} is at transaction {kernel} in the kernel but "
                    f"{stored} in the store (with a change to {intent['txid']} in flight); "
                    f"another program may have changed the pool", operation, self.name)
        stored = self._store.transaction_id()
        if kernel != stored:
            raise StateError(
                f"pool {self.name!r} is at transaction {kernel} in the kernel but {stored} "
                f"in the store; another program changed the pool, so libdm will not touch it",
                operation, self.name)

    def _roll_forward(self, intent):
        """The kernel has the change: record its outcome."""
        with self._store.transaction():
            if intent["op"] in ("create_thin", "create_snap"):
                self._store.add_device(intent["name"], intent["thin_id"], intent["size"],
                                       intent["parent"])
            else:
                self._forget_deleted(intent)
            self._store.set_transaction_id(intent["txid"])
            self._store.drop_intent(intent["txid"])

    def _forget_deleted(self, intent):
        row = self._store.device(intent["name"])
        if row is not None and row["thin_id"] == intent["thin_id"]:
            self._store.drop_device(intent["name"])
        self._store.drop_deferred_delete(intent["thin_id"])
        self._store.release_id(intent["thin_id"])

    def _roll_back(self, intent):
        """The kernel's transaction id never moved.  A create may still have
        reached the kernel: delete the id so it cannot leak.  A delete is
        finished, since the device was already deactivated for it."""
        self._delete_thin_id(intent["thin_id"])
        if intent["op"] in ("create_thin", "create_snap"):
            with self._store.transaction():
                self._store.release_id(intent["thin_id"])
                self._store.drop_intent(intent["txid"])
            return self._store.transaction_id()
        self._set_transaction(intent["txid"] - 1, intent["txid"])
        self._roll_forward(intent)
        return intent["txid"]

    def _delete_thin_id(self, thin_id):
        """Send ``delete``; an id the kernel does not hold is fine."""
        try:
            ops.message(self.name, f"delete {thin_id}")
        except DMError as exc:
            if exc.errno != errno.ENODATA:
                raise

    def _retry_deferred_deletes(self):
        for row in self._store.deferred_deletes():
            stored = self._store.transaction_id()
            with self._store.transaction():
                self._store.add_intent(stored + 1, "delete", row["thin_id"], row["name"])
            try:
                self._delete_thin_id(row["thin_id"])
            except DeviceBusyError:
                with self._store.transaction():
                    self._store.drop_intent(stored + 1)
                continue
            self._set_transaction(stored, stored + 1)
            self._roll_forward({"op": "delete", "txid": stored + 1, "thin_id": row["thin_id"],
                                "name": row["name"]})

    # -- devices ----------------------------------------------------------------------

    def device_dm_name(self, name):
        """The device-mapper name of thin device ``name``: ``<pool>-<name>``."""
        return f"{self.name}-{name}"

    def _check_device_name(self, name):
        check_name(name)
        dm_name = self.device_dm_name(name)
        try:
            check_name(dm_name)
        except ValueError as exc:
            raise ValueError(f"device name {name!r} is too long for pool {self.name!r}: "
                             f"{exc}") from None
        return dm_name

    def _wrap(self, row):
        return (Snapshot if row["parent"] is not None else ThinDevice)(self, row)

    def device(self, name):
        """The thin device or snapshot called ``name``.

        Raises:
            NoSuchDeviceError: the pool has no such device.
        """
        row = self._store.device(name)
        if row is None:
            raise error_for(errno.ENXIO, "device", name,
                            message=f"pool {self.name!r} has no device named {name!r}")
        return self._wrap(row)

    def devices(self):
        """Every thin device and snapshot, sorted by name."""
        return [self._wrap(row) for row in self._store.devices()]

    def children(self, name):
        """The snapshots taken of device ``name``."""
        return [self.device(child) for child in self._store.children(name)]

    def create_thin(self, name, size):
        """Create a thin device and activate it.

        Args:
            name: its name within the pool; its device-mapper name is
                ``<pool>-<name>``.
            size: its size, bytes or a string such as ``"10G"`` (whole
                512-byte sectors).

        Returns:
            The new, active :class:`~libdm.ThinDevice`.

        Raises:
            ValueError: a bad name or size.
            DeviceExistsError: the name is taken.
            PoolFullError: free space is below ``min_free_space``, or no
                thin id is left.
            PoolReadOnlyError, PoolFailedError: the pool refuses changes.
        """
        dm_name = self._check_device_name(name)
        size = parse_size(size, what="size").sectors()
        with self._changing("create_thin"):
            self._before_change("create_thin", name, dm_name)
            self._provision("create_thin", name, size, None, None)
            return self._activate(self._store.device(name), "create_thin")

    def snapshot_device(self, origin, name):
        """Snapshot device ``origin`` as ``name`` (see :meth:`ThinDevice.snapshot`)."""
        dm_name = self._check_device_name(name)
        with self._changing("snapshot"):
            row = self._store.device(origin)
            if row is None:
                raise error_for(errno.ENXIO, "snapshot", origin,
                                message=f"pool {self.name!r} has no device named {origin!r}")
            self._before_change("snapshot", name, dm_name)
            self._provision("create_snap", name, Sectors(row["size"]), origin, row["thin_id"])
            return self._activate(self._store.device(name), "snapshot")

    def _before_change(self, operation, name, dm_name):
        self._retry_deferred_deletes()
        st = self._writable_status(operation)
        self._check_free_space(st, operation)
        if self._store.device(name) is not None:
            raise DeviceExistsError(errno.EEXIST, f"pool {self.name!r} already has a device "
                                    f"named {name!r}", operation, name)
        if ops.exists(dm_name):
            raise DeviceExistsError(errno.EEXIST, f"a device-mapper device named {dm_name!r} "
                                    f"exists already", operation, dm_name)

    def _provision(self, op, name, size, parent, origin_id):
        """The journal for create_thin / create_snap (see the module doc)."""
        while True:
            stored = self._store.transaction_id()
            txid = stored + 1
            with self._store.transaction():
                thin_id = self._store.allocate_id(MAX_THIN_ID)
                if thin_id is None:
                    raise PoolFullError(f"pool {self.name!r} has no free thin device id left",
                                        op, self.name)
                self._store.add_intent(txid, op, thin_id, name, size, parent, origin_id)
            crash.point("create:intent")
            try:
                if op == "create_thin":
                    ops.message(self.name, f"create_thin {thin_id}")
                else:
                    self._create_snap(thin_id, parent, origin_id)
            except DMError as exc:
                with self._store.transaction():
                    self._store.drop_intent(txid)
                    if exc.errno == errno.EEXIST:
                        # The kernel holds this id without our record of it:
                        # never hand it out, try the next one.
                        self._store.mark_foreign(thin_id)
                    else:
                        self._store.release_id(thin_id)
                if exc.errno == errno.EEXIST:
                    continue
                raise
            crash.point("create:message")
            try:
                self._set_transaction(stored, txid)
            except DMError:
                self._undo_provision(thin_id, txid)
                raise
            crash.point("create:transaction")
            with self._store.transaction():
                self._store.add_device(name, thin_id, size, parent)
                self._store.set_transaction_id(txid)
                self._store.drop_intent(txid)
            crash.point("create:recorded")
            return thin_id

    def _undo_provision(self, thin_id, txid):
        try:
            self._delete_thin_id(thin_id)
        finally:
            with self._store.transaction():
                self._store.drop_intent(txid)
                self._store.release_id(thin_id)

    def _create_snap(self, thin_id, origin, origin_id):
        origin_dm = self.device_dm_name(origin)
        if not ops.exists(origin_dm):
            ops.message(self.name, f"create_snap {thin_id} {origin_id}")
            return
        # The kernel does not stop a snapshot of an origin with writes in
        # flight, and such a snapshot is silently inconsistent: suspend
        # the origin around the message, and always resume it.
        ops.suspend(origin_dm)
        try:
            crash.point("snapshot:suspended")
            ops.message(self.name, f"create_snap {thin_id} {origin_id}")
        finally:
            ops.resume(origin_dm)

    def activate_device(self, name):
        """Activate device ``name`` (see :meth:`ThinDevice.activate`)."""
        with self._changing("activate"):
            row = self._store.device(name)
            if row is None:
                raise error_for(errno.ENXIO, "activate", name,
                                message=f"pool {self.name!r} has no device named {name!r}")
            self._activate(row, "activate")

    def _thin_table(self, row, pool_devno):
        return [Target(0, row["size"], "thin", str(ThinParams(pool_devno, row["thin_id"])))]

    def _activate(self, row, operation):
        dm_name = self.device_dm_name(row["name"])
        table = self._thin_table(row, self._devno())
        if ops.exists(dm_name):
            live = ops.table(dm_name)
            if live != table:
                raise StateError(f"{dm_name} exists with table {'; '.join(map(str, live))}, "
                                 f"expected {table[0]}", operation, dm_name)
            if ops.info(dm_name).suspended:
                ops.resume(dm_name)
        else:
            ops.create(dm_name, table,
                       uuid=f"LIBDM-THIN-{self._config['token']}-{row['thin_id']}")
        if not row["active"]:
            with self._store.transaction():
                self._store.set_active(row["name"], True)
        return self.device(row["name"])

    def deactivate_device(self, name):
        """Deactivate device ``name`` (see :meth:`ThinDevice.deactivate`)."""
        with self._changing("deactivate"):
            if self._store.device(name) is None:
                raise error_for(errno.ENXIO, "deactivate", name,
                                message=f"pool {self.name!r} has no device named {name!r}")
            self._deactivate(name)
            with self._store.transaction():
                self._store.set_active(name, False)

    def _deactivate(self, name):
        dm_name = self.device_dm_name(name)
        if ops.exists(dm_name):
            ops.remove(dm_name, deferred=self.deferred_removal)

    def delete_device(self, name):
        """Delete device ``name`` (see :meth:`ThinDevice.delete`)."""
        with self._changing("delete"):
            row = self._store.device(name)
            if row is None:
                raise error_for(errno.ENXIO, "delete", name,
                                message=f"pool {self.name!r} has no device named {name!r}")
            children = self._store.children(name)
            if children:
                raise DeviceBusyError(
                    errno.EBUSY, f"{name!r} has snapshots ({', '.join(children)}); delete "
                    f"them first", "delete", name)
            self._retry_deferred_deletes()
            self._writable_status("delete")
            self._deactivate(name)
            with self._store.transaction():
                self._store.set_active(name, False)
            crash.point("delete:deactivated")
            stored = self._store.transaction_id()
            txid = stored + 1
            with self._store.transaction():
                self._store.add_intent(txid, "delete", row["thin_id"], name)
            crash.point("delete:intent")
            try:
                self._delete_thin_id(row["thin_id"])
            except DeviceBusyError:
                if not self.deferred_deletion:
                    with self._store.transaction():
                        self._store.drop_intent(txid)
                    raise
                # Still open (a deferred removal is pending): the name is
                # freed now, the id when a later delete attempt succeeds.
                with self._store.transaction():
                    self._store.drop_intent(txid)
                    self._store.drop_device(name)
                    self._store.queue_delete(row["thin_id"], name)
                return
            crash.point("delete:message")
            self._set_transaction(stored, txid)
            crash.point("delete:transaction")
            self._roll_forward({"op": "delete", "txid": txid, "thin_id": row["thin_id"],
                                "name": name})

    # -- metadata snapshots ------------------------------------------------------------

    def reserve_metadata_snap(self):
        """Reserve a metadata snapshot, so ``thin_ls`` / ``thin_dump -m`` can
        read the live pool; release it with :meth:`release_metadata_snap`.

        Raises:
            DMError: one is reserved already (EINVAL), or the pool refuses.
        """
        ops.message(self.name, "reserve_metadata_snap")

    def release_metadata_snap(self):
        """Release the reserved metadata snapshot.

        Raises:
            DMError: none is reserved (EINVAL).
        """
        ops.message(self.name, "release_metadata_snap")

    @contextlib.contextmanager
    def metadata_snap(self):
        """``with pool.metadata_snap(): ...`` reserves a metadata snapshot
        for the block and always releases it."""
        self.reserve_metadata_snap()
        try:
            yield self
        finally:
            self.release_metadata_snap()

    # -- base device -------------------------------------------------------------------

    @property
    def base_device(self):
        """The device set as base for layers (see :meth:`set_base_device`),
        or ``None``."""
        name = self._config.get("base_device")
        return None if name is None else self.device(name)

    def set_base_device(self, name):
        """Mark device ``name`` as the pool's base device (shown in
        :meth:`info` as Base Device Size), or clear it with ``None``.

        Raises:
            NoSuchDeviceError: no such device.
        """
        with self._changing("set_base_device"):
            if name is not None and self._store.device(name) is None:
                raise error_for(errno.ENXIO, "set_base_device", name,
                                message=f"pool {self.name!r} has no device named {name!r}")
            config = dict(self._config, base_device=name)
            with self._store.transaction():
                self._store.set_config(config)
            self._config = config

    # -- reporting and ending ----------------------------------------------------------

    def info(self):
        """The pool report, with the fields of ``docker info``'s listing
        (see :class:`~libdm.thin.report.PoolInfo`)."""
        from libdm.thin.report import pool_info

        return pool_info(self)

    def close(self):
        """Release the state store and lock; the devices stay live."""
        if self._lock_fd >= 0:
            self._store.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def destroy(self, *, remove_files=False):
        """Remove every thin device, the pool device and what backs it.

        Thin devices are removed (waiting out short-lived openers), then
        the pool, then linear pieces; loop devices detach by themselves.
        With ``remove_files`` a loop pool's data and metadata files and the
        state store are deleted too (for other pools, the state store); a
        pool destroyed without it can be brought back with :meth:`open`.
        An adopted pool's device is left alone.

        Raises:
            DeviceBusyError: a thin device is still in use.
        """
        with self._changing("destroy"):
            for row in self._store.devices():
                dm_name = self.device_dm_name(row["name"])
                if ops.exists(dm_name):
                    ops.remove(dm_name)
            if self.kind != "adopted" and ops.exists(self.name):
                ops.remove(self.name)
            self._backing.teardown()
            if remove_files:
                if self.kind == "loop":
                    self._backing.remove_files()
                self._store.close()
                for leftover in os.listdir(self.directory):
                    if leftover.startswith(DB_NAME):
                        os.unlink(os.path.join(self.directory, leftover))
        if remove_files:
            os.unlink(os.path.join(self.directory, LOCK_NAME))
            os.close(self._lock_fd)
            self._lock_fd = -1
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)
        else:
            self.close()

    def __repr__(self):
        return f"<Pool {self.name!r} ({self.kind}) at {self.directory}>"


def _zero_head(path, offset=0, length=4096):
    """Zero ``length`` bytes at ``offset`` of a device (new metadata must
    start zeroed, or the kernel may take stale bytes for a superblock)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
