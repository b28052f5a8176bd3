"""Filesystems on thin devices: mkfs and mount (running mkfs and mount is
fine; device-mapper work is never done through a tool)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from typing import TypeAlias

from libdm.thin.errors import FilesystemError, RefusedError

StrPath: TypeAlias = str | os.PathLike[str]

__all__ = [
    "FILESYSTEMS",
    "filesystem_type",
    "grow_filesystem",
    "make_filesystem",
    "mount_points",
    "mounted",
    "mounts_of",
    "set_xfs_nospace_max_retries",
    "trim",
]

# Discard is skipped at mkfs time: a new thin device is already unmapped,
# and discarding it would only cost time.
FILESYSTEMS: dict[str, list[str]] = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
}


def make_filesystem(
    path: StrPath, fstype: str, *, label: str | None = None, options: Iterable[str] = ()
) -> None:
    """Run mkfs for ``fstype`` (ext4 or xfs) on ``path``.

    Raises:
        ValueError: an unsupported ``fstype``.
        FileNotFoundError: the mkfs program is not installed (the message
            names the package).
        FilesystemError: mkfs failed; its output is in the message.
    """
    if fstype not in FILESYSTEMS:
        raise ValueError(
            f"filesystem {fstype!r} is not supported; use one of {', '.join(FILESYSTEMS)}"
        )
    argv = list(FILESYSTEMS[fstype])
    if shutil.which(argv[0]) is None:
        package = "e2fsprogs" if fstype == "ext4" else "xfsprogs"
        raise FileNotFoundError(f"{argv[0]} is not installed (package {package})")
    if label is not None:
        argv += ["-L", label]
    argv += [*list(options), os.fspath(path)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise _failed(argv, proc, "format", path)


@contextlib.contextmanager
def mounted(
    path: StrPath,
    target: StrPath | None = None,
    *,
    options: str | None = None,
    xfs_nospace_max_retries: int | None = None,
) -> Iterator[str]:
    """Mount ``path`` on ``target`` (a fresh temporary directory when
    ``None``) for the ``with`` block, then unmount it (and remove the
    temporary directory).

    ``xfs_nospace_max_retries``: for an xfs filesystem, how often xfs
    retries a metadata write that met ENOSPC before it shuts down (Docker's
    ``dm.xfs_nospace_max_retries``; xfs's default is to retry forever, which
    hangs a full thin pool's users), set through sysfs once mounted.

    Raises:
        FilesystemError: mount or umount failed; the message has their output.
    """
    made = target is None
    where = tempfile.mkdtemp(prefix="libdm-mnt-") if target is None else os.fspath(target)
    argv = ["mount"] + (["-o", options] if options else []) + [os.fspath(path), where]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        if made:
            os.rmdir(where)
        raise _failed(argv, proc, "mount", path)
    try:
        if xfs_nospace_max_retries is not None and filesystem_type(path) == "xfs":
            set_xfs_nospace_max_retries(path, xfs_nospace_max_retries)
        yield where
    finally:
        argv = ["umount", where]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise _failed(argv, proc, "umount", path)
        if made:
            os.rmdir(where)


def _failed(
    argv: list[str], proc: subprocess.CompletedProcess[str], operation: str, path: StrPath
) -> FilesystemError:
    """The error for a tool that failed: the command and its output, on one
    line (the CLI shows a message's first line)."""
    output = "; ".join(
        line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()
    )
    return FilesystemError(
        f"{' '.join(argv)} failed (exit status {proc.returncode}): {output or 'no output'}",
        operation,
        os.fspath(path),
    )


def filesystem_type(path: StrPath) -> str | None:
    """The filesystem ``blkid`` finds on ``path``, or ``None``."""
    proc = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", os.fspath(path)],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() or None


def _unescape(field: str) -> str:
    """A mountinfo path field as the path it stands for."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _mountinfo() -> list[tuple[int, str]]:
    """(device number, mount point) of this process's mounts."""
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            major, _, minor = fields[2].partition(":")
            out.append((os.makedev(int(major), int(minor)), _unescape(fields[4])))
    return out


def mount_points() -> set[str]:
    """Every mount point of this process's mount namespace."""
    return {where for _, where in _mountinfo()}


def mounts_of(path: StrPath) -> list[str]:
    """Where the block device ``path`` is mounted (none if it is gone)."""
    try:
        rdev = os.stat(path).st_rdev
    except FileNotFoundError:
        return []
    return [where for devno, where in _mountinfo() if devno == rdev]


def mount_point(path: StrPath) -> str | None:
    """Where the block device ``path`` is mounted, or ``None``."""
    where = mounts_of(path)
    return where[0] if where else None


def grow_filesystem(path: StrPath) -> str:
    """Grow the ext4 or xfs filesystem on ``path`` to fill the device,
    mounted or not (``resize2fs``; ``xfs_growfs``, which needs a mount, on
    a temporary one if needed).

    Returns:
        The filesystem type grown.

    Raises:
        RefusedError: no filesystem, or one that is not ext4 or xfs.
        FilesystemError: the tool failed; its output is in the message.
    """
    fstype = filesystem_type(path)
    if fstype is None or fstype not in ("ext4", "xfs"):
        raise RefusedError(
            errno.EOPNOTSUPP,
            f"{path} holds {'no filesystem' if fstype is None else fstype}: "
            f"only ext4 and xfs can be grown",
            "grow_filesystem",
            str(path),
        )

    def run(argv: list[str]) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise _failed(argv, proc, "grow_filesystem", path)

    where = mount_point(path)
    if fstype == "ext4":
        if where is None:
            run(["e2fsck", "-f", "-p", os.fspath(path)])  # resize2fs insists offline
        run(["resize2fs", os.fspath(path)])
    elif where is not None:
        run(["xfs_growfs", where])
    else:
        with mounted(path) as target:
            run(["xfs_growfs", target])
    return fstype


def trim(mount_point: StrPath) -> int:
    """Discard the free space of the filesystem mounted at ``mount_point``
    (what ``fstrim`` does).

    Returns:
        The bytes the filesystem reports it trimmed.

    Raises:
        OSError: the filesystem does not support it, or refused.
    """
    from libdm.dm.blockdev import FITRIM, ioctl

    where = os.fspath(mount_point)
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # struct fstrim_range {start, len, minlen}: the whole filesystem;
        # the kernel writes the bytes trimmed into len.
        arg = bytearray(struct.pack("=3Q", 0, (1 << 64) - 1, 0))
        ioctl(fd, FITRIM, arg, "FITRIM", os.fsdecode(where))
    finally:
        os.close(fd)
    trimmed: int = struct.unpack_from("=Q", arg, 8)[0]
    return trimmed


def xfs_error_path(path: StrPath, *parts: str) -> str:
    """/sys/fs/xfs/<dm-N>/error/... for the xfs filesystem mounted from the
    block device ``path``."""
    rdev = os.stat(path).st_rdev
    with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/uevent") as fh:
        name = next(line.split("=", 1)[1].strip() for line in fh if line.startswith("DEVNAME="))
    return os.path.join("/sys/fs/xfs", os.path.basename(name), "error", *parts)


def set_xfs_nospace_max_retries(path: StrPath, retries: int) -> None:
    """Set how often the mounted xfs on ``path`` retries a metadata write
    that met ENOSPC (-1: forever, xfs's default).

    Raises:
        OSError: no such mounted xfs filesystem.
    """
    with open(xfs_error_path(path, "metadata", "ENOSPC", "max_retries"), "w") as fh:
        fh.write(str(int(retries)))
