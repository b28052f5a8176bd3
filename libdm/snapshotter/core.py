"""containerd's snapshot semantics on a libdm pool, without gRPC.

:class:`Snapshotter` implements Prepare, View, Mounts, Commit, Remove,
Stat, Update, List, Usage and Cleanup as containerd's own snapshotters do
(``snapshots/storage`` in containerd), with the errors as exceptions that
carry containerd's codes.  :mod:`libdm.snapshotter.service` serves it over
gRPC.

Devices: a base thin device with a filesystem, made once; a snapshot
without parent is a thin snapshot of the base, one with a parent a thin
snapshot of the parent's device.  Commit renames the snapshot in the
metadata store and deactivates its device (the device and its data stay:
children are snapshots of it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from libdm.dm import ops
from libdm.dm.errors import DMError, NoSuchDeviceError
from libdm.snapshotter import store as st
from libdm.snapshotter.filters import FilterError, parse_filters
from libdm.snapshotter.store import Kind
from libdm.thin import crash
from libdm.thin.errors import StateError
from libdm.thin.owner import DeviceOwner
from libdm.thin.statedir import StateDir
from libdm.thin.units import Bytes, parse_size

if TYPE_CHECKING:
    from libdm.snapshotter.config import Config
    from libdm.thin.pool import Pool

#: Where ``LIBDM_CRASH_AT`` can stop the snapshotter (see libdm.thin.crash),
#: besides the pool's own points.
CRASH_POINTS = (
    "snapshotter:prepare:row",
    "snapshotter:prepare:device",
    "snapshotter:commit:flushed",
    "snapshotter:commit:recorded",
    "snapshotter:remove:marked",
    "snapshotter:remove:deleted",
)

__all__ = [
    "CRASH_POINTS",
    "AlreadyExists",
    "FailedPrecondition",
    "Info",
    "InvalidArgument",
    "Kind",
    "Mount",
    "NotFound",
    "SnapshotError",
    "Snapshotter",
    "foreign_devices",
]

logger = logging.getLogger("libdm.snapshotter")

DB_NAME = st.DB_NAME
MAX_LABELS_SIZE = 4096  # containerd's limit for one label, key and value together


class SnapshotError(Exception):
    """An error with one of containerd's codes (its gRPC status code's name)."""

    code = "UNKNOWN"


class NotFound(SnapshotError):
    code = "NOT_FOUND"


class AlreadyExists(SnapshotError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotError):
    code = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotError):
    code = "INVALID_ARGUMENT"


@dataclasses.dataclass(slots=True, repr=False)
class Info:
    """A snapshot as containerd sees it."""

    name: str
    #: The parent's name, "" for none.
    parent: str
    kind: Kind
    #: Seconds since the epoch.
    created: float
    updated: float
    labels: dict[str, str]

    def __repr__(self) -> str:
        return f"<Info {self.name!r} {self.kind} parent={self.parent!r}>"


@dataclasses.dataclass(slots=True, repr=False)
class Mount:
    """A mount containerd makes of a snapshot: ``mount -t TYPE -o OPTIONS SOURCE``."""

    type: str
    source: str
    options: list[str]
    target: str = ""

    def __post_init__(self) -> None:
        self.options = list(self.options)

    def __repr__(self) -> str:
        return f"<Mount {self.type} {self.source} {','.join(self.options)}>"


def _metadata_device(pool_name: str) -> str:
    """A path to the pool's metadata device, from its live table (the
    kernel's own node under /dev: loop<N> or dm-<N>, which devtmpfs makes
    with or without udev)."""
    table = ops.table(pool_name)
    devno: str = table[0].params.split()[0]
    if devno.startswith("/"):
        return devno
    with open(f"/sys/dev/block/{devno}/uevent") as fh:
        for line in fh:
            if line.startswith("DEVNAME="):
                return "/dev/" + line.strip().split("=", 1)[1]
    raise OSError(f"no device name for {devno}")


def _check_labels(labels: Mapping[str, str] | None) -> None:
    for k, v in (labels or {}).items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if len(k) + len(v) > MAX_LABELS_SIZE:
            raise InvalidArgument(
                f"label key and value greater than maximum size "
                f"({MAX_LABELS_SIZE} bytes), key: {k[:64]}"
            )


def _unrecorded(pool: Pool, store: st.MetaStore, prefix: str) -> list[str]:
    """The pool's devices that no row of the snapshotter's database names
    but that are named like its own: with its prefix, or carrying its
    mark (its token) anywhere in their names.  None of them is proven its
    own: a name is only a name (the user can copy the token into one), and
    no step of the snapshotter leaves a device of its own unrecorded (a
    Prepare records its row before the device is made; the base, made
    before it is recorded, is found by its exact name, see _ensure_base)."""
    recorded = {r.device for r in store.rows()}
    made = store.base(f"{prefix}base")
    if made is not None:
        recorded.add(made.device)
    token = store.owner_token()
    return [
        dev.name
        for dev in pool.devices()
        if dev.name not in recorded
        and (dev.name.startswith(prefix) or (token is not None and token in dev.name))
    ]


def foreign_devices(pool: Pool, config: Config) -> list[str]:
    """The devices of ``pool`` named with the snapshotter's prefix that the
    snapshotter of ``config`` did not make, sorted: what it leaves alone
    (see :meth:`Snapshotter.foreign_devices`).  Read without changing
    anything: no database is made and nothing is recovered.

    Raises:
        StateError: no snapshotter database there, or one not to be trusted.
    """
    root = config.root_path or pool.directory
    if not os.path.isdir(root):
        raise StateError(f"no snapshotter database in {root} (no such directory)", st.OPERATION)
    statedir = StateDir.open(root, operation=st.OPERATION)
    try:
        store = st.MetaStore(statedir, create=False)
        try:
            return sorted(_unrecorded(pool, store, config.device_prefix))
        finally:
            store.close()
    finally:
        statedir.close()


class Snapshotter:
    """containerd snapshots on a libdm :class:`~libdm.Pool`.

    Args:
        pool: an open, live :class:`~libdm.Pool`.
        config: a :class:`~libdm.snapshotter.config.Config`.

    Opening runs :meth:`recover`: interrupted changes are finished or
    undone, and devices this snapshotter made that no snapshot owns are
    deleted.  It acts only on devices it can prove it made: those its
    database names, and those whose name carries its mark (its
    :class:`~libdm.thin.owner.DeviceOwner` token).  Other devices named
    with its prefix are reported (:meth:`foreign_devices`, and a warning)
    and left alone.

    Its ``root_path`` (by default the pool's directory) must be private as
    the pool's state directory is (a missing one is made, mode 0700), and
    its database a regular file of the caller's.

    Raises:
        StateError: ``root_path`` or ``snapshotter.db`` is not to be
            trusted (named, and why); nothing was changed.
    """

    def __init__(self, pool: Pool, config: Config) -> None:
        self.pool = pool
        self.config = config
        root = config.root_path or pool.directory
        # Whoever can write the database can make the snapshotter delete
        # any device of the pool: the pool's state directory's rules.
        self._statedir = StateDir.claim(root, (), operation=st.OPERATION)
        try:
            self.store = st.MetaStore(self._statedir)
            try:
                self.prefix = config.device_prefix
                #: The mark of this snapshotter's devices.
                self.owner: DeviceOwner = self.store.owner(self.prefix)
                made = self.store.base(self._legacy_base)
            except BaseException:
                self.store.close()
                raise
        except BaseException:
            self._statedir.close()
            raise
        self.base_name = made.device if made is not None else self.owner.name("base")
        #: The filesystem every layer has: the base device's.
        self.fs_type = config.fs_type
        self._lock = threading.RLock()
        self._removals = threading.Event()
        self._closing = threading.Event()
        self._worker: threading.Thread | None = None
        with self._lock:
            self.recover()
            self._ensure_base()
        if config.async_remove:
            self._worker = threading.Thread(
                target=self._remove_worker, daemon=True, name="libdm-snapshotter-remove"
            )
            self._worker.start()

    def close(self) -> None:
        self._closing.set()
        self._removals.set()
        if self._worker is not None:
            self._worker.join(timeout=60)
        with self._lock:
            self.store.close()
            self._statedir.close()

    # -- the socket it serves on ------------------------------------------------------

    def served_socket(self) -> st.SocketRecord | None:
        """The unix socket this snapshotter last bound (see
        :class:`~libdm.snapshotter.service.Server`), None if none."""
        with self._lock:
            return self.store.socket()

    def record_socket(self, record: st.SocketRecord | None) -> None:
        """Record the socket just bound (None: the one recorded is gone)."""
        with self._lock, self.store.transaction() as s:
            s.set_socket(record)

    # -- the base device ----------------------------------------------------------------

    @property
    def _legacy_base(self) -> str:
        """The base device's name before names carried the owner's mark."""
        return f"{self.prefix}base"

    def _ensure_base(self) -> None:
        made = self.store.base(self._legacy_base)
        if made is not None:
            # Every layer has the base's filesystem, whatever the config says now.
            self.fs_type = made.fs_type
            if made.fs_type != self.config.fs_type:
                logger.warning(
                    "snapshotter: the base device has %s, not the configured %s; layers stay %s",
                    made.fs_type,
                    self.config.fs_type,
                    made.fs_type,
                )
            return
        self.fs_type = self.config.fs_type
        self.base_name = self.owner.name("base")
        # Made before and interrupted (say, mid-mkfs): make it again (its
        # name carries this snapshotter's mark: the device is its own).
        if self._pool_has(self.base_name):
            self.pool.delete_device(self.base_name)
        size = parse_size(self.config.base_image_size, what="base_image_size")
        dev = self.pool.create_thin(self.base_name, int(size))
        dev.format(self.config.fs_type, options=self.config.mkfs_options)
        # An image's root has no lost+found (containerd's devmapper snapshotter
        # removes it from every new filesystem; here once, from the base).
        with dev.mount() as root:
            lost = os.path.join(root, "lost+found")
            if os.path.isdir(lost):
                os.rmdir(lost)
        mapped = self._mapped(self.base_name)
        self.pool.deactivate_device(self.base_name)
        with self.store.transaction() as s:
            s.set_base(self.config.fs_type, size, mapped, self.base_name)

    # -- helpers ------------------------------------------------------------------------

    def _pool_has(self, name: str) -> bool:
        try:
            self.pool.device(name)
        except NoSuchDeviceError:
            return False
        return True

    def _unrecorded_devices(self) -> list[str]:
        return _unrecorded(self.pool, self.store, self.prefix)

    def foreign_devices(self) -> list[str]:
        """The pool's devices named with this snapshotter's prefix that it
        did not make (the user's, another snapshotter's), sorted: it never
        deletes or changes them."""
        with self._lock:
            return sorted(self._unrecorded_devices())

    def _mapped(self, device: str) -> Bytes:
        try:
            status = self.pool.device(device).status()
        except DMError:
            return Bytes(0)
        return Bytes(0) if status.failed else Bytes(status.mapped.bytes())

    def _row(self, ns: str, key: str) -> st.Row:
        row = self.store.get(ns, key)
        if row is None or row.state != st.State.READY:
            raise NotFound(f"snapshot {key} does not exist")
        return row

    def _info(self, row: st.Row) -> Info:
        parent = ""
        if row.parent_id is not None:
            parent = self.store.by_id(row.parent_id).key or ""
        return Info(row.key or "", parent, row.kind, row.created, row.updated, dict(row.labels))

    def _mounts(self, row: st.Row) -> list[Mount]:
        options = []
        if self.fs_type == "xfs":
            options.append("nouuid")  # every layer has the base's filesystem UUID
        if row.kind == Kind.VIEW:
            options.append("ro")
        return [
            Mount(self.fs_type, ops.device_path(self.pool.device_dm_name(row.device)), options)
        ]

    # -- containerd's operations -------------------------------------------------------------

    def prepare(
        self, ns: str, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(ns, Kind.ACTIVE, key, parent, labels)

    def view(
        self, ns: str, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(ns, Kind.VIEW, key, parent, labels)

    def _create(
        self, ns: str, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        _check_labels(labels)
        with self._lock:
            with self.store.transaction() as s:
                parent_id = None
                origin = self.base_name
                if parent:
                    prow = s.get(ns, parent)
                    if prow is None or prow.state != st.State.READY:
                        raise NotFound(f"missing parent {parent!r} bucket: not found")
                    if prow.kind != Kind.COMMITTED:
                        raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
                    parent_id, origin = prow.id, prow.device
                if s.get(ns, key) is not None:
                    raise AlreadyExists(f"snapshot {key}: already exists")
                row_id, device = s.insert(ns, key, kind, parent_id, labels, self.owner)
            # The row is durable: a crash from here on is rolled back by recover().
            crash.point("snapshotter:prepare:row")
            try:
                self.pool.snapshot_device(origin, device)
            except BaseException:
                # Refused (a full pool, a name taken in the kernel...): undo
                # the row now, so the key is free for a retry.
                self._undo_create(row_id, device)
                raise
            crash.point("snapshotter:prepare:device")
            with self.store.transaction() as s:
                s.mark_ready(row_id)
            return self._mounts(self.store.by_id(row_id))

    def _undo_create(self, row_id: int, device: str) -> None:
        try:
            self._delete_device(device)
        except Exception as exc:
            logger.error(
                "snapshotter: could not delete %s after a failed prepare: %s", device, exc
            )
            return
        with self.store.transaction() as s:
            s.delete(row_id)

    def mounts(self, ns: str, key: str) -> list[Mount]:
        with self._lock:
            row = self._row(ns, key)
            if row.kind == Kind.COMMITTED:
                raise FailedPrecondition(f"requested snapshot {key} not active or view")
            dev = self.pool.device(row.device)
            if not dev.active:
                dev.activate()
            return self._mounts(row)

    def commit(
        self, ns: str, name: str, key: str, labels: Mapping[str, str] | None = None
    ) -> None:
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        _check_labels(labels)
        with self._lock:
            if self.store.get(ns, name) is not None:
                raise AlreadyExists(f"committed snapshot {name}: already exists")
            row = self.store.get(ns, key)
            if row is None or row.state != st.State.READY:
                raise NotFound(f"failed to get active snapshot {key!r}: not found")
            if row.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            # What was written to the layer reaches the pool's disk before the
            # layer is committed: a power cut cannot lose a committed layer's data.
            self._flush(row.device)
            crash.point("snapshotter:commit:flushed")
            mapped = self._mapped(row.device)
            with self.store.transaction() as s:
                s.commit(row.id, name, labels, mapped)
            crash.point("snapshotter:commit:recorded")
            # Committed: the device is only read through its children now.
            self._deactivate(row.device)

    def _flush(self, device: str) -> None:
        dev = self.pool.device(device)
        if not dev.active:
            return
        fd = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _deactivate(self, device: str) -> None:
        try:
            self.pool.deactivate_device(device)
        except DMError as exc:
            logger.warning("snapshotter: could not deactivate %s: %s", device, exc)

    def remove(self, ns: str, key: str) -> None:
        with self._lock:
            row = self._row(ns, key)
            if self.store.children(row.id):
                raise FailedPrecondition("cannot remove snapshot with child")
            with self.store.transaction() as s:
                s.mark_removing(row.id)
            # The key is free now; the device goes below, or in the background.
            crash.point("snapshotter:remove:marked")
            if self.config.async_remove:
                self._removals.set()
                return
            try:
                self._finish_removals()
            except Exception as exc:
                # The snapshot is removed; its device is deleted by the next
                # removal, Cleanup or restart.
                logger.error(
                    "snapshotter: deleting the device of %r failed, will retry: %s", key, exc
                )

    def stat(self, ns: str, key: str) -> Info:
        with self._lock:
            return self._info(self._row(ns, key))

    def update(self, ns: str, info: Info, paths: Sequence[str] = ()) -> Info:
        """Change the labels of snapshot ``info.name`` (its only field that
        can change): all of them to ``info.labels``, or those the field
        ``paths`` name (``labels``, ``labels.<key>``)."""
        with self._lock:
            row = self._row(ns, info.name)
            labels = dict(row.labels)
            new = dict(info.labels or {})
            if paths:
                for path in paths:
                    if path.startswith("labels."):
                        k = path[len("labels.") :]
                        if new.get(k):
                            labels[k] = new[k]
                        else:
                            labels.pop(k, None)
                    elif path == "labels":
                        labels = new
                    else:
                        raise InvalidArgument(
                            f"cannot update {path!r} field on snapshot {info.name!r}"
                        )
            else:
                labels = new
            labels = {k: v for k, v in labels.items() if v}
            _check_labels(labels)
            with self.store.transaction() as s:
                s.set_labels(row.id, labels)
            return self._info(self.store.by_id(row.id))

    def walk(self, ns: str, filters: Sequence[str] = ()) -> list[Info]:
        try:
            match = parse_filters(filters)
        except FilterError as exc:
            raise InvalidArgument(str(exc)) from None
        with self._lock:
            infos = [self._info(r) for r in self.store.all(ns)]
        out = []
        for info in infos:

            def fields(path: Sequence[str], info: Info = info) -> tuple[str, bool]:
                head = path[0]
                if head == "kind":
                    return info.kind.value, True
                if head == "name":
                    return info.name, True
                if head == "parent":
                    return info.parent, True
                if head == "labels":
                    key = ".".join(path[1:])
                    return (info.labels[key], True) if key in info.labels else ("", False)
                return "", False

            if match(fields):
                out.append(info)
        return out

    def usage(self, ns: str, key: str) -> tuple[Bytes, int]:
        """(bytes, inodes) the snapshot owns beyond its parent: the data
        blocks where its thin device differs from its origin's (the base
        device or the parent layer), as ``thin_delta`` reads them from the
        pool's metadata.  A committed snapshot's figure is computed once and
        kept (neither device changes any more).  Without ``thin_delta``, or
        when the pool's metadata snapshot is taken, the figure falls back to
        the blocks the device maps beyond those its origin mapped (which
        misses blocks a layer rewrote).  Inodes are not counted (0)."""
        with self._lock:
            row = self._row(ns, key)
            cached = self.store.owned(row.id)
            if cached is not None:
                return cached, 0
            if row.parent_id is None:
                origin, base = self.base_name, self.store.base_mapped()
            else:
                parent = self.store.by_id(row.parent_id)
                origin, base = parent.device, parent.mapped
            if row.kind != Kind.COMMITTED:
                self._flush(row.device)  # the pool commits its metadata on a flush
            owned = self._delta_bytes(origin, row.device)
            if owned is None:
                mapped = row.mapped if row.kind == Kind.COMMITTED else self._mapped(row.device)
                return Bytes(max(0, int(mapped) - int(base))), 0
            if row.kind == Kind.COMMITTED:
                with self.store.transaction() as s:
                    s.set_owned(row.id, owned)
            return owned, 0

    def _delta_bytes(self, origin: str, device: str) -> Bytes | None:
        """Bytes of data blocks where ``device`` differs from ``origin``
        (thin_delta on a metadata snapshot), or None when that cannot be
        read."""
        try:
            first = self.pool.device(origin).thin_id
            second = self.pool.device(device).thin_id
            meta = _metadata_device(self.pool.name)
            with self.pool.metadata_snap():
                proc = subprocess.run(
                    ["thin_delta", "-m", "--snap1", str(first), "--snap2", str(second), meta],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            logger.debug("snapshotter: thin_delta unavailable: %s", exc)
            return None
        if proc.returncode != 0:
            logger.debug("snapshotter: thin_delta failed: %s", proc.stderr.strip())
            return None
        blocks = sum(
            int(n)
            for n in re.findall(
                r'<(?:different|right_only) begin="\d+" length="(\d+)"', proc.stdout
            )
        )
        return Bytes(blocks * int(self.pool.block_size.bytes()))

    def cleanup(self) -> None:
        """Delete what crashes left: devices of this snapshotter that no
        snapshot owns, removals and creations that did not finish."""
        with self._lock:
            self.recover()

    # -- removal and recovery ----------------------------------------------------------------

    def _delete_device(self, device: str) -> None:
        if not self._pool_has(device):
            return
        # discard_blocks forces a discard; otherwise the pool's own setting
        # (discard_on_delete, on for loop pools) decides: one discard.
        self.pool.delete_device(device, discard=True if self.config.discard_blocks else None)

    def _finish_removals(self) -> None:
        """Delete the devices of rows being removed, children first (a
        thin device with snapshots in the pool cannot be deleted)."""
        with self._lock:
            while True:
                rows = self.store.all(state=st.State.REMOVING)
                done = False
                for row in rows:
                    if self.store.has_rows_below(row.id):
                        continue
                    self._delete_device(row.device)
                    crash.point("snapshotter:remove:deleted")
                    with self.store.transaction() as s:
                        s.delete(row.id)
                    done = True
                if not done:
                    return

    def _remove_worker(self) -> None:
        while not self._closing.is_set():
            self._removals.wait()
            self._removals.clear()
            if self._closing.is_set():
                return
            try:
                self._finish_removals()
            except Exception:
                logger.exception("snapshotter: background removal failed")

    def recover(self) -> None:
        """Bring the two stores into agreement after a crash.

        Rows still ``creating`` are rolled back (the device is deleted if
        the pool made it), rows ``removing`` are finished, committed
        devices left active are deactivated.  Devices named like its own
        (its prefix, its mark) that no row names are logged and left
        alone: only its records prove a device its own.
        """
        with self._lock:
            creating = self.store.all(state=st.State.CREATING)
            for row in sorted(creating, key=lambda r: -r.id):
                if self.owner.marked(row.device) or not self._pool_has(row.device):
                    self._delete_device(row.device)
                else:
                    # An older libdm's row, made before names carried the
                    # mark: the device of that name may be anyone's.
                    logger.warning(
                        "snapshotter: not deleting %s for an unfinished prepare: its name "
                        "does not carry this snapshotter's mark, so it may not be its own",
                        row.device,
                    )
                with self.store.transaction() as s:
                    s.delete(row.id)
            self._finish_removals()
            foreign = self._unrecorded_devices()
            if foreign:
                logger.warning(
                    "snapshotter: leaving alone %d device(s) of pool %s named like its own "
                    "that its database does not name: %s",
                    len(foreign),
                    self.pool.name,
                    ", ".join(sorted(foreign)),
                )
            for row in self.store.all():
                if self._pool_has(row.device):
                    if row.kind == Kind.COMMITTED and self.pool.device(row.device).active:
                        self._deactivate(row.device)
                else:
                    logger.error(
                        "snapshotter: snapshot %r (namespace %s) has lost its device %s",
                        row.key,
                        row.namespace,
                        row.device,
                    )
