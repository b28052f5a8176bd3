"""Repairing a pool's metadata, as ``lvconvert --repair`` does for LVM.

The pool is taken down (none of its devices may be open), ``thin_repair``
writes what it can recover from the damaged metadata into a spare of the
same size, and ``thin_check`` must pass on the result.  Then what each
device maps is compared: the damaged copy's device details say how many
blocks each device mapped (read with ``thin_ls``, or with ``thin_dump
--repair`` when the details tree itself is damaged), and the repaired
copy's mappings are counted in its ``thin_dump``.  Every device the store
records or the damaged copy lists (a handed-over pool's devices are not
libdm's, yet they count) must be in the repaired copy with at least as
many blocks mapped.

* Every device whole: the spare is swapped in and the damaged copy is kept.
* A loss, or a device whose count before cannot be read: nothing is
  swapped in.  The damaged metadata stays where it was, the repaired copy
  is kept beside it, and :class:`MetadataLossError` names each device and
  what it lost (or that it cannot be verified).  ``partial=True`` swaps
  the repaired copy in all the same (the damaged copy is kept) and
  returns the same report.

Where the copies live depends on the backing:

* a loop pool's spare is the file ``metadata.repair`` in the state
  directory; swapped in, it becomes ``metadata`` and the damaged file
  ``metadata.damaged-<UTC time>``; not swapped in, it is kept as
  ``metadata.repaired-<UTC time>``;
* a block pool's spare is a region the pool records as its own
  (``spare_segments``): a free part of the devices it sits on, or a
  device given for it.  Swapped in, the spare becomes the pool's metadata
  segments and the damaged ones are recorded (``damaged_meta_segments``)
  so that nothing is ever allocated over them; not swapped in, the spare
  keeps the repaired copy.

A blank or damaged superblock may have lost the transaction id, the data
block size and the number of data blocks; when thin_repair fails
without them, it is given them from the pool's store.  Such a superblock also
hides the device details from the tools, so what the devices mapped
before cannot be read, and thin_repair, which then looks for the trees
by scanning, may well find an older generation of them: a device that
came back mapping fewer blocks than it had is not told from a whole one.
Those devices are reported as not verified
(:attr:`RepairResult.unverified`) and nothing is swapped in without
``partial``.  A superblock whose checksum alone is wrong (its magic is
right) is resealed instead of repaired: the damaged copy with the
checksum recomputed goes to the spare and, once thin_check passes on it,
is the repaired copy, verified against its own device details.  The
tools open their devices with O_DIRECT, so a loop pool's copies are
reached through loop devices.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from libdm.dm import loop, ops
from libdm.dm.errors import DeviceBusyError, Remedy
from libdm.thin import backing as backings
from libdm.thin.config import BackingChanges
from libdm.thin.core import PoolCore
from libdm.thin.errors import PoolFailedError, StateError
from libdm.thin.growth import Growth
from libdm.thin.label import RESERVED, DeviceLabel, Role, write_label
from libdm.thin.records import Op
from libdm.thin.units import DataBlocks, Sectors

if TYPE_CHECKING:
    from libdm.thin.statedir import StateDir

__all__ = [
    "DeviceRecovery",
    "MetadataLossError",
    "RepairResult",
    "finish_swap",
    "repair_pool",
]

SPARE = "metadata.repair"


# -- what a repair reports ---------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRecovery:
    """What one device mapped before and after a repair.

    Attributes:
        name: the device's name in the pool (the store's); empty for a
            thin id the store does not record (a handed-over pool's
            devices are all its user's).
        thin_id: its thin id.
        before: the blocks it mapped, as the damaged copy's device details
            recorded them; ``None`` where they could not be read.
        after: the blocks the repaired copy maps for it; ``None`` when the
            repaired copy has no such device.
        deleting: the device's delete is pending (queued, or interrupted
            and finished when the pool comes up): what it lost does not
            count.
        scanned: ``before`` was not read through the damaged copy's
            superblock but found by ``thin_dump --repair`` scanning it (its
            details tree is damaged), and may be an older generation's: it
            can show a loss, never that the device is whole.
    """

    name: str
    thin_id: int
    before: DataBlocks | None
    after: DataBlocks | None
    deleting: bool = False
    scanned: bool = False

    @property
    def lost(self) -> bool:
        """True if the device is missing from the repaired copy, or maps
        fewer blocks there than the damaged copy recorded (and it is not
        being deleted)."""
        return not self.deleting and (
            self.after is None or (self.before is not None and self.after < self.before)
        )

    @property
    def verified(self) -> bool:
        """True if the device came back with every block it mapped (or it
        is being deleted)."""
        return self.deleting or (self.before is not None and not self.scanned and not self.lost)

    def describe(self) -> str:
        """One line: ``vol0 (thin id 0): 16 mapped blocks before, 0 after``."""
        before = "unknown" if self.before is None else str(int(self.before))
        if self.scanned and self.before is not None:
            before += " (found by a scan)"
        who = f"{self.name} (thin id {self.thin_id})" if self.name else f"thin id {self.thin_id}"
        if self.after is None:
            return f"{who}: missing from the repaired copy ({before} mapped blocks before)"
        return f"{who}: {before} mapped blocks before, {int(self.after)} after"


@dataclass(frozen=True)
class RepairResult:
    """What :meth:`Pool.repair <libdm.Pool.repair>` did.

    Attributes:
        pool: the pool's name.
        damaged: where the damaged metadata is kept (a file, or a block
            pool's segments).
        repaired: where the repaired copy is (the pool's metadata when it
            was swapped in).
        swapped: whether the repaired copy is now the pool's metadata.
        devices: per device (see :class:`DeviceRecovery`), what it mapped
            before and after.
    """

    pool: str
    damaged: str
    repaired: str
    swapped: bool
    devices: tuple[DeviceRecovery, ...]

    @property
    def lost(self) -> tuple[DeviceRecovery, ...]:
        """The devices that lost mappings or are missing."""
        return tuple(d for d in self.devices if d.lost)

    @property
    def unverified(self) -> tuple[DeviceRecovery, ...]:
        """The devices whose count before the damage could not be read (a
        damaged superblock or details tree); none of their mappings is
        known to be lost, and none is known to be whole."""
        return tuple(d for d in self.devices if not d.verified and not d.lost)

    @property
    def whole(self) -> bool:
        """True if every device came back with every block it mapped."""
        return all(d.verified for d in self.devices)


class MetadataLossError(PoolFailedError):
    """A repair could not recover every device's mappings (EIO).

    Attributes:
        result: the :class:`RepairResult`, per device what it mapped before
            and after; nothing was swapped in (``result.swapped`` is false)
            and both copies are kept where ``result`` says.
    """

    def __init__(self, result: RepairResult) -> None:
        self.result = result
        what = []
        if result.lost:
            what.append(f"lost: {'; '.join(d.describe() for d in result.lost)}")
        if result.unverified:
            what.append(
                f"not verified, as what they mapped before cannot be read from the damaged "
                f"copy: {'; '.join(d.describe() for d in result.unverified)}"
            )
        super().__init__(
            f"thin_repair could not recover all the mappings of pool {result.pool!r}, or "
            f"cannot show it did; {'; '.join(what)}; nothing was swapped in: the "
            f"damaged metadata is still in place ({result.damaged}) and the repaired copy "
            f"is kept ({result.repaired})",
            "repair",
            result.pool,
        )
        self.advise(Remedy("partial", "swaps it in, accepting what it holds"))


# -- running the tools ---------------------------------------------------------------------


def _run(argv: list[str], what: str, pool: PoolCore) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        status = (
            f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        raise PoolFailedError(
            f"{what} failed on the metadata of pool {pool.name!r}: "
            f"{(proc.stderr or proc.stdout).strip() or status}; "
            f"nothing was swapped in",
            "repair",
            pool.name,
        )
    return proc.stdout


_DEVICE = re.compile(r'<device dev_id="(\d+)"(?: mapped_blocks="(\d+)")?')
_RANGE = re.compile(r'<range_mapping [^>]*length="(\d+)"')


def recorded_counts(path: str) -> tuple[dict[int, DataBlocks], bool]:
    """Thin id -> the blocks it mapped, as the device details of the
    (damaged) metadata at ``path`` record them, and whether they were read
    through its superblock (``thin_ls``): where they cannot be, ``thin_dump
    --repair`` scans for them, and may find an older generation.  The
    devices whose details neither can read are left out."""
    proc = subprocess.run(
        ["thin_ls", "--no-headers", "-o", "DEV,MAPPED_BLOCKS", path],
        capture_output=True,
        text=True,
    )
    counts: dict[int, DataBlocks] = {}
    if proc.returncode == 0:
        for line in proc.stdout.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                counts[int(fields[0])] = DataBlocks(int(fields[1]))
        return counts, True
    proc = subprocess.run(
        ["thin_dump", "--repair", "--skip-mappings", path], capture_output=True, text=True
    )
    if proc.returncode == 0:
        for m in _DEVICE.finditer(proc.stdout):
            if m[2] is not None:
                counts[int(m[1])] = DataBlocks(int(m[2]))
    return counts, False


def mapped_counts(path: str, pool: PoolCore) -> dict[int, DataBlocks]:
    """Thin id -> the blocks its mappings cover in the (checked) metadata
    at ``path``, counted in its ``thin_dump`` rather than read from its
    device details."""
    counts: dict[int, int] = {}
    current: int | None = None
    with subprocess.Popen(
        ["thin_dump", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := _DEVICE.search(line):
                current = int(m[1])
                counts[current] = 0
            elif current is not None:
                if m := _RANGE.search(line):
                    counts[current] += int(m[1])
                elif "<single_mapping" in line:
                    counts[current] += 1
        assert proc.stderr is not None
        err = proc.stderr.read()
    if proc.returncode != 0:
        raise PoolFailedError(
            f"thin_dump of the repaired copy failed on the metadata of pool {pool.name!r}: "
            f"{err.strip() or f'exit status {proc.returncode}'}; nothing was swapped in",
            "repair",
            pool.name,
        )
    return {thin_id: DataBlocks(n) for thin_id, n in counts.items()}


def _compare(
    pool: PoolCore, repaired: str, before: tuple[dict[int, DataBlocks], bool]
) -> tuple[DeviceRecovery, ...]:
    """Per device, what it mapped before (``before``, from the damaged
    copy: :func:`recorded_counts`) and in the repaired copy at
    ``repaired``: every thin id the store records or either copy lists,
    for a pool's devices need not be libdm's (a handed-over pool's)."""
    counts, read = before
    after = mapped_counts(repaired, pool)
    store = pool.store
    wanted = {row.thin_id: row.name for row in store.devices()}
    wanted.update({row.thin_id: row.name for row in store.deferred_deletes()})
    deleting = {row.thin_id for row in store.deferred_deletes()} | {
        intent.thin_id for intent in store.intents() if intent.op is Op.DELETE
    }
    for thin_id in counts.keys() | after.keys():
        wanted.setdefault(thin_id, "")
    return tuple(
        DeviceRecovery(
            name,
            thin_id,
            counts.get(thin_id),
            after.get(thin_id),
            deleting=thin_id in deleting,
            scanned=not read,
        )
        # The store's devices by name, then the others by thin id.
        for thin_id, name in sorted(
            wanted.items(), key=lambda item: (not item[1], item[1], item[0])
        )
    )


def _repair_into(pool: PoolCore, source: str, target: str) -> tuple[DeviceRecovery, ...]:
    """thin_repair ``source`` into ``target`` (device paths), check the
    result, and compare the two.  A superblock whose checksum alone is
    wrong is resealed instead (see :func:`_reseal`)."""
    before = recorded_counts(source)
    if not before[1] and _reseal(source, target):
        # What the kernel last committed, checked clean: nothing to recover.
        return _compare(pool, target, recorded_counts(target))
    try:
        _run(["thin_repair", "-i", source, "-o", target], "thin_repair", pool)
    except PoolFailedError as first:
        # The superblock may have lost fields thin_repair cannot guess (it
        # asks for them, or with some damage crashes): the store has them.
        try:
            _run(
                ["thin_repair", "-i", source, *_lost_fields(pool), "-o", target],
                "thin_repair (given the superblock's fields from the store)",
                pool,
            )
        except PoolFailedError as second:
            raise second from first
    _run(["thin_check", target], "thin_check of the repaired copy", pool)
    return _compare(pool, target, before)


#: What a thin-pool superblock's checksum is xored with (dm-thin-metadata.c).
_SUPERBLOCK_CSUM_XOR = 160774
_THIN_MAGIC = 27022010
_BLOCK = 4096


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """CRC-32C as the kernel's persistent-data library seeds and keeps it
    (no final inversion)."""
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def _reseal(source: str, target: str) -> bool:
    """Copy the metadata at ``source`` to ``target`` with its superblock's
    checksum recomputed, when that checksum is all that is wrong with it:
    its magic number is right and the copy passes ``thin_check`` (so every
    root it names and every tree under them is whole and checksummed).
    The copy is then exactly what the kernel last committed, which
    thin_repair, scanning for the trees, may not find.  Returns whether
    ``target`` holds such a copy."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(src, _BLOCK, 0)
        if len(head) < _BLOCK or int.from_bytes(head[32:40], "little") != _THIN_MAGIC:
            return False
        stored = int.from_bytes(head[:4], "little")
        csum = _crc32c(head[4:]) ^ _SUPERBLOCK_CSUM_XOR
        if stored == csum:
            return False  # the damage is elsewhere: thin_repair's work
        dst = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        try:
            offset = 0
            while chunk := os.pread(src, 1 << 20, offset):
                if offset == 0:
                    chunk = csum.to_bytes(4, "little") + chunk[4:]
                # Blocks never written are left: nothing reachable is in them.
                if any(chunk):
                    os.pwrite(dst, chunk, offset)
                offset += len(chunk)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    proc = subprocess.run(["thin_check", "-q", target], capture_output=True)
    return proc.returncode == 0


# -- the common steps ---------------------------------------------------------------------


def _check_tools() -> None:
    for tool in ("thin_repair", "thin_check", "thin_dump", "thin_ls"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                errno.ENOENT, f"{tool} is not installed (package thin-provisioning-tools)", tool
            )


def _take_down(pool: PoolCore) -> None:
    """Remove the pool's thin devices and the pool device, each proved to
    be the pool's own first (its uuid, or a thin table on this pool with
    its thin id).

    Raises:
        DeviceBusyError: a thin device is open (named).
        StateError: a device of one of those names is not the pool's
            (named, with what it is); nothing was removed.
    """
    # Only the pool's own devices come down; a device of one of their names
    # made by another pool or program refuses the repair (ForeignDeviceError,
    # a StateError naming it) before anything is removed.
    proven = {}
    for row in pool.store.devices():
        found = pool.live(row, "repair")
        if found is not None:
            proven[row.name] = found
    live = [pool.device_dm_name(name) for name in proven]
    busy = [pool.device_dm_name(name) for name, dev in proven.items() if dev.info.open_count]
    if busy:
        raise DeviceBusyError(
            errno.EBUSY,
            f"{', '.join(busy)} are in use: close them before the pool's metadata is repaired",
            "repair",
            pool.name,
        )
    for name in live:
        ops.remove(name)
    if pool.pool_is_live("repair"):
        ops.remove(pool.name)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def repair_pool(
    pool: PoolCore, partial: bool = False, spare: str | None = None, force: bool = False
) -> RepairResult:
    """Repair the pool's metadata (see the module doc); the caller holds
    the pool's lock and brings the pool up afterwards.

    Raises:
        MetadataLossError: a device lost mappings, or cannot be verified,
            and not ``partial``.
        DeviceBusyError: a device of the pool is open.
        PoolFailedError: thin_repair or thin_check failed (the message has
            their words); nothing was swapped in.
        FileNotFoundError: thin-provisioning-tools is not installed.
        ValueError: an adopted pool, or a block pool with no room for a
            spare and none given.
    """
    # Files are repaired into a file beside them, linear pieces into a spare.
    files, pieces = pool.backing.files(), pool.backing.pieces()
    if files is not None:
        if spare is not None:
            raise ValueError(f"pool {pool.name!r} is a loop pool: its spare is a file of its own")
        result = _repair_loop(pool, files, partial)
    elif pieces is not None:
        result = _repair_block(pool, pieces, partial, spare, force)
    else:
        raise ValueError(
            f"pool {pool.name!r} was adopted: its metadata device is not libdm's to repair"
        )
    if not result.whole and not partial:
        raise MetadataLossError(result)
    return result


# -- loop pools --------------------------------------------------------------------------


def _repair_loop(pool: PoolCore, backing: backings.LoopBacking, partial: bool) -> RepairResult:
    _check_tools()
    statedir = pool.store.statedir
    if pool.config.repair is not None:
        finish_swap(pool)  # a swap a crash interrupted: its spare is the metadata now
    _clear_spare(pool)
    _take_down(pool)
    size = backing.sizes()[1]  # checked: the pool's own file, no symlink
    fd = statedir.make_file(SPARE, "repair", "spare metadata file")
    try:
        # Recorded as the pool's own, so that only this file is ever
        # removed as a spare a killed repair left.
        _record_spare(pool, os.fstat(fd).st_ino)
        os.ftruncate(fd, int(size))
    finally:
        os.close(fd)
    try:
        with (
            loop.attach(backing.metadata_file, read_only=True, follow_symlinks=False) as source,
            loop.attach(statedir.join(SPARE), follow_symlinks=False) as target,
        ):
            devices = _repair_into(pool, source.path, target.path)
    except BaseException:
        statedir.unlink(SPARE)  # nothing came of it
        _record_spare(pool, None)
        raise
    stamp = _stamp()
    if not all(d.verified for d in devices) and not partial:
        # Both copies are kept: the damaged one stays the pool's metadata.
        repaired = _link_anew(statedir, SPARE, f"metadata.repaired-{stamp}")
        statedir.unlink(SPARE)
        os.fsync(statedir.fd)
        _record_spare(pool, None)
        return RepairResult(
            pool.name, backing.metadata_file, statedir.join(repaired), False, devices
        )
    damaged = _unused(statedir, f"metadata.damaged-{stamp}")
    # The swap is recorded first, so a crash amid the renames is finished
    # by Pool.open (finish_swap) rather than leaving a file it refuses.
    spare_st = statedir.lstat(SPARE)
    if spare_st is None:
        raise PoolFailedError(
            f"the repaired copy {statedir.join(SPARE)} of pool {pool.name!r}'s metadata "
            f"vanished before it was swapped in; nothing was swapped in",
            "repair",
            pool.name,
        )
    inodes = dict(pool.config.backing.file_inodes or {})
    inodes["metadata"] = spare_st.st_ino
    inodes.pop(SPARE, None)  # it is the metadata now
    pool.update_config(pool.config.but(file_inodes=inodes, repair=damaged))
    finish_swap(pool)
    return RepairResult(pool.name, statedir.join(damaged), backing.metadata_file, True, devices)


def _unused(statedir: StateDir, base: str) -> str:
    """``base``, or ``base.N`` with the first N that names nothing: copies
    are named by the second, and two repairs may fall in one."""
    name, n = base, 0
    while statedir.lstat(name) is not None:
        n += 1
        name = f"{base}.{n}"
    return name


def _link_anew(statedir: StateDir, source: str, base: str) -> str:
    """Link ``source`` under a name nothing has (see :func:`_unused`):
    unlike a rename, a link never replaces a copy kept earlier."""
    name = _unused(statedir, base)
    while True:
        try:
            os.link(source, name, src_dir_fd=statedir.fd, dst_dir_fd=statedir.fd)
            return name
        except FileExistsError:
            name = _unused(statedir, base)


def _keep_damaged(statedir: StateDir, current: os.stat_result, name: str, pool: str) -> None:
    """Link the damaged ``metadata`` (``current``) as ``name`` before the
    repaired copy replaces it, never over anything else of that name."""
    try:
        os.link("metadata", name, src_dir_fd=statedir.fd, dst_dir_fd=statedir.fd)
    except FileExistsError:
        st = statedir.lstat(name)
        if st is None or st.st_ino != current.st_ino:  # not linked by a killed swap
            raise StateError(
                f"{statedir.join(name)}, where the damaged metadata of pool {pool!r} is to "
                f"be kept, is taken by another file; libdm will not replace it: move it "
                f"out of the pool's directory, then open the pool again",
                "repair",
                pool,
            ) from None


def _record_spare(pool: PoolCore, inode: int | None) -> None:
    """Record ``inode`` as the pool's spare file (``None``: it has none)."""
    inodes = dict(pool.config.backing.file_inodes or {})
    if inode is None:
        inodes.pop(SPARE, None)
    else:
        inodes[SPARE] = inode
    pool.update_config(pool.config.but(file_inodes=inodes))


def _clear_spare(pool: PoolCore) -> None:
    """Remove the spare a killed repair left, if the pool recorded it as
    its own.

    Raises:
        StateError: a ``metadata.repair`` the pool did not make (named):
            nothing is removed or taken down.
    """
    statedir = pool.store.statedir
    st = statedir.check_file(SPARE, "repair", "spare metadata file")
    if st is None:
        return
    recorded = (pool.config.backing.file_inodes or {}).get(SPARE)
    if st.st_ino != recorded:
        raise StateError(
            f"{statedir.join(SPARE)} is not a spare a repair of pool {pool.name!r} made "
            f"(the pool records {'none' if recorded is None else f'inode {recorded}'}, it "
            f"is inode {st.st_ino}); libdm will not remove or overwrite it: move it out "
            f"of the pool's directory, then repair again",
            "repair",
            pool.name,
        )
    statedir.unlink(SPARE)
    _record_spare(pool, None)


def finish_swap(pool: PoolCore) -> None:
    """Put a repaired spare in place of the damaged metadata, as recorded
    by a loop pool's repair; idempotent (Pool.open calls it after a crash
    amid the renames)."""
    damaged = pool.config.repair
    if not damaged:
        return
    statedir = pool.store.statedir
    if statedir.lstat(SPARE) is not None:
        current = statedir.lstat("metadata")
        # Recorded with the repair (see _repair_loop).
        recorded = (pool.config.backing.file_inodes or {}).get("metadata")
        if current is not None and current.st_ino != recorded:
            _keep_damaged(statedir, current, damaged, pool.name)
        os.rename(SPARE, "metadata", src_dir_fd=statedir.fd, dst_dir_fd=statedir.fd)
        os.fsync(statedir.fd)
    pool.update_config(pool.config.but(repair=None))


# -- block pools -------------------------------------------------------------------------


def spare_name(pool_name: str) -> str:
    """The device-mapper name of a block pool's spare while a repair
    writes it."""
    return f"{pool_name}-tspare"


def _spare_uuid(pool: PoolCore) -> str:
    return f"LIBDM-SPARE-{pool.config.token}"


def _describe(segments: list[backings.Segment]) -> str:
    return " + ".join(
        f"{seg.path} sectors {int(seg.start)}+{'end' if seg.length is None else int(seg.length)}"
        for seg in segments
    )


def _pick_spare(
    pool: PoolCore,
    backing: backings.LinearBacking,
    length: Sectors,
    spare: str | None,
    force: bool,
) -> list[backings.Segment]:
    """The spare region, recorded in the pool's configuration first so
    that nothing else is ever allocated over it: the one recorded, or
    ``spare`` (a whole device, checked as :meth:`Pool.extend` checks one),
    or a free part of the devices the pool sits on."""
    recorded = backing.spare_segments
    if recorded and (spare is None or _same_device(spare, recorded[0].path)):
        # The pool's own (it may hold an earlier repaired copy), once its
        # device is proven the one the pool recorded: its label, or (an
        # older record) one of the devices the pool sits on.
        segments = _proven_spare(pool, backing, recorded, spare)
        if segments is not None:
            have = sum(int(t.length) for t in backing.table(segments))
            if have >= int(length):
                return segments
    if spare is not None:
        from libdm.thin.creation import check_device

        size = Sectors(check_device(spare, force, "repair").size // 512)
        if size < Sectors(int(length) + int(RESERVED)):
            raise ValueError(
                f"{spare} holds {int(size)} sectors, less than the {int(length)} sectors "
                f"of pool {pool.name!r}'s metadata and the {int(RESERVED)} of its label"
            )
        # The spare's label makes it the pool's own: no other program's
        # device is ever taken for it after a reboot renames devices.
        write_label(
            spare, DeviceLabel(pool.config.token, pool.name, pool.directory, Role.SPARE, 0)
        )
        chosen = [backings.Segment(spare, RESERVED, length)]
    else:
        fits = [r for r in Growth(pool).free_regions() if r[2] >= length]
        if not fits:
            raise ValueError(
                f"pool {pool.name!r} has no free region of {int(length)} sectors on its "
                f"devices for a spare copy of its metadata; give a device for it "
                f"(repair(spare=DEVICE), --spare DEVICE)"
            )
        path, start, _ = fits[0]
        chosen = [backings.Segment(path, start, length)]
    devices = backings.record_devices(chosen, pool.config.token)
    pool.update_config(
        pool.config.with_backing(spare_segments=chosen, spare_segment_devices=devices)
    )
    return chosen


def _proven_spare(
    pool: PoolCore,
    backing: backings.LinearBacking,
    recorded: list[backings.Segment],
    spare: str | None,
) -> list[backings.Segment] | None:
    """The recorded spare's segments, at the paths where its devices are
    now, once proven the pool's; ``None`` for an older record on a device
    the pool does not sit on, when ``spare`` names a device to check anew.

    Raises:
        ForeignDeviceError: the recorded device is not the pool's spare
            (its label), and no device carries its label.
        StateError: an older record on a device the pool does not sit on,
            and no ``spare`` given.
    """
    if backing.spare_devices is not None:
        backing.mapped(recorded, backing.spare_devices)  # refuses another device
        if backing.moved:
            pool.update_config(pool.config.with_backing(**backing.relocation()))
            moved = backing.moved
            return [seg._replace(path=moved.get(seg.path, seg.path)) for seg in recorded]
        return recorded
    own = {os.stat(path).st_rdev for path in backing.paths() if os.path.exists(path)}
    if all(os.path.exists(s.path) and os.stat(s.path).st_rdev in own for s in recorded):
        return recorded  # a free part of the pool's own devices
    if spare is not None:
        return None
    raise StateError(
        f"pool {pool.name!r}'s recorded spare {_describe(recorded)} was recorded by path "
        f"only, on a device the pool does not otherwise use; libdm will not write over "
        f"what is at that path now: give the spare device again (repair(spare=DEVICE), "
        f"--spare DEVICE), which is checked as a new one",
        "repair",
        pool.name,
    )


def _same_device(a: str, b: str) -> bool:
    try:
        return os.stat(a).st_rdev == os.stat(b).st_rdev
    except OSError:
        return False


@contextmanager
def _spare_device(pool: PoolCore, segments: list[backings.Segment]) -> Iterator[str]:
    """The spare as a linear device (removed on exit)."""
    name = spare_name(pool.name)
    uuid = _spare_uuid(pool)
    if ops.exists(name):
        found = ops.info(name).uuid
        if found != uuid:
            raise StateError(
                f"a device-mapper device named {name!r} exists (uuid {found!r}) that is "
                f"not pool {pool.name!r}'s spare; libdm will not touch it",
                "repair",
                name,
            )
        ops.remove(name)  # left by a repair that was killed
    ops.create(name, backings.LinearBacking.table(segments), uuid=uuid)
    try:
        yield ops.device_path(name)
    finally:
        ops.remove(name)


def _repair_block(
    pool: PoolCore,
    backing: backings.LinearBacking,
    partial: bool,
    spare: str | None,
    force: bool,
) -> RepairResult:
    _check_tools()
    _take_down(pool)
    meta = backing.meta_segments
    with backing.attach() as devs:  # the pieces, if a reboot took them
        source = devs.meta.path
        length = Sectors(devs.meta.size // 512)
    segments = _pick_spare(pool, backing, length, spare, force)
    with _spare_device(pool, segments) as target:
        devices = _repair_into(pool, source, target)
    if not all(d.verified for d in devices) and not partial:
        return RepairResult(pool.name, _describe(meta), _describe(segments), False, devices)
    # The pieces go down and the configuration names the spare as the
    # metadata in one store transaction; Pool.open builds them afresh.
    backing.teardown()
    changes: BackingChanges = {
        "meta_segments": segments,
        "spare_segments": None,
        "spare_segment_devices": None,
        "damaged_meta_segments": [*backing.damaged_meta_segments, *meta],
    }
    if backing.meta_devices is not None:
        changes["meta_segment_devices"] = backings.record_devices(segments, pool.config.token)
    pool.update_config(pool.config.with_backing(**changes))
    return RepairResult(pool.name, _describe(meta), _describe(segments), True, devices)


def _lost_fields(pool: PoolCore) -> list[str]:
    """thin_repair's flags for what a damaged superblock lost, from the
    store: the transaction id, the data block size and the number of data
    blocks."""
    blocks = pool.data_sectors(pool.config) // int(pool.block_size)
    return [
        "--transaction-id",
        str(pool.store.transaction_id()),
        "--data-block-size",
        str(int(pool.block_size)),
        "--nr-data-blocks",
        str(blocks),
    ]
