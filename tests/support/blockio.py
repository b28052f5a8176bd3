"""Block I/O helpers for tests: loop devices attached by losetup (tests
may run it; the library never does), and reads and writes at offsets."""

import os
import subprocess

MiB = 1 << 20


def attach(tmp_path, name, size):
    """A loop device (attached by losetup) over a new sparse file of
    ``size`` bytes in ``tmp_path``; the harness detaches it after the test."""
    path = tmp_path / name
    with open(path, "wb") as fh:
        fh.truncate(size)
    return subprocess.run(
        ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def devno(path):
    """``major:minor`` of a device node."""
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def write_at(path, offset, data):
    """Write ``data`` at ``offset`` and sync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pattern(path, byte, offset=0, length=MiB):
    """Fill ``length`` bytes at ``offset`` with ``byte`` and sync."""
    write_at(path, offset, bytes([byte]) * length)


def read_at(path, offset=0, length=MiB):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
