"""Making new pools: on loop files, block devices, a split device, or by
adopting an existing thin-pool device.

The functions here are :class:`~libdm.Pool`'s constructors
(``Pool.create_loop`` and the others are these, as class methods): each
takes the class it makes first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, Self, TypeVar

from libdm.dm import ops
from libdm.dm.blockdev import BlockDevice, check_unused, open_block_device, signatures
from libdm.dm.errors import DeviceExistsError, Remedy, error_for
from libdm.dm.validate import check_name
from libdm.thin import backing as backings
from libdm.thin import crash
from libdm.thin.config import PoolConfig
from libdm.thin.core import PoolCore
from libdm.thin.errors import (
    REPAIR_HINT,
    DeviceNotBlankError,
    ForeignDeviceError,
    PoolFailedError,
    RefusedError,
    StateError,
)
from libdm.thin.label import RESERVED, DeviceLabel, Role, erase_label, read_label, write_label
from libdm.thin.lock import LOCK_NAME
from libdm.thin.ownership import POOL_UUID_PREFIX
from libdm.thin.statedir import StateDir
from libdm.thin.status import ThinPoolFailed, parse_pool_status
from libdm.thin.store import DB_NAME, STORE_FILES, Store
from libdm.thin.table import FEATURES, ThinPoolParams, check_block_size
from libdm.thin.units import Bytes, Sectors, parse_size

#: The front a constructor returns (:class:`~libdm.Pool`, or a subclass).
P = TypeVar("P", bound="PoolFront")


class PoolFront(Protocol):
    """What a constructor makes of the core it brought up: the pool's front."""

    @classmethod
    def from_core(cls, core: PoolCore) -> Self: ...


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MIN_FREE_SPACE",
    "LOCK_NAME",
    "adopt",
    "check_device",
    "create",
    "create_loop",
    "create_on_device",
]

Size = int | str
Backing = backings.Backing
#: The names of a pool's files, its store first: a directory holding any
#: of them is not claimed for a new pool.
logger = logging.getLogger("libdm")

POOL_FILES = (*STORE_FILES, LOCK_NAME, backings.DATA_FILE, backings.METADATA_FILE)
DEFAULT_BLOCK_SIZE = "64K"
DEFAULT_MIN_FREE_SPACE = 10


def create_loop(
    cls: type[P],
    /,
    name: str,
    directory: str | os.PathLike[str],
    data_size: Size = "100G",
    metadata_size: Size | None = None,
    block_size: Size = DEFAULT_BLOCK_SIZE,
    **options: Any,
) -> P:
    """Create a pool on sparse files in ``directory`` (loop mode).

    The files ``data`` and ``metadata`` are created sparse, attached to
    loop devices with the loop ioctls, and the first 4 KiB of metadata
    is zeroed.  ``directory`` becomes the pool's state directory.

    Args:
        name: the pool's device-mapper name.
        directory: created (mode 0700) if missing.  An existing one is
            used as it is (never chmod'ed): it must be owned by the
            caller, writable by no one else, and hold no pool or
            pool-named files (``state.db``, ``lock``, ``data``,
            ``metadata``...).
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
            directory holds a pool or pool-named files (named).
        StateError: the directory is another user's or others can
            write it.
        PoolReadOnlyError: the directory is on a read-only filesystem.
        DMError: the kernel refused; nothing this call made is left
            behind, and nothing else is touched.
    """
    _check_pool_name(name)
    bs = check_block_size(parse_size(block_size, what="block_size").sectors())
    data = parse_size(data_size, what="data_size")
    if data < bs.bytes():
        raise ValueError(f"data_size {data_size!r} is smaller than one data block")
    meta = (
        backings.default_metadata_size(data, bs)
        if metadata_size is None
        else parse_size(metadata_size, what="metadata_size")
    )
    if meta < Bytes(2 << 20):
        raise ValueError(f"metadata_size {metadata_size!r} is below the 2 MiB minimum")
    _refuse_existing(name)
    config: dict[str, Any] = {"data_size": int(data), "metadata_size": int(meta)}

    def make(statedir: StateDir) -> Backing:
        backing = backings.LoopBacking(statedir)
        backing.make(data, meta)
        return backing

    return _create(cls, name, directory, make, bs, config, options)


def create(
    cls: type[P],
    /,
    name: str,
    data_device: str,
    metadata_device: str,
    *,
    state_dir: str | os.PathLike[str],
    block_size: Size = DEFAULT_BLOCK_SIZE,
    force: bool = False,
    **options: Any,
) -> P:
    """Create a pool on two block devices (direct mode).

    Both devices are checked first: each must be a block device that is
    not in use, and without ``force`` must carry no filesystem,
    partition table, LVM, LUKS or thin-pool signature.  The first 4 KiB
    of the metadata device is zeroed.  As LVM does, the pool sits on
    linear devices ``<name>-tmeta`` and ``<name>-tdata`` over them, so
    it can be extended online later (:meth:`extend`).

    Args:
        name: the pool's device-mapper name.
        data_device, metadata_device: block device paths.
        state_dir: the pool's state directory, as ``directory`` of
            :meth:`create_loop`.
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
        StateError, PoolReadOnlyError: as for :meth:`create_loop`.
    """
    _check_pool_name(name)
    bs = check_block_size(parse_size(block_size, what="block_size").sectors())
    _refuse_existing(name)
    if os.path.realpath(data_device) == os.path.realpath(metadata_device):
        raise ValueError("data_device and metadata_device must be different devices")
    meta, data = (check_device(path, force, "create") for path in (metadata_device, data_device))
    if meta.devno == data.devno:
        raise ValueError(
            f"data_device and metadata_device must be different devices "
            f"({data_device} and {metadata_device} are both {data.devno})"
        )
    _refuse_pieces(name, "create")
    token = uuidlib.uuid4().hex  # names the pool's devices' uuids and labels
    start = int(RESERVED)

    def make(statedir: StateDir) -> Backing:
        try:
            for path, role in ((metadata_device, Role.META), (data_device, Role.DATA)):
                write_label(path, DeviceLabel(token, name, statedir.path, role, 0))
            _zero_head(metadata_device, offset=int(RESERVED.bytes()))
            return backings.LinearBacking.new(
                name, [[metadata_device, start, None]], [[data_device, start, None]], token
            )
        except BaseException:
            _erase_labels((metadata_device, data_device), token)
            raise

    return _create(cls, name, state_dir, make, bs, {"token": token}, options)


def create_on_device(
    cls: type[P],
    /,
    name: str,
    device: str,
    thinp_percent: int = 95,
    thinp_metapercent: int = 1,
    force: bool = False,
    *,
    state_dir: str | os.PathLike[str],
    block_size: Size = DEFAULT_BLOCK_SIZE,
    **options: Any,
) -> P:
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
    _check_pool_name(name)
    bs = check_block_size(parse_size(block_size, what="block_size").sectors())
    _refuse_existing(name)
    _refuse_pieces(name, "create_on_device")
    dev = check_device(device, force, "create_on_device")
    layout = backings.split_layout(
        Bytes(dev.size).sectors(), bs, thinp_percent, thinp_metapercent, reserved=RESERVED
    )
    meta_start, meta_len, data_start, data_len = (int(v) for v in layout)
    token = uuidlib.uuid4().hex  # names the pool's devices' uuids and labels

    def make(statedir: StateDir) -> Backing:
        try:
            write_label(device, DeviceLabel(token, name, statedir.path, Role.META, 0))
            _zero_head(device, offset=int(layout[0].bytes()))
            return backings.LinearBacking.new(
                name, [[device, meta_start, meta_len]], [[device, data_start, data_len]], token
            )
        except BaseException:
            _erase_labels((device,), token)
            raise

    return _create(cls, name, state_dir, make, bs, {"token": token}, options)


def adopt(
    cls: type[P], /, pool_device_name: str, *, state_dir: str | os.PathLike[str], **options: Any
) -> P:
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
        ForeignDeviceError: it is another libdm pool's device (named, and
            its state directory for a loop pool).
        DeviceExistsError, StateError, PoolReadOnlyError: the state
            directory, as for :meth:`create_loop`.
    """
    _check_pool_name(pool_device_name)
    table = ops.table(pool_device_name)
    if len(table) != 1 or table[0].type != "thin-pool":
        raise RefusedError(
            errno.EINVAL,
            f"{pool_device_name} is not a thin-pool device "
            f"(its table is {', '.join(str(t) for t in table) or 'empty'})",
            "adopt",
            pool_device_name,
        )
    params = ThinPoolParams.parse(table[0].params)
    st = parse_pool_status(ops.status(pool_device_name)[0].params)
    if st.failed:
        raise PoolFailedError(
            f"pool {pool_device_name} has failed ({st}); {REPAIR_HINT}",
            "adopt",
            pool_device_name,
        )
    if st.transaction_id != 0 or st.used_data != 0:
        raise StateError(
            f"pool {pool_device_name} is in use (transaction id {st.transaction_id}, "
            f"{int(st.used_data)} data blocks used); libdm adopts only unused pools, "
            f"so that it never disturbs another owner's transactions",
            "adopt",
            pool_device_name,
        )
    uuid = ops.info(pool_device_name).uuid or ""
    if uuid.startswith(POOL_UUID_PREFIX):
        # Another libdm pool: its transaction ids are its owner's, which an
        # adopter's first device would move.
        home = _loop_pool_directory(params)
        where = f"its state is in {home}" if home else "its state is in another directory"
        raise ForeignDeviceError(
            f"pool {pool_device_name} is the pool device of a libdm pool (uuid {uuid!r}; "
            f"{where}); libdm adopts only pools other programs made: open that pool "
            f"instead",
            "adopt",
            pool_device_name,
        )
    options = dict(options)
    options.setdefault("low_water_mark", int(params.low_water_mark))
    options.setdefault("features", sorted(params.features))
    return _create(
        cls,
        pool_device_name,
        state_dir,
        lambda _: backings.AdoptedBacking(),
        params.block_size,
        {},
        options,
        uuid=uuid,
    )


def _check_pool_name(name: str) -> None:
    """A valid device-mapper name whose ``/dev/mapper`` path is the pool's.

    Raises:
        ValueError: not a valid name, or ``control`` (``/dev/mapper/control``
            is device-mapper's own control node, not a device).
    """
    check_name(name)
    if name == "control":
        raise ValueError(
            "a pool cannot be named 'control': /dev/mapper/control is device-mapper's "
            "control node, so the pool's path would name another device"
        )


def _loop_pool_directory(params: ThinPoolParams) -> str | None:
    """The directory of a loop pool's data file (its state directory), as
    the data loop device's sysfs entry says; ``None`` if not a loop."""
    try:
        with open(f"/sys/dev/block/{params.data_dev}/loop/backing_file") as f:
            backing_file = f.read().strip()
    except OSError:
        return None
    return os.path.dirname(backing_file) or None


def _refuse_existing(name: str) -> None:
    if ops.exists(name):
        raise DeviceExistsError(
            errno.EEXIST, f"a device named {name!r} exists already", "create", name
        )


def _refuse_pieces(name: str, operation: str) -> None:
    """The linear pieces ``<name>-tmeta`` / ``-tdata`` must be free names."""
    for piece in (f"{name}-tmeta", f"{name}-tdata"):
        check_name(piece)
        if ops.exists(piece):
            raise error_for(
                errno.EEXIST,
                operation,
                piece,
                message=f"a device named {piece!r} exists already",
            )


def check_device(path: str, force: bool, operation: str) -> BlockDevice:
    """A block device a pool may be made on (or extended by): not in use,
    and without ``force`` carrying no signature and no libdm pool's label.

    Raises:
        FileNotFoundError, ValueError: no such block device.
        DeviceBusyError: in use.
        DeviceNotBlankError: a signature or another pool's label (named),
            without ``force``.
    """
    try:
        dev = open_block_device(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such block device", path) from None
    check_unused(path)
    label = read_label(path)
    if label is not None and not force:
        raise DeviceNotBlankError(f"{path} is {label}", operation, path).advise(
            Remedy("force", "uses it anyway (that pool's data on it will be lost)")
        )
    found = signatures(path)
    if found and not force:
        raise DeviceNotBlankError(f"{path} holds {' and '.join(found)}", operation, path).advise(
            Remedy("force", "uses it anyway (its contents will be lost)")
        )
    return dev


def _create(
    cls: type[P],
    /,
    name: str,
    directory: str | os.PathLike[str],
    make: Callable[[StateDir], Backing],
    block_size: Sectors,
    config: Mapping[str, Any],
    options: Mapping[str, Any],
    uuid: str | None = None,
) -> P:
    """Make a pool: check the options, claim the state directory
    (:meth:`StateDir.claim`), create the store, ``make(statedir)`` the
    backing, record it all, and bring the pool up.  On failure, exactly
    what this call made is removed."""
    record, lock_timeout = _pool_options(block_size, options)
    record.update(config)
    _take_back_interrupted(directory)
    statedir = StateDir.claim(directory, POOL_FILES)
    store: Store | None = None
    backing: Backing | None = None
    core: PoolCore | None = None
    try:
        store = Store(statedir, create=True)
        if "data_size" in config and "metadata_size" in config:
            # What a kill inside make() leaves is then known as its own.
            with store.transaction():
                store.record_making_files(
                    {
                        backings.DATA_FILE: int(config["data_size"]),
                        backings.METADATA_FILE: int(config["metadata_size"]),
                    }
                )
        backing = make(statedir)
        made_files = backing.config().get("file_inodes")
        if made_files:
            with store.transaction():
                store.record_made_files(made_files)
        crash.point("pool:made")
        # Whether destroy(remove_files=True) may remove the directory.
        record["made_directory"] = statedir.made
        # Refuses what it cannot read.
        pool_config = PoolConfig.from_record(record, "the new configuration").with_backing(
            **backing.config()
        )
        # The pool row goes in before the device exists: a crash from
        # here on leaves a pool that Pool.open finishes bringing up.
        store.init_pool(
            name,
            uuid if uuid is not None else f"LIBDM-POOL-{uuidlib.uuid4().hex}",
            backing.kind,
            pool_config,
        )
        core = PoolCore(statedir.path, lock_timeout=lock_timeout, store=store)
        with core.changing("create"):
            if backing.capabilities.owns_devices:
                core.activate_pool("create")
            crash.point("pool:created")
            st = core.status()
            if not isinstance(st, ThinPoolFailed):
                with store.transaction():
                    store.set_transaction_id(st.transaction_id)
        return cls.from_core(core)
    except BaseException:
        pieces = None if backing is None else backing.pieces()
        if pieces is not None:
            pieces.erase_labels()  # the devices are not this pool's after all
        if (
            core is not None
            and backing is not None
            and backing.capabilities.owns_devices
            and _made_live(core)
        ):
            ops.remove(name)
        if backing is not None:
            backing.teardown()
        if core is not None:
            core.lock.close()
        if store is not None:
            store.close(remove_made=True)
        else:
            statedir.close(remove_made=True)
        raise


def _take_back_interrupted(directory: str | os.PathLike[str]) -> None:
    """Take back what a creation killed before it recorded its pool left
    in ``directory``: its store, which records no pool, and the loop files
    it recorded making (by inode).  Nothing was made in the kernel then:
    the pool row goes in before the pool device.

    Raises:
        DeviceExistsError: a pool file there that the store does not
            prove the creation's (named); nothing is removed.
    """
    path = os.path.abspath(directory)
    try:
        os.stat(os.path.join(path, DB_NAME), follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return
    statedir = StateDir.open(path, operation="create")
    try:
        made: dict[str, int] = {}
        making: dict[str, int] = {}
        if not Store.blank(statedir):  # blank: killed before anything else was made
            store = Store(statedir)
            try:
                if store.records_pool():
                    return  # a pool: the claim refuses it, saying so
                made, making = store.made_files(), store.making_files()
            finally:
                store.close_db()
        unproven = [
            statedir.join(name)
            for name in (backings.DATA_FILE, backings.METADATA_FILE)
            if not _its_own(statedir, name, made.get(name), making.get(name))
        ]
        if unproven:
            raise DeviceExistsError(
                errno.EEXIST,
                f"{path} holds the store of a pool creation that was interrupted, and "
                f"files it does not record making: {', '.join(unproven)}; libdm will not "
                f"remove them: move them away, then run the creation again",
                "create",
                path,
            )
        logger.warning(
            "%s: taking back what an interrupted pool creation left (%s)",
            path,
            ", ".join(n for n in POOL_FILES if statedir.lstat(n) is not None),
        )
        for name in reversed(POOL_FILES):
            statedir.unlink(name)
    finally:
        statedir.close()


def _its_own(statedir: StateDir, name: str, inode: int | None, size: int | None) -> bool:
    """Whether pool file ``name`` is absent or proven made by the
    interrupted creation: the inode it recorded, or (killed before it
    recorded one) a file of the size it recorded it would make (or still
    empty), with nothing in it but the zeros a creation writes at its
    head."""
    st = statedir.lstat(name)
    if st is None:
        return True
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    if inode is not None:
        return st.st_ino == inode
    if size is None or st.st_size not in (0, size) or st.st_blocks * 512 > 8192:
        return False
    fd = statedir.open_file(name, os.O_RDONLY, "create", f"{name} file")
    try:
        return not any(os.pread(fd, 8192, 0))
    finally:
        os.close(fd)


def _made_live(core: PoolCore) -> bool:
    """True if the pool device this creation made is live (a device of its
    name made by another, in the meantime, is not: it stays)."""
    try:
        return core.pool_is_live("create")
    except ForeignDeviceError:
        return False


def _pool_options(block_size: Sectors, options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
    """The stored configuration from a constructor's keyword options, and
    ``lock_timeout`` (which is not stored).

    Raises:
        ValueError: a bad feature or ``min_free_space``.
        TypeError: an unknown option.
    """
    left = dict(options)
    lock_timeout = float(left.pop("lock_timeout", 30.0))
    features: list[str] = sorted(set(left.pop("features", ())))
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise ValueError(
            f"unknown thin-pool feature {', '.join(unknown)}; known: {', '.join(FEATURES)}"
        )
    lwm = int(left.pop("low_water_mark", 0))
    min_free = left.pop("min_free_space", DEFAULT_MIN_FREE_SPACE)
    if not 0 <= min_free < 100:
        raise ValueError(f"min_free_space must be a percentage from 0 to 99, got {min_free}")
    record: dict[str, Any] = {
        "block_size": int(block_size),
        "low_water_mark": lwm,
        "features": features,
        "min_free_space": min_free,
        "deferred_removal": bool(left.pop("deferred_removal", True)),
        "deferred_deletion": bool(left.pop("deferred_deletion", True)),
        "base_device": None,
        "token": uuidlib.uuid4().hex,  # names this pool's thin devices' uuids
    }
    if left:
        raise TypeError(f"unknown option {', '.join(sorted(left))}")
    return record, lock_timeout


def _erase_labels(paths: Iterable[str], token: str) -> None:
    """Take back the labels a failed creation wrote (only its own)."""
    for path in paths:
        with contextlib.suppress(OSError):
            erase_label(path, token)


def _zero_head(path: str, offset: int = 0, length: int = 4096) -> None:
    """Zero ``length`` bytes at ``offset`` of a device (new metadata must
    start zeroed, or the kernel may take stale bytes for a superblock)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
