"""Where a pool's data and metadata live, and how to bring them up.

Each backing knows how to produce the two block devices a ``thin-pool``
table names, how to describe itself for the pool report, and what to
tear down.  The pool does not care which one it has, so any block device
can back a pool (a file through a loop device, a disk, a partition, an
LVM volume, another device-mapper device).

* :class:`LoopBacking`: sparse files in the state directory, attached to
  loop devices (the guide's loop-lvm mode, the embedded default).
* :class:`LinearBacking`: block devices under ``<pool>-tmeta`` and
  ``<pool>-tdata`` linear devices: two devices given by the caller, or one
  raw device split by ``thinp_percent`` / ``thinp_metapercent`` (the
  guide's ``dm.directlvm_device``), extended later by more devices.
* :class:`AdoptedBacking`: an existing thin-pool device (``dm.thinpooldev``);
  libdm does not own its devices.

Each implements :class:`Backing`; callers ask it what it can do (its
:class:`Capabilities`, and :meth:`Backing.files` or :meth:`Backing.pieces`
for the operations only files or linear pieces have), never which class
it is, as LVM asks a segment type's handler table.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Protocol

from libdm.dm import loop, ops
from libdm.dm.blockdev import LOOP_MAJOR, loop_status, open_block_device, signatures
from libdm.dm.errors import NoSuchDeviceError, RemedyCall
from libdm.dm.target import Target
from libdm.thin import crash, ownership
from libdm.thin.config import (
    BackingChanges,
    FieldCheck,
    PoolConfig,
    PoolKind,
    RecordedDevice,
    Segment,
    bad_devices,
    bad_inodes,
    bad_segments,
)
from libdm.thin.errors import ForeignDeviceError, StateError
from libdm.thin.label import RESERVED, erase_label, find_labelled, read_label
from libdm.thin.store import DB_NAME
from libdm.thin.units import Bytes, Sectors, format_size

if TYPE_CHECKING:
    from libdm.thin.statedir import StateDir

__all__ = [
    "CAPABILITIES",
    "AdoptedBacking",
    "Backing",
    "Capabilities",
    "Description",
    "LinearBacking",
    "LoopBacking",
    "RecordedDevice",
    "Segment",
    "default_metadata_size",
    "from_config",
    "record_devices",
    "segment_changes",
    "split_layout",
]

logger = logging.getLogger("libdm")

DATA_FILE = "data"
METADATA_FILE = "metadata"


class Description(NamedTuple):
    """What the pool report says of a backing (``docker info``'s ``Data
    file`` and ``Metadata file``)."""

    data_file: str
    metadata_file: str


@dataclass(frozen=True)
class Capabilities:
    """What a kind of backing can do: the table callers consult instead of
    asking which kind a pool is (see :data:`CAPABILITIES`).

    Attributes:
        owns_devices: libdm made the pool's device and what is under it,
            so it brings them up, checks them against its records and
            removes them; False for an adopted pool, which is its owner's.
        resizable: grows by size (:meth:`~libdm.Pool.resize`): files.
        extendable: grows by added block devices
            (:meth:`~libdm.Pool.extend`) or by its devices growing
            (:meth:`~libdm.Pool.refresh`).
        discard_by_default: discards a device's blocks on delete unless
            configured otherwise: a loop pool then gets its space back as
            holes in its data file.
        growth_hint: how to grow such a pool, for a refusal.
    """

    owns_devices: bool
    resizable: bool
    extendable: bool
    discard_by_default: bool
    growth_hint: str


class Backing(Protocol):
    """What a pool asks of its backing, whichever it is.

    Operations that only one kind has are reached through an accessor that
    is ``None`` where the backing cannot do them: :meth:`files` (sized
    files that grow) and :meth:`pieces` (linear pieces extended by
    segments).
    """

    kind: ClassVar[PoolKind]
    capabilities: ClassVar[Capabilities]

    def config(self) -> BackingChanges:
        """The backing's fields of the pool's stored configuration."""
        ...

    def attach(self) -> _Devices:
        """The pool's metadata and data devices, brought up."""
        ...

    def describe(self) -> Description:
        """What the pool report says of it."""
        ...

    def report(self, devnos: Callable[[], tuple[str, str] | None]) -> Report:
        """The report's device fields; ``devnos()`` reads the ``(data,
        metadata)`` devices the live pool's table names (``None``: not
        live), for a backing that needs them."""
        ...

    def teardown(self) -> None:
        """Take down what :meth:`attach` made that does not go by itself."""
        ...

    def backing_filesystem_dir(self) -> str | None:
        """The directory whose filesystem holds the pool, if files do."""
        ...

    def piece_names(self) -> list[str]:
        """The device-mapper devices libdm made under the pool device."""
        ...

    def data_sectors(self) -> Sectors:
        """The size of the data device this backing maps."""
        ...

    def metadata_growth(self, want: Bytes) -> str | RemedyCall:
        """How to grow the metadata to ``want``, for a refusal: a call of
        the pool, or words where no call of it does."""
        ...

    def check_removable(self, operation: str = "destroy") -> None:
        """Refuse, before anything is removed, what removing the pool's
        files would remove that is not the pool's."""
        ...

    def remove_files(self) -> None:
        """Remove the files the pool made in its state directory."""
        ...

    def files(self) -> LoopBacking | None:
        """The pool's sized files, when it sits on files."""
        ...

    def pieces(self) -> LinearBacking | None:
        """The pool's linear pieces, when it sits on block devices."""
        ...


class Report(NamedTuple):
    """The device fields of the pool report: the devices (for a loop pool
    the loop devices) and, for a loop pool, the files behind them."""

    data_file: str
    metadata_file: str
    data_loop_file: str | None = None
    metadata_loop_file: str | None = None


class _Device(Protocol):
    """One of the pool's two devices, as its table names it."""

    @property
    def path(self) -> str: ...
    @property
    def devno(self) -> str: ...
    @property
    def size(self) -> int: ...


class _Closable(Protocol):
    def close(self) -> None: ...


def exists_live(name: str) -> bool:
    """True if device ``name`` exists with a live table.

    A device without one is what a create killed between its create and
    load ioctls leaves behind; it is removed here, so the caller makes it
    afresh.
    """
    try:
        info = ops.info(name)
    except NoSuchDeviceError:
        return False
    if info.live_table:
        return True
    ops.remove(name)
    return False


class _Devices:
    """The pool's two devices while they are being used to load a table.

    ``meta`` and ``data`` have ``path``, ``devno`` and ``size`` (bytes).
    Loop handles are closed on exit; by then the pool holds the loops.
    """

    def __init__(self, meta: _Device, data: _Device, handles: Iterable[_Closable] = ()) -> None:
        self.meta, self.data, self._handles = meta, data, tuple(handles)

    def __enter__(self) -> _Devices:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        for h in self._handles:
            h.close()
        return False


class LoopBacking:
    """Sparse data and metadata files in the state directory, on loop devices.

    The files are reached through the directory's descriptor and never
    through a symlink (see :class:`~libdm.thin.statedir.StateDir`), and
    must be the files the pool was made with: their inode numbers are
    recorded at creation (``file_inodes``) and checked before each use, so
    a file deleted or replaced while the pool was down is refused rather
    than attached.  Stores written before that record skip the check.
    """

    kind: ClassVar[PoolKind] = PoolKind.LOOP
    capabilities: ClassVar[Capabilities] = Capabilities(
        owns_devices=True,
        resizable=True,
        extendable=False,
        discard_by_default=True,
        growth_hint="grow it with resize()",
    )

    def __init__(
        self,
        statedir: StateDir,
        inodes: Mapping[str, int] | None = None,
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.statedir = statedir
        # The recorded sizes: a file found shorter was cut by someone else,
        # and the pool's table would not fit it.
        self.recorded_sizes: dict[str, int] = dict(sizes or {})
        self.directory = statedir.path
        self.data_file = statedir.join(DATA_FILE)
        self.metadata_file = statedir.join(METADATA_FILE)
        self.inodes: dict[str, int] | None = None if inodes is None else dict(inodes)

    def config(self) -> BackingChanges:
        """The backing's fields of the pool's stored configuration."""
        config: BackingChanges = {"data_file": DATA_FILE, "metadata_file": METADATA_FILE}
        if self.inodes is not None:
            config["file_inodes"] = dict(self.inodes)
        return config

    def make(self, data_size: Bytes, metadata_size: Bytes) -> None:
        """Create both sparse files (refusing any that exists); zero the
        first 4 KiB of metadata; record their inodes."""
        inodes: dict[str, int] = {}
        for name, size in ((DATA_FILE, data_size), (METADATA_FILE, metadata_size)):
            fd = self.statedir.make_file(name, "create", f"{name} file")
            try:
                os.ftruncate(fd, int(size))
                if name == METADATA_FILE:
                    os.pwrite(fd, bytes(4096), 0)
                os.fsync(fd)
                inodes[name] = os.fstat(fd).st_ino
            finally:
                os.close(fd)
        self.inodes = inodes

    def _check(self, name: str, operation: str = "open") -> os.stat_result:
        """The stat of the pool's file ``name`` (see :meth:`_identify`).

        Raises:
            StateError: missing, a symlink, not a regular file of the
                caller's, or another file than the one recorded.
        """
        st = self.statedir.check_file(name, operation, f"{name} file")
        if st is None:
            raise StateError(
                f"the pool's {name} file {self.statedir.join(name)} is missing; "
                f"libdm will not bring the pool up without it",
                operation,
                None,
            )
        return self._identify(name, st, operation)

    def _identify(self, name: str, st: os.stat_result, operation: str) -> os.stat_result:
        """``st`` if it is the file the pool made: its recorded inode, on the
        directory's filesystem.  The device number itself is not recorded:
        it may change across reboots (dm-N, NVMe and loop numbering)."""
        recorded = (self.inodes or {}).get(name)
        home = os.fstat(self.statedir.fd).st_dev
        if (recorded is not None and st.st_ino != recorded) or st.st_dev != home:
            raise StateError(
                f"the pool's {name} file {self.statedir.join(name)} was replaced: it is "
                f"inode {st.st_ino} on device {st.st_dev}, the pool made inode {recorded} "
                f"on the directory's device {home}; libdm will not attach another file in "
                f"its place",
                operation,
                None,
            )
        return st

    def attach(self) -> _Devices:
        """Loop devices for both files, checked first (see :meth:`_check`),
        and refused when shorter than recorded (cut outside libdm)."""
        for name in (METADATA_FILE, DATA_FILE):
            st = self._check(name)
            recorded = self.recorded_sizes.get(name)
            if recorded is not None and st.st_size < recorded:
                raise StateError(
                    f"the pool's {name} file {self.statedir.join(name)} is "
                    f"{format_size(Bytes(st.st_size))}, shorter than the "
                    f"{format_size(Bytes(recorded))} the pool recorded: it was cut outside "
                    f"libdm, and the pool's blocks past its end are gone from it; libdm "
                    f"will not attach it (restore the file from a backup)",
                    "open",
                    None,
                )
        meta = loop.attach_or_find(self.metadata_file, follow_symlinks=False)
        try:
            data = loop.attach_or_find(self.data_file, follow_symlinks=False)
        except BaseException:
            meta.close()
            raise
        return _Devices(meta, data, (meta, data))

    def describe(self) -> Description:
        """The files, for the pool report."""
        return Description(self.data_file, self.metadata_file)

    def report(self, devnos: Callable[[], tuple[str, str] | None]) -> Report:
        """As ``docker info``: the loop devices, then the files behind them.

        The live pool's table names the two loop devices, so only those
        are asked (by the backing file's identity, ``LOOP_GET_STATUS64``);
        every loop device is examined only when the table names none.
        """
        live = devnos()
        hints: tuple[str | None, str | None] = (None, None) if live is None else live
        return Report(
            self._loop_device(DATA_FILE, hints[0]),
            self._loop_device(METADATA_FILE, hints[1]),
            self.data_file,
            self.metadata_file,
        )

    def _loop_device(self, name: str, devno: str | None) -> str:
        """The loop device holding the pool's file ``name`` (the whole
        file), or ``""``."""
        path = self.statedir.join(name)
        try:
            st = os.lstat(path)  # never through a symlink
        except OSError:
            return ""
        if not stat.S_ISREG(st.st_mode):
            return ""
        if devno is not None:
            held = _loop_holding(devno, (st.st_dev, st.st_ino))
            if held is not None:
                return held
        dev = loop.find(path, follow_symlinks=False)
        if dev is None:
            return ""
        with dev:
            return dev.path

    def piece_names(self) -> list[str]:
        """None: the loop devices are not device-mapper devices."""
        return []

    def data_sectors(self) -> Sectors:
        """The recorded data file size."""
        size = self.recorded_sizes.get(DATA_FILE)
        # Whole sectors: a file of any size maps that many.
        return Bytes(int(self.sizes()[0] if size is None else size)).whole_sectors()

    def metadata_growth(self, want: Bytes) -> str | RemedyCall:
        """The resize that grows the metadata file first."""
        return RemedyCall(
            "resize",
            "grows it first",
            self.directory,
            (("metadata_size", format_size(want)),),
        )

    def files(self) -> LoopBacking:
        """Itself: the pool sits on files."""
        return self

    def pieces(self) -> None:
        """None: no linear pieces."""
        return None

    def sizes(self) -> tuple[Bytes, Bytes]:
        """(data, metadata) file sizes in ``Bytes``."""
        return (
            Bytes(self._check(DATA_FILE, "resize").st_size),
            Bytes(self._check(METADATA_FILE, "resize").st_size),
        )

    def grow(self, data_size: Bytes | None = None, metadata_size: Bytes | None = None) -> None:
        """Grow the files to the given ``Bytes`` (``None``: unchanged) and
        make their loop devices follow (LOOP_SET_CAPACITY).

        Raises:
            ValueError: a size below the current one (shrinking would cut
                off blocks the pool has handed out).
            StateError: a file is missing, a symlink or was replaced.
        """
        wanted = [
            (name, size)
            for name, size in ((DATA_FILE, data_size), (METADATA_FILE, metadata_size))
            if size is not None
        ]
        for name, size in wanted:
            current = self._check(name, "resize").st_size
            if int(size) < current:
                raise ValueError(
                    f"{name} cannot shrink: it is {format_size(Bytes(current))}, asked "
                    f"{format_size(size)} (a thin pool only grows)"
                )
        for name, size in wanted:
            self._set_file_size(name, int(size))

    def undo_growth(self, data_size: Bytes, metadata_size: Bytes) -> None:
        """Shrink the files back to the sizes they had before a growth that
        was rolled back (the caller has checked that the kernel maps no
        more than these sizes), and make their loop devices follow."""
        for name, size in ((DATA_FILE, data_size), (METADATA_FILE, metadata_size)):
            if self._check(name, "resize").st_size > int(size):
                self._set_file_size(name, int(size))

    def _set_file_size(self, name: str, size: int) -> None:
        fd = self.statedir.open_file(name, os.O_WRONLY, "resize", f"{name} file")
        try:
            if size != self._identify(name, os.fstat(fd), "resize").st_size:
                os.ftruncate(fd, size)
                os.fsync(fd)
        finally:
            os.close(fd)
        crash.point("grow:truncated")
        # Even when the file had the size already: a process killed between
        # the truncate and this leaves the loop device behind its file.
        dev = loop.find(self.statedir.join(name), follow_symlinks=False)
        if dev is not None:
            with dev:
                if dev.size != int(Bytes(size).whole_sectors().bytes()):
                    loop.refresh_capacity(dev)

    def teardown(self) -> None:
        """Nothing: the loops are autoclear and go with the pool."""

    def check_removable(self, operation: str = "destroy") -> None:
        """Refuse before removing anything if a file in the place of the
        pool's data or metadata file is not the one the pool made (see
        :meth:`_identify`); missing files are fine.

        Raises:
            StateError: naming each such file; it is not removed.
        """
        foreign = []
        for name in (DATA_FILE, METADATA_FILE):
            try:
                st = self.statedir.check_file(name, operation, f"{name} file")
                if st is not None:
                    self._identify(name, st, operation)
            except StateError:
                foreign.append(self.statedir.join(name))
        if foreign:
            raise StateError(
                f"{' and '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not the "
                f"pool's (another inode than the pool made, or not a regular file of the "
                f"caller's); libdm removes only its own files, so it removed nothing: move "
                f"{'it' if len(foreign) == 1 else 'them'} away and destroy again",
                operation,
                None,
            )

    def remove_files(self) -> None:
        """Remove the pool's two files (never what a symlink points to),
        only if both are the files the pool made (:meth:`check_removable`)."""
        self.check_removable()
        for name in (DATA_FILE, METADATA_FILE):
            self.statedir.unlink(name)

    def backing_filesystem_dir(self) -> str | None:
        """The directory whose filesystem holds the pool's files."""
        return self.directory


class LinearBacking:
    """Block devices under ``<pool>-tmeta`` and ``<pool>-tdata`` linear
    devices, as LVM builds its thin pools.

    Each side is a list of :class:`Segment` ``(path, start, length)``
    (sectors; a length of ``None`` means "to the end of the device", so a
    device that grows is picked up by a refresh).  The linear devices concatenate them
    in order, so the pool's data device can be extended online by
    appending a segment: the pool keeps the same data device while that
    device grows, which the kernel allows (it refuses to swap a live
    pool's data device for another).

    A repair (:mod:`libdm.thin.repair`) adds two more lists of segments,
    both the pool's own and never allocated to anything else: the spare
    its metadata is repaired into (``spare_segments``), and the metadata
    segments earlier repairs swapped out, kept with the damaged copies
    (``damaged_meta_segments``).
    """

    kind: ClassVar[PoolKind] = PoolKind.BLOCK
    capabilities: ClassVar[Capabilities] = Capabilities(
        owns_devices=True,
        resizable=False,
        extendable=True,
        discard_by_default=False,
        growth_hint="grow it with extend(device), or grow its devices and call refresh()",
    )

    def __init__(
        self,
        pool_name: str,
        meta_segments: Iterable[Sequence[Any]],
        data_segments: Iterable[Sequence[Any]],
        meta_devices: Iterable[RecordedDevice] | None = None,
        data_devices: Iterable[RecordedDevice] | None = None,
        spare_segments: Iterable[Sequence[Any]] | None = None,
        damaged_meta_segments: Iterable[Sequence[Any]] | None = None,
        token: str | None = None,
        spare_devices: Iterable[RecordedDevice] | None = None,
    ) -> None:
        self.pool_name = pool_name
        # Names the uuids of the pieces (see ownership.piece_uuid) and the
        # labels of its devices (see libdm.thin.label).
        self.token = token
        # Labelled devices found under another path than recorded.
        self.moved: dict[str, str] = {}
        self.meta_segments = [Segment.of(seg) for seg in meta_segments]
        self.data_segments = [Segment.of(seg) for seg in data_segments]
        self.spare_segments = [Segment.of(seg) for seg in spare_segments or ()]
        self.damaged_meta_segments = [Segment.of(seg) for seg in damaged_meta_segments or ()]
        self.meta_devices = _recorded(meta_devices)
        self.data_devices = _recorded(data_devices)
        # What was recorded of the spare's devices (None: an older record).
        self.spare_devices = _recorded(spare_devices)
        self.meta_name = f"{pool_name}-tmeta"
        self.data_name = f"{pool_name}-tdata"

    @classmethod
    def new(
        cls,
        pool_name: str,
        meta_segments: Sequence[Sequence[Any]],
        data_segments: Sequence[Sequence[Any]],
        token: str | None = None,
    ) -> LinearBacking:
        """A backing for a new pool, recording each segment's device and its
        size now, so that a later open can tell another device under the
        same name (see :meth:`table`)."""
        return cls(
            pool_name,
            meta_segments,
            data_segments,
            record_devices(meta_segments, token),
            record_devices(data_segments, token),
            token=token,
        )

    def _pieces(
        self,
    ) -> list[tuple[str, str | None, list[Segment], list[RecordedDevice] | None]]:
        """``(name, uuid, segments, recorded devices)`` of ``-tmeta`` then
        ``-tdata``; the uuid is ``None`` for a backing built without the
        pool's token."""
        return [
            (
                name,
                None if self.token is None else ownership.piece_uuid(self.token, piece),
                segments,
                devices,
            )
            for name, piece, segments, devices in (
                (self.meta_name, "tmeta", self.meta_segments, self.meta_devices),
                (self.data_name, "tdata", self.data_segments, self.data_devices),
            )
        ]

    def _prove(
        self,
        name: str,
        uuid: str | None,
        table: Sequence[Target] | None,
        operation: str,
    ) -> ownership.Live | None:
        """The live piece ``name`` once proven the pool's (see
        :func:`~libdm.thin.ownership.live_piece`): ``table`` is what the
        record maps (``None``: not known), which a piece made before pieces
        had uuids must carry exactly.  Without a token (a backing built
        outside a pool) only a piece with that exact table is accepted."""
        devices = None if table is None else frozenset(t.params.split()[0] for t in table)
        return ownership.live_piece(
            name,
            uuid or "",
            self.pool_name,
            operation,
            devices=devices,
            unmarked=table,
        )

    def config(self) -> BackingChanges:
        """The backing's fields of the pool's stored configuration."""
        return self._fields(lambda path: path)

    def _fields(self, where: Callable[[str], str]) -> BackingChanges:
        """The backing's fields, each device's path mapped by ``where``:
        the recorded devices (``None``: not recorded, an older store) and
        the repair's segments (none: not stored)."""

        def segs(segments: list[Segment]) -> list[Segment]:
            return [s._replace(path=where(s.path)) for s in segments]

        def devs(devices: list[RecordedDevice] | None) -> list[RecordedDevice] | None:
            return None if devices is None else [d._replace(path=where(d.path)) for d in devices]

        fields: BackingChanges = {
            "meta_segments": segs(self.meta_segments),
            "data_segments": segs(self.data_segments),
        }
        if self.meta_devices is not None:
            fields["meta_segment_devices"] = devs(self.meta_devices)
        if self.data_devices is not None:
            fields["data_segment_devices"] = devs(self.data_devices)
        if self.spare_devices is not None:
            fields["spare_segment_devices"] = devs(self.spare_devices)
        if self.spare_segments:
            fields["spare_segments"] = segs(self.spare_segments)
        if self.damaged_meta_segments:
            fields["damaged_meta_segments"] = segs(self.damaged_meta_segments)
        return fields

    def paths(self) -> list[str]:
        """Every device path the pool uses."""
        return [seg.path for seg in self.meta_segments + self.data_segments]

    @staticmethod
    def table(
        segments: Iterable[Sequence[Any]],
        devices: Sequence[RecordedDevice] | None = None,
        *,
        token: str | None = None,
        moved: dict[str, str] | None = None,
    ) -> list[Target]:
        """The linear table for ``segments``: starts by sector math.

        Args:
            segments: :class:`Segment` values (or their stored
                ``[path, start, length]`` lists).
            devices: what was recorded of the segments' devices (one
                :class:`RecordedDevice` per segment, in order), or ``None``.
                A segment with no record (an old store, or one added later)
                is only checked to fit.
            token: the pool's token: a recorded device that carries the
                pool's label is found by it (see :func:`identify`).
            moved: filled with ``{recorded path: path found}`` for each
                labelled device found under another path.

        Raises:
            StateError: a segment's device is not the recorded one (another
                path, or smaller than recorded: another disk, or one that
                shrank).  A device larger than recorded has grown, which
                :meth:`~libdm.Pool.refresh` allows.  Or a segment does not
                fit on its recorded device: the store does not describe it.
            ForeignDeviceError: a labelled device is not at its recorded
                path, and no block device carries its label.
            ValueError: a segment with no record does not fit on its device.
        """
        out: list[Target] = []
        at = 0
        found: dict[str, str] = {} if moved is None else moved
        for index, seg in enumerate(segments):
            path, first, length = Segment.of(seg)
            stored = path
            record = devices[index] if devices is not None and index < len(devices) else None
            if record is not None and record.label is not None and token is not None:
                if path not in found:
                    at_path = identify(path, record, token)
                    if at_path != path:
                        found[path] = at_path
                path = found.get(path, path)
                record = record._replace(path=path)
            dev = open_block_device(path)
            if record is not None:
                _check_recorded(path, dev.size, record)
            size = int(Bytes(dev.size).whole_sectors())
            start = int(first)
            count = size - start if length is None else int(length)
            if record is not None and (start < 0 or count <= 0 or start + count > size):
                # A stored segment off the end of its proven device: the store
                # does not describe this pool's devices (edited, or forged).
                raise StateError(
                    f"the pool's stored segment {stored} sectors {start}+{count} "
                    f"does not fit on {path}, the pool's {record.label or 'device'} "
                    f"({size} sectors); libdm will not map it",
                    "open",
                    None,
                )
            if start < 0 or count <= 0 or start + count > size:
                raise ValueError(
                    f"segment {path} sectors {start}+{count} does not fit on "
                    f"the device ({size} sectors)"
                )
            out.append(Target(at, count, "linear", f"{dev.devno} {start}"))
            at += count
        return out

    def mapped(
        self, segments: Iterable[Sequence[Any]], devices: Sequence[RecordedDevice] | None
    ) -> list[Target]:
        """:meth:`table` of ``segments``, finding labelled devices by their
        label (moves are kept in :attr:`moved`)."""
        return self.table(segments, devices, token=self.token, moved=self.moved)

    def relocation(self) -> BackingChanges:
        """The configuration changes that record the labelled devices found
        under new paths (:attr:`moved`) there; empty if none moved."""
        if not self.moved:
            return {}
        return self._fields(lambda path: self.moved.get(path, path))

    def labelled_devices(self) -> list[RecordedDevice]:
        """The recorded devices that carry the pool's label."""
        return [
            d
            for d in (self.meta_devices or [])
            + (self.data_devices or [])
            + (self.spare_devices or [])
            if d.label is not None
        ]

    def unlabelled(self) -> list[str]:
        """The recorded devices that carry no label of the pool (a pool
        made before labels): known by their path and size only."""
        return sorted(
            {d.path for d in (self.meta_devices or []) + (self.data_devices or []) if not d.label}
        )

    def erase_labels(self) -> None:
        """Zero the pool's labels on its devices (a pool destroyed with its
        state, or whose creation failed); another pool's label stays."""
        if self.token is None:
            return
        for d in (self.meta_devices or []) + (self.data_devices or []):
            if d.label is not None:
                try:
                    erase_label(self.moved.get(d.path, d.path), self.token)
                except OSError as exc:
                    logger.warning("pool %s: label on %s kept: %s", self.pool_name, d.path, exc)

    def attach(self) -> _Devices:
        """Create (or roll forward) the ``-tmeta`` and ``-tdata`` devices.

        Raises:
            ValueError: a live device whose table the stored segments do
                not extend, or a segment that does not fit.
            StateError: a segment's device is not the recorded one.
        """
        made: list[str] = []
        try:
            for name, uuid, segments, devices in self._pieces():
                table = self.mapped(segments, devices)
                seen = self._prove(name, uuid, table, "open")
                if seen is not None and not seen.info.live_table:
                    # Ours (its uuid), left without a table by a killed create.
                    ops.remove(name)
                    seen = None
                if seen is None:
                    ops.create(name, table, uuid=uuid)
                    made.append(name)
                    continue
                if uuid is not None and not seen.info.uuid:
                    # Made before pieces had uuids, and its table is exactly
                    # the recorded one: it gets the uuid it would have now.
                    ops.set_uuid(name, uuid)
                    logger.info("pool %s: gave linear piece %s its uuid", self.pool_name, name)
                live = seen.table
                if live == table:
                    continue
                if not _grows(live, table):
                    raise StateError(
                        f"{name} is live with table {'; '.join(map(str, live))}, which the "
                        f"pool's stored segments ({'; '.join(map(str, table))}) do not extend",
                        "activate",
                        name,
                    )
                # The store already names the new segments (an extend or a
                # grown device interrupted before the reload): roll forward.
                ops.reload(name, table)
                ops.suspend(name, flush=False)
                ops.resume(name)
        except BaseException:
            for name in reversed(made):
                ops.remove(name)
            raise
        return _Devices(_mapped(self.meta_name), _mapped(self.data_name))

    def describe(self) -> Description:
        """The segments of each side, for the pool report."""

        def text(segments: list[Segment]) -> str:
            return " + ".join(
                f"{path}"
                if start in (0, RESERVED) and length is None  # a whole device
                else f"{path} (sectors {start}+{'end' if length is None else length})"
                for path, start, length in segments
            )

        return Description(text(self.data_segments), text(self.meta_segments))

    def report(self, devnos: Callable[[], tuple[str, str] | None]) -> Report:
        """The segments of each side (:meth:`describe`); no loop files."""
        return Report(*self.describe())

    def piece_names(self) -> list[str]:
        """The ``-tmeta`` and ``-tdata`` linear devices."""
        return [self.meta_name, self.data_name]

    def data_sectors(self) -> Sectors:
        """The length of the data segments on their devices now."""
        return Sectors(sum(int(t.length) for t in self.table(self.data_segments)))

    def metadata_growth(self, want: Bytes) -> str | RemedyCall:
        """An extend of the metadata side."""
        return "extend(device, metadata=True) grows it"

    def check_removable(self, operation: str = "destroy") -> None:
        """Nothing: the pool made no files in its directory."""

    def remove_files(self) -> None:
        """Nothing: the pool made no files in its directory."""

    def files(self) -> None:
        """None: the pool sits on block devices."""
        return None

    def pieces(self) -> LinearBacking:
        """Itself: the linear pieces and their segments."""
        return self

    def teardown(self, operation: str = "destroy") -> None:
        """Remove the ``-tdata`` and ``-tmeta`` devices, each only once
        proven the pool's (its uuid, or for a piece made before pieces had
        uuids, exactly the recorded table).  A device of that name that is
        not the pool's stays; a warning names it."""
        for name, uuid, segments, devices in reversed(self._pieces()):
            try:
                table: list[Target] | None = self.mapped(segments, devices)
            except (OSError, ValueError, StateError):
                table = None  # a device gone: only the uuid can prove it
            try:
                seen = self._prove(name, uuid, table, operation)
            except ForeignDeviceError as exc:
                logger.warning("pool %s: %s", self.pool_name, exc.strerror)
                continue
            if seen is not None:
                ops.remove(name)

    def backing_filesystem_dir(self) -> str | None:
        """None: the pool sits on block devices, not in files."""
        return None


def _recorded(devices: Iterable[RecordedDevice] | None) -> list[RecordedDevice] | None:
    return None if devices is None else list(devices)


def record_devices(
    segments: Iterable[Sequence[Any]], token: str | None = None
) -> list[RecordedDevice]:
    """What to record of each segment's device: its path, its size (bytes)
    and, when it carries the label of ``token``'s pool, that label."""
    out = []
    for seg in segments:
        path = Segment.of(seg).path
        found = read_label(path) if token is not None else None
        ref = found.ref if found is not None and found.token == token else None
        out.append(RecordedDevice(path, Bytes(open_block_device(path).size), ref))
    return out


def segment_changes(
    config: PoolConfig,
    side: Literal["meta_segments", "data_segments"],
    segments: Sequence[Sequence[Any]],
) -> BackingChanges:
    """The configuration changes that make ``segments`` (the pool's, then
    one more) its ``side`` (``"meta_segments"`` or ``"data_segments"``),
    recording the new segment's device where the others are recorded.

    Raises:
        OSError: the new segment's device cannot be opened.
    """
    typed = [Segment.of(seg) for seg in segments]
    meta = side == "meta_segments"
    recorded = config.backing.meta_segment_devices if meta else config.backing.data_segment_devices
    devices = None
    if recorded is not None and len(recorded) == len(segments) - 1:
        devices = [*recorded, *record_devices(typed[-1:], config.token)]
    changes: BackingChanges = {}
    if meta:
        changes["meta_segments"] = typed
        if devices is not None:
            changes["meta_segment_devices"] = devices
    else:
        changes["data_segments"] = typed
        if devices is not None:
            changes["data_segment_devices"] = devices
    return changes


def _check_recorded(path: str, size: int, recorded: RecordedDevice) -> None:
    if recorded.path != path:
        raise StateError(
            f"the pool's stored segment names {path}, but the device recorded for it is "
            f"{recorded.path}; libdm will not use a device the pool was not made on",
            "open",
            None,
        )
    if size < int(recorded.size):
        raise StateError(
            f"{path} is {size} bytes, but the pool recorded {recorded.size} bytes for it: "
            f"it is not the device the pool was made on (or it shrank); libdm will not use it",
            "open",
            None,
        )


def identify(path: str, recorded: RecordedDevice, token: str) -> str:
    """The path of the labelled device ``recorded`` names: ``path`` if the
    device there carries the label the pool wrote on it, or else the one
    block device that does (a reboot gave it another name; logged).

    Raises:
        ForeignDeviceError: no block device, or more than one, carries the
            label; the message names what is at ``path``.
    """
    assert recorded.label is not None
    try:
        here = read_label(path)
    except OSError as exc:
        here, what = None, f"cannot be read ({exc.strerror or exc})"
    else:
        what = "" if here is None else str(here)
    if here is not None and here.is_of(token, recorded.label):
        return path
    if not what:
        found_sigs = _signatures(path)
        what = f"holds {' and '.join(found_sigs)}" if found_sigs else "carries no libdm label"
    else:
        what = what if what.startswith("cannot") else f"is {what}"
    elsewhere = find_labelled(token, recorded.label, int(recorded.size))
    if len(elsewhere) == 1:
        logger.warning(
            "%s is not the pool's %s any more (it %s); the device carrying the pool's label "
            "is now %s, which the pool uses",
            path,
            recorded.label,
            what,
            elsewhere[0],
        )
        return elsewhere[0]
    where = (
        f"several devices carry its label ({', '.join(elsewhere)}): copies of it"
        if elsewhere
        else "no block device carries its label"
    )
    raise ForeignDeviceError(
        f"{path} is not the pool's {recorded.label}: it {what}{_sizes(path, recorded)}, and "
        f"{where}; libdm will not use another device in its place (attach the pool's "
        f"device, or remove the copies)",
        "open",
        path,
    )


def _sizes(path: str, recorded: RecordedDevice) -> str:
    """What tells the devices apart by size, for a refusal: the size found at
    ``path`` beside the size recorded for the pool's device."""
    try:
        size: int | str = open_block_device(path).size
    except OSError:
        size = "unknown"
    return f" ({size} bytes, where the pool recorded {int(recorded.size)} bytes)"


def _signatures(path: str) -> list[str]:
    try:
        return signatures(path)
    except OSError:
        return []


def _grows(live: Sequence[Target], table: Sequence[Target]) -> bool:
    """True if ``table`` keeps every live segment in place and only adds to
    the end (a longer last segment, or more segments)."""
    if len(table) < len(live):
        return False
    for old, new in zip(live, table, strict=False):
        if (old.start, old.type) != (new.start, new.type) or old.params != new.params:
            return False
    return all(new.length >= old.length for old, new in zip(live, table, strict=False)) and (
        all(new.length == old.length for old, new in zip(live[:-1], table[:-1], strict=False))
    )


class _Mapped:
    """A device-mapper device as the pool table needs it."""

    def __init__(self, name: str) -> None:
        info = ops.info(name)
        self.path: str = ops.device_path(name)
        self.devno = f"{info.major}:{info.minor}"
        self.size = int(Sectors(sum(int(t.length) for t in ops.table(name))).bytes())


def _mapped(name: str) -> _Mapped:
    return _Mapped(name)


def split_layout(
    device_sectors: Sectors,
    block_size: Sectors,
    thinp_percent: int,
    thinp_metapercent: int,
    *,
    reserved: Sectors | None = None,
) -> tuple[Sectors, Sectors, Sectors, Sectors]:
    """Sector math for one device split into metadata then data.

    Metadata starts after the ``reserved`` sectors (the device's label)
    and takes ``thinp_metapercent`` of the device (at least 2 MiB,
    rounded down to 4 KiB); data starts right after it, aligned up to a
    whole data block, and takes ``thinp_percent`` of the device rounded
    down to whole data blocks (and never past the end).

    Returns:
        ``(meta_start, meta_len, data_start, data_len)`` in ``Sectors``.

    Raises:
        ValueError: percentages out of range or a device too small.
    """
    for what, pct in (("thinp_percent", thinp_percent), ("thinp_metapercent", thinp_metapercent)):
        if not 0 < pct < 100:
            raise ValueError(f"{what} must be between 0 and 100 (exclusive), got {pct}")
    if thinp_percent + thinp_metapercent > 100:
        raise ValueError(
            f"thinp_percent ({thinp_percent}) + thinp_metapercent ({thinp_metapercent}) exceed 100"
        )
    total = int(device_sectors)
    meta_start = 0 if reserved is None else int(reserved)
    meta_len = max(total * thinp_metapercent // 100, 4096) // 8 * 8
    bs = int(block_size)
    data_start = int(Sectors(meta_start + meta_len).round_up(bs))
    data_len = min(total * thinp_percent // 100, total - data_start) // bs * bs
    if data_len <= 0:
        raise ValueError(
            f"the device ({total} sectors) is too small for {meta_len} sectors of metadata "
            f"and at least one {bs}-sector data block"
        )
    return Sectors(meta_start), Sectors(meta_len), Sectors(data_start), Sectors(data_len)


class AdoptedBacking:
    """An existing thin-pool device that libdm provisions from but does not own."""

    kind: ClassVar[PoolKind] = PoolKind.ADOPTED
    capabilities: ClassVar[Capabilities] = Capabilities(
        owns_devices=False,
        resizable=False,
        extendable=False,
        discard_by_default=False,
        growth_hint="its devices are not libdm's",
    )

    def config(self) -> BackingChanges:
        """No fields: libdm records nothing of the pool's devices."""
        return {}

    def attach(self) -> _Devices:
        """Refused: the devices are not libdm's.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("an adopted pool's devices are not libdm's to attach")

    def describe(self) -> Description:
        """Nothing to say: the devices are not libdm's."""
        return Description("", "")

    def report(self, devnos: Callable[[], tuple[str, str] | None]) -> Report:
        """Nothing to say: the devices are not libdm's."""
        return Report("", "")

    def teardown(self) -> None:
        """Nothing: the pool's devices belong to whoever made it."""

    def backing_filesystem_dir(self) -> str | None:
        """None: libdm does not know what holds the devices."""
        return None

    def piece_names(self) -> list[str]:
        """None that are libdm's."""
        return []

    def data_sectors(self) -> Sectors:
        """Refused: libdm does not size an adopted pool's devices.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("an adopted pool's devices are not libdm's to size")

    def metadata_growth(self, want: Bytes) -> str | RemedyCall:
        """Its owner grows it."""
        return "whoever made the pool grows its metadata device"

    def check_removable(self, operation: str = "destroy") -> None:
        """Nothing: the pool made no files in its directory."""

    def remove_files(self) -> None:
        """Nothing: the pool made no files in its directory."""

    def files(self) -> None:
        """None: the devices are not libdm's."""
        return None

    def pieces(self) -> None:
        """None: the devices are not libdm's."""
        return None


#: What each kind of backing can do, for a caller that has the pool's kind
#: and not its backing (the monitor, the CLI).
CAPABILITIES: Mapping[PoolKind, Capabilities] = MappingProxyType(
    {cls.kind: cls.capabilities for cls in (LoopBacking, LinearBacking, AdoptedBacking)}
)


def _loop_holding(devno: str, key: tuple[int, int]) -> str | None:
    """``/dev/loopN`` if the block device ``devno`` (``major:minor``) is a
    loop device holding the whole file whose ``(st_dev, st_ino)`` is
    ``key``, else None.  Its name comes from sysfs, as the minor is N only
    when the loop module has no partitions."""
    major, _, _ = devno.partition(":")
    if major != str(LOOP_MAJOR):
        return None
    try:
        entry = os.path.basename(os.readlink(f"/sys/dev/block/{devno}"))
    except OSError:
        return None
    if not (entry.startswith("loop") and entry[4:].isdigit()):
        return None
    path = f"/dev/{entry}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # removed meanwhile
    try:
        info = loop_status(fd, path)
    except OSError:
        return None  # detached meanwhile
    finally:
        os.close(fd)
    whole = info.offset == 0 and info.sizelimit == 0
    return path if whole and (info.device, info.inode) == key else None


#: The stored fields each kind of backing needs, and their shapes.
FIELD_CHECKS: dict[PoolKind, tuple[FieldCheck, ...]] = {
    PoolKind.LOOP: (("file_inodes", bad_inodes),),
    PoolKind.BLOCK: (
        ("meta_segments", bad_segments),
        ("data_segments", bad_segments),
        ("meta_segment_devices", bad_devices),
        ("data_segment_devices", bad_devices),
        ("spare_segment_devices", bad_devices),
        # Optional: an empty (or false) value is none.
        ("spare_segments", lambda v: bad_segments(v) if v else None),
        ("damaged_meta_segments", lambda v: bad_segments(v) if v else None),
    ),
    PoolKind.ADOPTED: (),
}


def from_config(
    kind: PoolKind | str, statedir: StateDir, pool_name: str, config: PoolConfig
) -> Backing:
    """Rebuild the backing recorded in a pool's state.

    Args:
        kind: the pool's kind (or its stored string).
        statedir: the pool's :class:`~libdm.thin.statedir.StateDir`.
        pool_name: the pool's name.
        config: the pool's stored configuration.

    Raises:
        StateError: an unknown kind, or a backing field the kind needs
            missing or of the wrong shape (the store and the field are
            named; see :meth:`~libdm.thin.config.BackingFields.damage`).
    """
    where = f"the pool state in {statedir.join(DB_NAME)}"
    parsed = PoolKind.parse(kind, where)
    found = config.backing.damage(FIELD_CHECKS[parsed])
    if found is not None:
        field, why = found
        raise StateError(
            f"{where} is damaged: the {parsed.value!r} pool's field {field!r} {why}; "
            f"nothing was changed",
            "open",
            None,
        )
    return _READERS[parsed](statedir, pool_name, config)


def _loop_from_config(statedir: StateDir, pool_name: str, config: PoolConfig) -> LoopBacking:
    fields = config.backing
    sizes = {
        name: int(size)
        for name, size in ((DATA_FILE, fields.data_size), (METADATA_FILE, fields.metadata_size))
        if size is not None
    }
    return LoopBacking(statedir, fields.file_inodes, sizes)


def _linear_from_config(statedir: StateDir, pool_name: str, config: PoolConfig) -> LinearBacking:
    fields = config.backing
    # Checked by BackingFields.damage: both sides are there.
    assert fields.meta_segments is not None and fields.data_segments is not None
    return LinearBacking(
        pool_name,
        fields.meta_segments,
        fields.data_segments,
        fields.meta_segment_devices,
        fields.data_segment_devices,
        fields.spare_segments,
        fields.damaged_meta_segments,
        token=config.token,
        spare_devices=fields.spare_segment_devices,
    )


def _adopted_from_config(statedir: StateDir, pool_name: str, config: PoolConfig) -> AdoptedBacking:
    return AdoptedBacking()


#: How each kind's backing is read from the stored configuration.
_READERS: Mapping[PoolKind, Callable[[StateDir, str, PoolConfig], Backing]] = {
    PoolKind.LOOP: _loop_from_config,
    PoolKind.BLOCK: _linear_from_config,
    PoolKind.ADOPTED: _adopted_from_config,
}


def default_metadata_size(data_size: Bytes, block_size: Sectors) -> Bytes:
    """The kernel's guideline: 48 bytes per data block, at least 2 MiB, at
    most the 16 GiB the pool can use; rounded up to 4 KiB.

    Args:
        data_size: ``Bytes`` of data.
        block_size: the data block size in ``Sectors``.

    Returns:
        ``Bytes``.
    """
    blocks = int(data_size) // int(Sectors(block_size).bytes())
    size = min(max(48 * blocks, 2 << 20), MAX_METADATA_BYTES)
    return Bytes(size).round_up(4096)


# The kernel uses at most this much metadata (255 * 2^14 blocks of 4 KiB).
MAX_METADATA_BYTES = 255 * (1 << 14) * 4096
