"""Block devices: the kernel's block and loop ioctls, and the devices the
pool model is handed (size, number, signatures, use).

Every ioctl number and struct layout libdm uses (``linux/fs.h``,
``linux/loop.h``) is here, taken from the kernel headers when the binding
is compiled (``libdm/_decl/blockdev.h``): size, discard, flush, trim and
the loop calls.  :mod:`libdm.dm.loop` builds loop devices on them.

Before a device becomes part of a pool, libdm checks that it is not in
use (an exclusive open fails while it is mounted or held by another
device) and that it carries no filesystem, partition table, LVM, LUKS or
thin-pool signature, so that data is never overwritten by mistake.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from libdm.dm._lib import ffi, lib
from libdm.dm.errors import DeviceBusyError

__all__ = [
    "BlockDevice",
    "LoopInfo",
    "check_unused",
    "discard",
    "ioctl",
    "list_block_devices",
    "open_block_device",
    "os_error",
    "read_head",
    "signatures",
    "size_bytes",
    "size_of_fd",
    "write_head",
]

# -- kernel interface (from the headers, see libdm/_decl/blockdev.h) ----------

BLKGETSIZE64: int = lib.BLKGETSIZE64
BLKDISCARD: int = lib.BLKDISCARD
FITRIM: int = lib.FITRIM

LOOP_SET_FD: int = lib.LOOP_SET_FD
LOOP_CLR_FD: int = lib.LOOP_CLR_FD
LOOP_SET_STATUS64: int = lib.LOOP_SET_STATUS64
LOOP_GET_STATUS64: int = lib.LOOP_GET_STATUS64
LOOP_SET_CAPACITY: int = lib.LOOP_SET_CAPACITY
LOOP_SET_DIRECT_IO: int = lib.LOOP_SET_DIRECT_IO
LOOP_CONFIGURE: int = lib.LOOP_CONFIGURE
LOOP_CTL_GET_FREE: int = lib.LOOP_CTL_GET_FREE
LOOP_MAJOR: int = lib.LOOP_MAJOR

LO_FLAGS_READ_ONLY: int = lib.LO_FLAGS_READ_ONLY
LO_FLAGS_AUTOCLEAR: int = lib.LO_FLAGS_AUTOCLEAR
LO_FLAGS_PARTSCAN: int = lib.LO_FLAGS_PARTSCAN
LO_FLAGS_DIRECT_IO: int = lib.LO_FLAGS_DIRECT_IO
LO_NAME_SIZE: int = lib.LO_NAME_SIZE

LOOP_INFO_SIZE: int = ffi.sizeof("struct loop_info64")
LOOP_CONFIG_SIZE: int = ffi.sizeof("struct loop_config")
_U64 = struct.Struct("=Q")


@dataclass(frozen=True)
class LoopInfo:
    """The fields of a ``struct loop_info64`` libdm reads (names without
    ``lo_``; ``file_name`` up to its first NUL)."""

    device: int
    inode: int
    rdevice: int
    offset: int
    sizelimit: int
    number: int
    flags: int
    file_name: bytes


def pack_loop_info(
    *, file_name: bytes = b"", flags: int = 0, offset: int = 0, sizelimit: int = 0
) -> bytes:
    """A ``struct loop_info64`` for LOOP_SET_STATUS64 / LOOP_CONFIGURE.

    ``file_name`` is cut to ``LO_NAME_SIZE - 1`` bytes: the kernel keeps
    the last byte for the terminating NUL.
    """
    info = ffi.new("struct loop_info64 *")
    info.lo_offset, info.lo_sizelimit, info.lo_flags = offset, sizelimit, flags
    name = file_name[: LO_NAME_SIZE - 1]
    ffi.memmove(info.lo_file_name, name, len(name))
    return bytes(ffi.buffer(info))


def unpack_loop_info(buf: bytes | bytearray) -> LoopInfo:
    """A ``struct loop_info64`` read back (see :class:`LoopInfo`)."""
    info = ffi.from_buffer("struct loop_info64 *", buf)
    return LoopInfo(
        device=int(info.lo_device),
        inode=int(info.lo_inode),
        rdevice=int(info.lo_rdevice),
        offset=int(info.lo_offset),
        sizelimit=int(info.lo_sizelimit),
        number=int(info.lo_number),
        flags=int(info.lo_flags),
        file_name=ffi.string(info.lo_file_name, LO_NAME_SIZE),
    )


def pack_loop_config(fd: int, info: bytes, block_size: int = 0) -> bytes:
    """A ``struct loop_config`` for LOOP_CONFIGURE (``info`` from
    :func:`pack_loop_info`)."""
    config = ffi.new("struct loop_config *")
    config.fd, config.block_size = fd, block_size
    ffi.memmove(ffi.addressof(config, "info"), info, LOOP_INFO_SIZE)
    return bytes(ffi.buffer(config))


def ioctl(fd: int, request: int, arg: int | bytes | bytearray, what: str, filename: str) -> int:
    """The ioctl's int result (0 for a bytes ``arg``; a bytearray one is
    filled in place), or an OSError naming ``what`` and ``filename``."""
    try:
        if isinstance(arg, bytearray):
            result: int = fcntl.ioctl(fd, request, arg, True)
            return result
        if isinstance(arg, bytes):
            fcntl.ioctl(fd, request, arg)
            return 0
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise os_error(exc.errno, what, filename) from None


def os_error(err: int | None, what: str, filename: str) -> OSError:
    """An OSError for a failed call ``what`` on ``filename``: the subclass
    that matches ``err`` (PermissionError, FileNotFoundError, ...)."""
    err = err or 0
    return OSError(err, f"{what}: {os.strerror(err)}", filename)


def loop_status(fd: int, path: str) -> LoopInfo:
    """LOOP_GET_STATUS64 of the loop device open on ``fd``."""
    buf = bytearray(LOOP_INFO_SIZE)
    ioctl(fd, LOOP_GET_STATUS64, buf, "LOOP_GET_STATUS64", path)
    return unpack_loop_info(buf)


def size_of_fd(fd: int, path: str) -> int:
    """The size in bytes of the block device open on ``fd`` (BLKGETSIZE64)."""
    buf = bytearray(_U64.size)
    ioctl(fd, BLKGETSIZE64, buf, "BLKGETSIZE64", path)
    size: int = _U64.unpack(buf)[0]
    return size


def discard(path: str, offset: int, length: int) -> None:
    """Discard ``length`` bytes at ``offset`` of a block device (BLKDISCARD):
    on a thin device, the pool gets the blocks back."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        ioctl(fd, BLKDISCARD, _U64.pack(offset) + _U64.pack(length), "BLKDISCARD", path)
    finally:
        os.close(fd)


# (offset, magic, what): checked in order; the first 128 KiB are read once.
_MAGICS = (
    (1080, b"\x53\xef", "an ext2/ext3/ext4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS header"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (4086, b"SWAP-SPACE", "a swap area"),
    (512, b"EFI PART", "a GPT partition table"),
    (0, b"hsqs", "a squashfs filesystem"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (32769, b"CD001", "an ISO 9660 filesystem"),
    (32, struct.pack("<Q", 27022010), "thin-pool metadata"),
)
_READ = 128 * 1024


class BlockDevice:
    """A block device path resolved once: its device number and size.

    Attributes:
        path: the path given.
        major, minor: its device number.
        size: its size in bytes (a plain ``int``).
    """

    __slots__ = ("major", "minor", "path", "size")

    def __init__(self, path: str, major: int, minor: int, size: int) -> None:
        self.path, self.major, self.minor, self.size = path, major, minor, size

    @property
    def devno(self) -> str:
        """``"major:minor"``, as device-mapper tables name devices."""
        return f"{self.major}:{self.minor}"

    def __repr__(self) -> str:
        return f"BlockDevice({self.path!r}, {self.devno}, {self.size} bytes)"


def open_block_device(path: str) -> BlockDevice:
    """Resolve ``path`` to a :class:`BlockDevice`.

    Raises:
        FileNotFoundError: no such path.
        ValueError: the path is not a block device.
    """
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise ValueError(f"{path} is not a block device")
    return BlockDevice(path, os.major(st.st_rdev), os.minor(st.st_rdev), size_bytes(path))


def size_bytes(path: str) -> int:
    """The size of a block device in bytes (BLKGETSIZE64)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return size_of_fd(fd, path)
    finally:
        os.close(fd)


def signatures(path: str) -> list[str]:
    """The signatures found at the start of a device or file, as phrases
    such as ``"an ext2/ext3/ext4 filesystem"``; empty when it looks blank.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, _READ, 0)
    finally:
        os.close(fd)
    found: list[str] = []
    for offset, magic, what in _MAGICS:
        if head[offset : offset + len(magic)] == magic and what not in found:
            found.append(what)
    # LVM2 writes its label in one of the first four sectors.
    for sector in range(4):
        label = head[sector * 512 : sector * 512 + 32]
        if label[:8] == b"LABELONE" and label[24:32] == b"LVM2 001":
            found.append("an LVM2 physical volume label")
            break
    # A DOS partition table: the boot signature plus a non-empty entry.
    if head[510:512] == b"\x55\xaa" and any(head[446:510]) and not found:
        found.append("a DOS partition table (or FAT boot sector)")
    return found


def read_head(path: str, length: int, offset: int = 0) -> bytes:
    """``length`` bytes at ``offset`` of a device (fewer at its end)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write_head(path: str, data: bytes, offset: int = 0) -> None:
    """Write ``data`` at ``offset`` of a device and sync it to the device."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.pwrite(fd, data, offset) != len(data):
            raise os_error(errno.EIO, "short write", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def list_block_devices() -> list[str]:
    """The ``/dev`` nodes of the block devices sysfs lists
    (``/sys/class/block``), those whose node exists."""
    try:
        names = sorted(os.listdir("/sys/class/block"))
    except OSError:
        return []
    out = []
    for name in names:
        path = f"/dev/{name}"
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                out.append(path)
        except OSError:
            continue
    return out


def check_unused(path: str) -> None:
    """Raise unless the block device can be opened exclusively, i.e. is not
    mounted, held by device-mapper/md, or opened exclusively elsewhere.

    Raises:
        DeviceBusyError: the device is in use; the message says by what
            when sysfs shows holders.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        holders = _holders(path)
        why = f"held by {', '.join(holders)}" if holders else "mounted or opened exclusively"
        raise DeviceBusyError(errno.EBUSY, f"{path} is in use ({why})", "check", path) from None
    os.close(fd)


def _holders(path: str) -> list[str]:
    st = os.stat(path)
    base = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/holders"
    try:
        return sorted(os.listdir(base))
    except OSError:
        return []
