"""Block I/O helpers for tests: loop devices attached by losetup (tests
may run it; the library never does), and reads and writes at offsets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

StrPath = str | os.PathLike[str]

MiB = 1 << 20


def attach(tmp_path: Path, name: str, size: int) -> str:
    """A loop device (attached by losetup) over a new sparse file of
    ``size`` bytes in ``tmp_path``; the harness detaches it after the test."""
    path = tmp_path / name
    with open(path, "wb") as fh:
        fh.truncate(size)
    return subprocess.run(
        ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def devno(path: StrPath) -> str:
    """``major:minor`` of a device node."""
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def write_at(path: StrPath, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` and sync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pattern(path: StrPath, byte: int, offset: int = 0, length: int = MiB) -> None:
    """Fill ``length`` bytes at ``offset`` with ``byte`` and sync."""
    write_at(path, offset, bytes([byte]) * length)


def read_at(path: StrPath, offset: int = 0, length: int = MiB) -> bytes:
    """``length`` bytes at ``offset`` (fewer at the end of the device)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
