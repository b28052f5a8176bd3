"""Block devices the pool model is handed: size, number, signatures, use.

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

from libdm.dm.errors import DeviceBusyError

__all__ = ["BlockDevice", "check_unused", "open_block_device", "signatures", "size_bytes"]

BLKGETSIZE64 = 0x80081272
BLKFLSBUF = 0x1261

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
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    finally:
        os.close(fd)
    size: int = struct.unpack("Q", buf)[0]
    return size


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
