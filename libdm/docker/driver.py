"""Docker's graph-driver calls on a libdm pool, without HTTP.

Layout, as in Docker's guide for its devicemapper driver: a base thin
device with a filesystem, made once; a layer without parent is a thin
snapshot of the base, a layer with a parent a thin snapshot of the
parent's device, and a container's layers (``CreateReadWrite``) the same.
``Get`` mounts a layer once however often it is called (a reference count
in the plugin's records), ``Put`` unmounts it at the last reference.

The plugin's records (:mod:`libdm.docker.store`) are written before each
device change, so a kill at any point leaves devices the plugin can prove
it made: :meth:`Driver.recover` (run at every start) finishes or undoes
what was cut short and never touches a device the records do not name.
A record that says a device is being made proves nothing by itself (a
device of that name may have been there before): such a device is deleted
only when its name carries the plugin's mark
(:class:`~libdm.thin.owner.DeviceOwner`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, TYPE_CHECKING

from libdm.dm.errors import DeviceExistsError, DMError, NoSuchDeviceError
from libdm.docker import archive
from libdm.docker.store import BaseInfo, LayerRow, LayerState, LayerStore
from libdm.thin import crash, fs
from libdm.thin.status import ThinPoolFailed
from libdm.thin.units import Bytes, format_size, parse_size

if TYPE_CHECKING:
    from libdm.thin.pool import Pool

__all__ = ["CRASH_POINTS", "TEMP_MOUNT_POINTS", "DockerError", "Driver", "DriverOptions"]

logger = logging.getLogger("libdm.docker")
_LIBC = ctypes.CDLL(None, use_errno=True)

PREFIX = "docker-"
#: The base device's name before names carried the plugin's mark: a
#: device of this name is the plugin's only when its records say so.
LEGACY_BASE_NAME = f"{PREFIX}base"
DEFAULT_BASE_SIZE = Bytes(10 << 30)  # Docker's dm.basesize default

#: Where ``LIBDM_CRASH_AT`` can stop the plugin (see libdm.thin.crash).
CRASH_POINTS = (
    "docker:create:row",
    "docker:create:device",
    "docker:apply:marked",
    "docker:apply:unpacked",
    "docker:remove:marked",
    "docker:remove:deleted",
    "docker:get:mounted",
    "docker:create:grow-mounted",
    "docker:init:base-mounted",
)
#: The points inside a short mount of the plugin's own (a size grow, the
#: base device's first preparation), under its temporary mount directory.
TEMP_MOUNT_POINTS = ("docker:create:grow-mounted", "docker:init:base-mounted")


class DockerError(Exception):
    """A graph-driver call refused; the message goes back to Docker."""


_TRUE = ("1", "t", "true")
_FALSE = ("0", "f", "false")
_OPTIONS = (
    "dm.basesize, dm.fs, dm.mkfsarg, dm.mountopt, dm.use_deferred_removal, "
    "dm.use_deferred_deletion, dm.blkdiscard, dm.xfs_nospace_max_retries, dm.min_free_space"
)


def _bool(key: str, value: str) -> bool:
    """A boolean as Go's strconv.ParseBool reads it (Docker's options)."""
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise DockerError(f"{key}={value}: not a boolean (true or false)")


@dataclasses.dataclass(frozen=True, slots=True)
class DriverOptions:
    """The ``dm.*`` storage options the plugin takes (Docker's names).

    Attributes:
        base_size: the base device's size (``dm.basesize``), hence every
            layer's.
        fs: ``ext4`` or ``xfs`` (``dm.fs``).
        mkfs_args: extra mkfs arguments (``dm.mkfsarg``, repeatable).
        mount_options: extra mount options (``dm.mountopt``).
        deferred_removal, deferred_deletion, discard, xfs_nospace_max_retries:
            the pool's settings (``dm.use_deferred_removal``,
            ``dm.use_deferred_deletion``, ``dm.blkdiscard``,
            ``dm.xfs_nospace_max_retries``); ``None`` leaves the pool's.
        min_free_space: ``dm.min_free_space`` in percent: the pool's own
            (set when it is made), which the option may only confirm.
    """

    base_size: Bytes = DEFAULT_BASE_SIZE
    fs: str = "ext4"
    mkfs_args: tuple[str, ...] = ()
    mount_options: str = ""
    deferred_removal: bool | None = None
    deferred_deletion: bool | None = None
    discard: bool | None = None
    xfs_nospace_max_retries: int | None = None
    min_free_space: float | None = None

    @classmethod
    def parse(cls, options: Iterable[str], defaults: DriverOptions | None = None) -> DriverOptions:
        """Options as Docker passes them (``dm.basesize=20G``...).

        Raises:
            DockerError: an unknown option or a bad value.
        """
        out = defaults or cls()
        for option in options:
            key, sep, value = option.partition("=")
            key = key.strip().lower()
            if not sep:
                raise DockerError(f"storage option {option!r} has no value (use key=value)")
            if key == "dm.basesize":
                try:
                    out = dataclasses.replace(out, base_size=parse_size(value, what="dm.basesize"))
                except ValueError as exc:
                    raise DockerError(str(exc)) from None
            elif key == "dm.fs":
                if value not in fs.FILESYSTEMS:
                    raise DockerError(
                        f"dm.fs={value}: the plugin makes {' or '.join(fs.FILESYSTEMS)}"
                    )
                out = dataclasses.replace(out, fs=value)
            elif key == "dm.mkfsarg":
                out = dataclasses.replace(out, mkfs_args=(*out.mkfs_args, value))
            elif key == "dm.mountopt":
                out = dataclasses.replace(out, mount_options=value)
            elif key == "dm.use_deferred_removal":
                out = dataclasses.replace(out, deferred_removal=_bool(key, value))
            elif key == "dm.use_deferred_deletion":
                out = dataclasses.replace(out, deferred_deletion=_bool(key, value))
            elif key == "dm.blkdiscard":
                out = dataclasses.replace(out, discard=_bool(key, value))
            elif key == "dm.xfs_nospace_max_retries":
                try:
                    retries = int(value)
                except ValueError:
                    raise DockerError(f"{key}={value}: not a number") from None
                out = dataclasses.replace(out, xfs_nospace_max_retries=retries)
            elif key == "dm.min_free_space":
                try:
                    percent = float(value.strip().rstrip("%"))
                except ValueError:
                    raise DockerError(f"{key}={value}: not a percentage such as 10%") from None
                out = dataclasses.replace(out, min_free_space=percent)
            else:
                raise DockerError(
                    f"storage option {key!r} is not one the libdm plugin takes ({_OPTIONS})"
                )
        return out


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


# mount(8)'s names for the generic flags; the other options go to the filesystem.
_MOUNT_FLAGS = {
    "ro": 1,
    "rw": 0,
    "nosuid": 2,
    "nodev": 4,
    "noexec": 8,
    "sync": 16,
    "dirsync": 128,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
    "strictatime": 1 << 24,
    "lazytime": 1 << 25,
}


def _mount_syscall(source: str, target: str, fstype: str, options: str) -> None:
    """mount(2) itself: a mount(8) process costs a fork and an exec, which
    a User-Mode Linux kernel (and a busy Docker host) feels at every Get."""
    flags, data = 0, []
    for opt in filter(None, options.split(",")):
        if opt in _MOUNT_FLAGS:
            flags |= _MOUNT_FLAGS[opt]
        else:
            data.append(opt)
    rc = _LIBC.mount(
        source.encode(), target.encode(), fstype.encode(), flags, ",".join(data).encode()
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise DockerError(
            f"mount {source} on {target} ({options or 'defaults'}): {os.strerror(err)}"
        )


def _umount_syscall(target: str) -> None:
    if _LIBC.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise DockerError(f"umount {target}: {os.strerror(err)}")


def _check_id(layer_id: str) -> None:
    # dockerd's plugin client retries a call that failed in flight with its
    # body already consumed: an empty request is that, never a layer.
    if not layer_id:
        raise DockerError("no layer id given (an empty request)")


class Driver:
    """The graph driver on an open, live pool.

    Args:
        pool: the :class:`~libdm.Pool`.
        options: the base device's settings when it is made (later
            ``Init`` options replace them until it is).
        state_dir: the plugin's private directory (default
            ``<pool directory>/docker``).
        recover_at_start: run :meth:`recover` now (a caller that has
            checks of its own to make first runs it itself).

    The driver holds the records' lock until :meth:`close`: one plugin
    serves a pool at a time.

    Raises:
        PoolError: another plugin holds the records (named, with its pid).
    """

    def __init__(
        self,
        pool: Pool,
        options: DriverOptions | None = None,
        state_dir: str | None = None,
        *,
        recover_at_start: bool = True,
    ) -> None:
        self.pool = pool
        self.options = options or DriverOptions()
        self.store = LayerStore(state_dir or os.path.join(pool.directory, "docker"), PREFIX)
        self.owner = self.store.owner
        self.mount_root = self.store.statedir.join("mnt")
        os.makedirs(self.mount_root, mode=0o700, exist_ok=True)
        #: Short mounts of the plugin's own (``grow-<device>``,
        #: ``base-<device>``): recovery unmounts what a kill left here.
        self.temp_root = self.store.statedir.join("tmp")
        os.makedirs(self.temp_root, mode=0o700, exist_ok=True)
        self.home = ""
        self._lock = threading.RLock()
        #: The base device once made and seen: the calls need not read it
        #: from the records each time.
        self._base: BaseInfo | None = None
        try:
            self._bind_to_pool()
            self._configure_pool(self.options)
            if recover_at_start:
                self.recover()
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        with self._lock:
            self.store.close()

    # -- helpers ------------------------------------------------------------------------

    def _has_device(self, name: str) -> bool:
        try:
            self.pool.device(name)
        except NoSuchDeviceError:
            return False
        return True

    def _row(self, layer_id: str) -> LayerRow:
        _check_id(layer_id)
        row = self.store.get(layer_id)
        if row is None or row.state == LayerState.REMOVING or row.state == LayerState.CREATING:
            raise DockerError(f"layer {layer_id} does not exist")
        return row

    def _mount_path(self, row: LayerRow) -> str:
        return os.path.join(self.mount_root, row.device)

    def _fs(self) -> str:
        base = self._base or self.store.base()
        return base.fs if base is not None else self.options.fs

    def _mount_options(self) -> str:
        opts = ["nouuid"] if self._fs() == "xfs" else []  # every layer has the base's UUID
        if self.options.mount_options:
            opts.append(self.options.mount_options)
        return ",".join(opts)

    def _mount(self, device: str, target: str) -> None:
        dev = self.pool.device(device)
        if not dev.active:
            dev.activate()
        os.makedirs(target, mode=0o755, exist_ok=True)
        _mount_syscall(dev.path, target, self._fs(), self._mount_options())

    @staticmethod
    def _is_mounted(target: str) -> bool:
        # Without its directory it cannot be a mount point: one lstat
        # instead of reading the mount table (Put removes the directory).
        return os.path.lexists(target) and target in fs.mount_points()

    def _unmount(self, target: str) -> None:
        if not os.path.lexists(target):
            return
        if target in fs.mount_points():
            _umount_syscall(target)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(target)

    def _delete_device(self, device: str) -> None:
        try:
            self.pool.delete_device(device)
        except NoSuchDeviceError:
            # Asked only now: the pool's records are read once on the
            # usual path.  Another cause of the error is not hidden.
            if self._has_device(device):
                raise
        except DMError as exc:
            where = fs.mounts_of("/dev/mapper/" + self.pool.device_dm_name(device))
            if exc.errno != errno.EBUSY or not where:
                raise
            raise DockerError(
                f"{device} cannot be deleted: it is mounted on {', '.join(where)} "
                f"(unmount it there first)"
            ) from None

    def _temp_mount_point(self, purpose: str, device: str) -> str:
        path = os.path.join(self.temp_root, f"{purpose}-{device}")
        os.makedirs(path, mode=0o755, exist_ok=True)
        return path

    def _clear_temp_mounts(self) -> None:
        """Unmount the short mounts a kill left (before their devices are
        settled: a mount holds its device open)."""
        mounted = fs.mount_points()
        for name in sorted(os.listdir(self.temp_root)):
            path = os.path.join(self.temp_root, name)
            if path in mounted:
                logger.warning("docker: unmounting %s, left by an interrupted call", path)
                try:
                    _umount_syscall(path)
                except DockerError as exc:
                    logger.error("docker: %s stays mounted: %s", path, exc)
                    continue
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only ever empty: nothing is written there

    def _delete_if_marked(self, device: str, what: str) -> None:
        """Delete ``device`` of a change cut short, if it is proven the
        plugin's: its name carries the plugin's mark.  A record written
        before names carried it proves nothing (a device of that name may
        have been there before the record), so that device is left alone."""
        if self.owner.marked(device):
            self._delete_device(device)
        elif self._has_device(device):
            logger.warning(
                "docker: not deleting %s for %s: its name does not carry the plugin's "
                "mark, so it may not be the plugin's; it is left alone",
                device,
                what,
            )

    def _bind_to_pool(self) -> None:
        """The records name devices of the pool they were made on: records
        left by a pool that was destroyed (and made again in its directory)
        name devices that are gone, so they are refused, never served."""
        made_on = self.store.pool_uuid()
        if made_on is None:
            with self.store.transaction():
                self.store.set_pool_uuid(self.pool.uuid)
            return
        if made_on != self.pool.uuid:
            raise DockerError(
                f"the plugin's records in {self.store.statedir.path} were made on another "
                f"pool (uuid {made_on}), not on pool {self.pool.name!r} (uuid "
                f"{self.pool.uuid}): that pool was destroyed, and its layers with it. Move "
                f"{self.store.statedir.path} away to serve this pool afresh (Docker's images "
                f"must then be pulled or loaded again)"
            )

    def _refuse_handed_over(self) -> None:
        to = self.pool.handed_to
        if to is not None:
            raise DockerError(
                f"pool {self.pool.name!r} was handed over to {to} (libdm pool hand-over): its "
                f"thin devices are {to}'s, and the plugin makes none there; serve a pool of "
                f"its own, or point {to} at this one"
            )

    def _configure_pool(self, options: DriverOptions) -> None:
        """Apply the options that are the pool's settings."""
        if (
            options.min_free_space is not None
            and abs(options.min_free_space - self.pool.min_free_space) > 1e-9
        ):
            raise DockerError(
                f"dm.min_free_space={options.min_free_space:g}%: the pool keeps "
                f"{self.pool.min_free_space:g}% free, which is set when the pool is made "
                f"(libdm pool create --min-free-space)"
            )
        try:
            self.pool.configure(
                deferred_removal=options.deferred_removal,
                deferred_deletion=options.deferred_deletion,
                discard_on_delete=options.discard,
                xfs_nospace_max_retries=options.xfs_nospace_max_retries,
            )
        except ValueError as exc:
            raise DockerError(str(exc)) from None

    # -- the base device ----------------------------------------------------------------

    def _ensure_base(self) -> BaseInfo:
        self._refuse_handed_over()
        base = self._base or self.store.base()
        if base is not None and base.ready:
            if self._has_device(base.device):
                self._base = base
                return base
            self._base = None
            # Deleted outside the plugin: no layer needs it (a thin
            # snapshot keeps its blocks without its origin), so it is
            # made again, with the settings it had.
            logger.warning(
                "docker: the base device %s is gone from pool %s; making it again",
                base.device,
                self.pool.name,
            )
            name = base.device if self.owner.marked(base.device) else self.owner.name("base")
            return self._make_base(
                name,
                dataclasses.replace(self.options, fs=base.fs, base_size=Bytes(base.size)),
            )
        name = self.owner.name("base")
        if self._has_device(LEGACY_BASE_NAME):
            logger.warning(
                "docker: %s is not in the plugin's records; it is left alone, the base "
                "device is %s",
                LEGACY_BASE_NAME,
                name,
            )
        return self._make_base(name, self.options)

    def _make_base(self, name: str, opts: DriverOptions) -> BaseInfo:
        made = BaseInfo(name, opts.fs, int(opts.base_size), False)
        with self.store.transaction():
            self.store.set_base(made)
        # Its name carries the plugin's mark: an interrupted making of its own.
        self._delete_device(name)
        dev = self.pool.create_thin(name, int(opts.base_size))
        dev.format(opts.fs, options=opts.mkfs_args)
        # A layer's root is empty and 0755 (mkfs.ext4 leaves lost+found).
        where = self._temp_mount_point("base", name)
        with fs.mounted(dev.path, where, options="nouuid" if opts.fs == "xfs" else None) as root:
            crash.point("docker:init:base-mounted")
            lost = os.path.join(root, "lost+found")
            if os.path.isdir(lost):
                os.rmdir(lost)
            os.chmod(root, 0o755)
        os.rmdir(where)
        self.pool.deactivate_device(name)
        made = dataclasses.replace(made, ready=True)
        with self.store.transaction():
            self.store.set_base(made)
        self._base = made
        return made

    # -- Docker's calls -----------------------------------------------------------------

    def init(self, home: str, options: Sequence[str]) -> None:
        """``GraphDriver.Init``: Docker's home for the driver and its
        storage options (they set the base device, if it is not made yet).
        A dockerd sends it when it starts: the reference counts start
        again."""
        with self._lock:
            parsed = DriverOptions.parse(options, self.options)
            base = self.store.base()
            if (
                base is not None
                and base.ready
                and options
                and (base.fs != parsed.fs or base.size != int(parsed.base_size))
            ):
                logger.warning(
                    "docker: the base device has %s of %s; dm.fs/dm.basesize apply "
                    "only to a new pool",
                    base.fs,
                    format_size(Bytes(base.size)),
                )
            self._refuse_another_dockerd(home)
            self._configure_pool(parsed)
            self.options = parsed
            self.home = home
            # A new dockerd: the references of one that was killed are
            # void (Docker counts its own in memory).  Mounts stay until
            # the last Put, a Remove or Cleanup.
            with self.store.transaction(durable=False):
                self.store.set_home(home)
                for row in self.store.all():
                    if row.refs:
                        self.store.set_refs(row.id, 0)
            if home:
                os.makedirs(home, mode=0o700, exist_ok=True)
            self._ensure_base()

    def _refuse_another_dockerd(self, home: str) -> None:
        """One dockerd uses the plugin: another's ``Init`` (another home)
        would void the counts of the layers the first has mounted, and its
        ``Cleanup`` unmount them under the first's containers."""
        held = self.store.home()
        if held is None or held == home:
            return
        mounted = fs.mount_points()
        busy = [r.id for r in self.store.all() if r.refs or self._mount_path(r) in mounted]
        if busy:
            raise DockerError(
                f"the plugin serves the dockerd with home {held or '(none)'}, which has "
                f"{len(busy)} layer(s) mounted ({', '.join(sorted(busy)[:3])}"
                f"{', ...' if len(busy) > 3 else ''}); one dockerd uses a plugin: stop that "
                f"dockerd first (its Cleanup unmounts them), or serve another pool for "
                f"this one"
            )

    def create(
        self, layer_id: str, parent: str, storage_opt: Mapping[str, str] | None = None
    ) -> None:
        """``GraphDriver.Create`` and ``CreateReadWrite``: a snapshot of
        ``parent``'s device, or of the base for ``""``.  The ``size``
        storage option grows the device and its filesystem."""
        _check_id(layer_id)
        size = self._size_option(storage_opt or {})
        with self._lock:
            base = self._ensure_base()
            if size is not None and size < base.size:
                raise DockerError(
                    f"a container's size cannot be smaller than the base device's "
                    f"{format_size(Bytes(base.size))}"
                )
            # The checks and the new row in one transaction: the records
            # are locked once.
            with self.store.transaction():
                if self.store.get(layer_id) is not None:
                    raise DockerError(f"layer {layer_id} already exists")
                origin = base.device if not parent else self._row(parent).device
                row = self.store.insert(layer_id, parent or None)
            crash.point("docker:create:row")
            made = False
            try:
                self.pool.snapshot_device(origin, row.device)
                made = True
                crash.point("docker:create:device")
                if size is not None and size > base.size:
                    self._grow(row.device, size)
            except DeviceExistsError:
                # The name is taken: this call made nothing, and the device
                # in the way is not the plugin's to delete.
                self._undo_create(row, made)
                raise
            except BaseException:
                # A failed snapshot undoes itself; one whose undo failed
                # left a device with the plugin's mark, its own.
                self._undo_create(row, made or self.owner.marked(row.device))
                raise
            with self.store.transaction():
                self.store.set_state(layer_id, LayerState.READY)

    def _size_option(self, storage_opt: Mapping[str, str]) -> int | None:
        size = None
        for key, value in storage_opt.items():
            if key.lower() != "size":
                raise DockerError(f"storage option {key!r} is not supported (only size)")
            try:
                size = int(parse_size(value, what="size"))
            except ValueError as exc:
                raise DockerError(str(exc)) from None
        return size

    def _grow(self, device: str, size: int) -> None:
        self.pool.resize_device(device, size)
        dev = self.pool.device(device)
        # Online, on a mount of its own: offline, e2fsck would put a
        # lost+found into the layer.
        where = self._temp_mount_point("grow", device)
        self._mount(device, where)
        try:
            crash.point("docker:create:grow-mounted")
            fs.grow_filesystem(dev.path)
        finally:
            _umount_syscall(where)
        os.rmdir(where)

    def _undo_create(self, row: LayerRow, made: bool) -> None:
        """Forget a failed create, deleting its device if ``made`` (by
        this call, or proven the plugin's)."""
        try:
            if made:
                self._delete_device(row.device)
        except Exception as exc:
            logger.error("docker: could not delete %s after a failed create: %s", row.device, exc)
            return
        with self.store.transaction():
            self.store.delete(row.id)

    def remove(self, layer_id: str) -> None:
        """``GraphDriver.Remove``: delete the layer's device (a layer that
        does not exist is not an error, as with Docker's own drivers)."""
        with self._lock:
            row = self.store.get(layer_id)
            if row is None:
                return
            if row.refs > 0:
                raise DockerError(
                    f"layer {layer_id} is mounted ({row.refs} Get calls without Put)"
                )
            self._unmount(self._mount_path(row))
            with self.store.transaction():
                self.store.set_state(layer_id, LayerState.REMOVING)
            crash.point("docker:remove:marked")
            self._delete_device(row.device)
            crash.point("docker:remove:deleted")
            # Lost to a power cut, the row is back as removing, its device
            # gone: recovery deletes it.
            with self.store.transaction(durable=False):
                self.store.delete(layer_id)

    def get(self, layer_id: str, mount_label: str = "") -> str:
        """``GraphDriver.Get``: the layer's mounted root."""
        with self._lock:
            row = self._row(layer_id)
            target = self._mount_path(row)
            if not self._is_mounted(target):
                self._mount(row.device, target)
                crash.point("docker:get:mounted")
            with self.store.transaction(durable=False):
                self.store.set_refs(layer_id, row.refs + 1)
            return target

    def put(self, layer_id: str) -> None:
        """``GraphDriver.Put``: drop a reference; the last unmounts."""
        with self._lock:
            row = self._row(layer_id)
            if row.refs <= 0:
                raise DockerError(f"layer {layer_id} is not mounted")
            if row.refs == 1:
                self._unmount(self._mount_path(row))
                try:
                    self.pool.deactivate_device(row.device)
                except DMError as exc:
                    logger.warning("docker: %s stays active: %s", row.device, exc)
            with self.store.transaction(durable=False):
                self.store.set_refs(layer_id, row.refs - 1)

    def exists(self, layer_id: str) -> bool:
        with self._lock:
            row = self.store.get(layer_id)
        return row is not None and row.state in (LayerState.READY, LayerState.APPLYING)

    def status(self) -> list[tuple[str, str]]:
        """``GraphDriver.Status``: the pool's report, as ``docker info``
        shows Docker's devicemapper driver's."""
        info = self.pool.info().as_dict()
        with self._lock:
            base = self.store.base()
            rows = self.store.all()
        if base is not None:
            info["Base Device Size"] = format_size(Bytes(base.size))
            info["Backing Filesystem"] = base.fs
        layers = sum(1 for r in rows if r.state == LayerState.READY)
        return [*info.items(), ("Layers", str(layers))]

    def metadata(self, layer_id: str) -> dict[str, str]:
        """``GraphDriver.GetMetadata``: as Docker's devicemapper driver."""
        with self._lock:
            row = self._row(layer_id)
        dev = self.pool.device(row.device)
        return {
            "DeviceId": str(dev.thin_id),
            "DeviceSize": str(int(dev.size)),
            "DeviceName": dev.dm_name,
        }

    def cleanup(self) -> None:
        """``GraphDriver.Cleanup`` (Docker stops): unmount every layer."""
        with self._lock:
            for row in self.store.all():
                if row.refs or os.path.lexists(self._mount_path(row)):
                    self._unmount(self._mount_path(row))
                    with self.store.transaction(durable=False):
                        self.store.set_refs(row.id, 0)
                    try:
                        self.pool.deactivate_device(row.device)
                    except DMError as exc:
                        logger.warning("docker: %s stays active: %s", row.device, exc)

    # -- the socket ---------------------------------------------------------------

    def record_socket(self, path: str, dev: int, ino: int) -> None:
        """Remember the socket the server made (its identity, for the next run)."""
        with self._lock, self.store.transaction():
            self.store.set_socket(path, dev, ino)
        self.store.set_holder(f"serving on {path}")

    def made_socket(self, path: str, dev: int, ino: int) -> bool:
        """Whether the socket at ``path`` is the one recorded."""
        return self.store.socket() == (path, dev, ino)

    # -- the tar work ---------------------------------------------------------------

    def _held(self, layer_id: str) -> _Held:
        return _Held(self, layer_id)

    def changes(self, layer_id: str, parent: str) -> list[archive.Change]:
        """``GraphDriver.Changes``: Docker's ``ChangesDirs`` of the two layers."""
        with self._held(layer_id) as root:
            if not parent:
                return archive.changes(root, None)
            with self._held(parent) as parent_root:
                return archive.changes(root, parent_root)

    def diff_size(self, layer_id: str, parent: str) -> int:
        """``GraphDriver.DiffSize``: the bytes added or modified over ``parent``."""
        with self._held(layer_id) as root:
            if not parent:
                return archive.changes_size(root, archive.changes(root, None))
            with self._held(parent) as parent_root:
                return archive.changes_size(root, archive.changes(root, parent_root))

    def diff(self, layer_id: str, parent: str, out: IO[bytes]) -> None:
        """``GraphDriver.Diff``: write the layer tar of the layer over ``parent``."""
        with self._held(layer_id) as root:
            if not parent:
                archive.export_changes(root, None, out)
                return
            with self._held(parent) as parent_root:
                archive.export_changes(root, parent_root, out)

    def apply_diff(self, layer_id: str, parent: str, stream: IO[bytes]) -> int:
        """``GraphDriver.ApplyDiff``: unpack a layer tar into the layer.

        While it runs the layer is ``applying``: if the plugin is killed,
        Docker's call has failed and Docker never took the layer, so
        :meth:`recover` deletes it.
        """
        with self._lock:
            row = self._row(layer_id)
            with self.store.transaction():
                self.store.set_state(layer_id, LayerState.APPLYING)
        crash.point("docker:apply:marked")
        try:
            with self._held(layer_id) as root:
                size = archive.apply_layer(root, stream)
                crash.point("docker:apply:unpacked")
                _syncfs(root)  # the layer's data is on the pool before Docker records it
        except OSError as exc:
            # A full pool fails the layer's writes with EIO, or the
            # filesystem turns read-only: say that it is the pool.
            full = self._pool_full()
            if full is None:
                raise
            raise DockerError(f"ApplyDiff of layer {layer_id} failed ({exc}): {full}") from None
        with self._lock, self.store.transaction():
            self.store.set_state(row.id, LayerState.READY)
        return size

    def _pool_full(self) -> str | None:
        """What says the pool is out of space, or ``None`` if it is not."""
        try:
            st = self.pool.status()
        except DMError:
            return None
        if isinstance(st, ThinPoolFailed):
            return None
        data_pct = 100 * int(st.used_data) / max(int(st.total_data), 1)
        meta_pct = 100 * int(st.used_meta) / max(int(st.total_meta), 1)
        if st.mode == "rw" and int(st.free_data) > 0 and data_pct < 99.9 and meta_pct < 99.9:
            return None
        return (
            f"the pool {self.pool.name!r} is full: {data_pct:.1f}% of its data "
            f"({int(st.used_data)} of {int(st.total_data)} blocks) and {meta_pct:.1f}% of "
            f"its metadata used, mode {st.mode}; grow it (libdm pool resize, or libdm "
            f"pool extend for a pool on block devices) or remove images and containers, "
            f"then load or pull again (see libdm pool status)"
        )

    # -- recovery -------------------------------------------------------------------

    def recover(self) -> None:
        """Bring the records and the pool into agreement after a kill:
        layers whose creation, ApplyDiff or removal was cut short are
        deleted (their devices are the plugin's: the records named them
        before they were made), reference counts of mounts a reboot took
        are reset.  Devices named like the plugin's that its records do
        not name are reported and left alone."""
        with self._lock:
            self._clear_temp_mounts()
            mounted = fs.mount_points()
            base = self.store.base()
            if base is not None and not base.ready:
                self._delete_if_marked(base.device, "an unfinished base device")
                with self.store.transaction():
                    self.store.set_base(None)
                base = None
            for row in self.store.all():
                target = self._mount_path(row)
                if row.state != LayerState.READY:
                    logger.warning(
                        "docker: undoing the unfinished %s of layer %s", row.state.value, row.id
                    )
                    try:
                        self._unmount(target)
                        if row.state == LayerState.CREATING:
                            # Its row was written before the device was made.
                            self._delete_if_marked(
                                row.device, f"the unfinished create of {row.id}"
                            )
                        else:
                            # Ready once: the plugin made it.
                            self._delete_device(row.device)
                    except (DMError, DockerError) as exc:
                        # Kept, and tried again at the next start: one
                        # stuck layer must not keep the plugin from serving.
                        logger.error("docker: could not undo layer %s: %s", row.id, exc)
                        continue
                    with self.store.transaction():
                        self.store.delete(row.id)
                elif row.refs and target not in mounted:
                    with self.store.transaction(durable=False):
                        self.store.set_refs(row.id, 0)
                elif not row.refs and target in mounted:
                    try:
                        self._unmount(target)
                    except DockerError as exc:
                        logger.error("docker: %s stays mounted: %s", target, exc)
            known = {r.device for r in self.store.all()}
            if base is not None:
                known.add(base.device)
            for dev in self.pool.devices():
                if dev.name.startswith(PREFIX) and dev.name not in known:
                    logger.warning(
                        "docker: %s is named like the plugin's devices but is not in its "
                        "records; it is left alone",
                        dev.name,
                    )
            for name in os.listdir(self.mount_root):
                path = os.path.join(self.mount_root, name)
                if name not in known and path not in mounted:
                    with contextlib.suppress(OSError):
                        os.rmdir(path)


class _Held:
    """A layer mounted for the plugin's own reading or writing (a ``Get``
    and ``Put`` of its own)."""

    def __init__(self, driver: Driver, layer_id: str) -> None:
        self.driver, self.layer_id = driver, layer_id

    def __enter__(self) -> str:
        return self.driver.get(self.layer_id)

    def __exit__(self, *exc: object) -> None:
        self.driver.put(self.layer_id)
