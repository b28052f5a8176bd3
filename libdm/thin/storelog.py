"""The state store's log: ``state.db-log``, an append-only file of
checksummed records in front of ``state.db`` (see :mod:`libdm.thin.store`).

Layout (little-endian)::

    header   8 bytes "LIBDMLOG", u32 format, u32 reserved,
             16 bytes the store's id (state.db's meta.store_id),
             u32 CRC-32 of the 32 bytes before it, 28 bytes zero
    record   u32 payload length, u32 CRC-32 of (seq, payload), u64 seq,
             payload (JSON, UTF-8)

Records carry consecutive sequence numbers that never restart: the first
record after ``state.db``'s ``meta.log_seq`` is ``log_seq + 1``.  A record
whose length runs past the end of the file, whose CRC does not match, or
whose sequence number is not the next one ends the log: it is the torn
tail of a write a crash or power cut interrupted (never synced, so never
relied on), or a write still in progress in another process.

Every process with the store open holds a shared lock on the log (an
open-file-description lock, ``F_OFD_SETLK``) for as long as it is open.
Only a process that can take it exclusively, so that no other process
has the store open, folds the log into
``state.db`` and then truncates or removes it: while two processes have
the store open the log only grows, so a process knows it has seen every
change when the file's inode and size are the ones it last read (one
``stat``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import zlib
from collections.abc import Iterator

from libdm.thin.errors import StateError
from libdm.thin.statedir import StateDir

__all__ = ["FORMAT", "HEADER_SIZE", "LOG_NAME", "LogFile", "Record"]

LOG_NAME = "state.db-log"
#: The log's format version; a newer one is refused.
FORMAT = 1
MAGIC = b"LIBDMLOG"
HEADER_SIZE = 64
_HEAD = struct.Struct("<8sII16s")
_RECORD = struct.Struct("<IIQ")
_SEQ = struct.Struct("<Q")
#: No record is larger than this (a growth intent holding tables is the
#: largest, a few KiB); a length above it is a torn or damaged record.
MAX_RECORD = 1 << 24


class Record:
    """One record: its sequence number and its payload bytes."""

    __slots__ = ("payload", "seq")

    def __init__(self, seq: int, payload: bytes) -> None:
        self.seq = seq
        self.payload = payload


def header(store_id: bytes) -> bytes:
    """The header of a log belonging to the store ``store_id`` (16 bytes)."""
    head = _HEAD.pack(MAGIC, FORMAT, 0, store_id)
    return (head + struct.pack("<I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")


def encode(seq: int, payload: bytes) -> bytes:
    """A record's bytes."""
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    return _RECORD.pack(len(payload), crc, seq) + payload


def decode(data: bytes, seq: int | None, base: int = 0) -> Iterator[tuple[int, Record]]:
    """The records in ``data`` (the file's bytes from offset ``base``),
    the first numbered ``seq`` (any number if ``None``), each with the
    file offset just past it; stops at the first that is incomplete,
    damaged or out of sequence."""
    at = 0
    while at + _RECORD.size <= len(data):
        length, crc, got = _RECORD.unpack_from(data, at)
        end = at + _RECORD.size + length
        if (seq is not None and got != seq) or length > MAX_RECORD or end > len(data):
            return
        payload = bytes(data[at + _RECORD.size : end])
        if zlib.crc32(payload, zlib.crc32(_SEQ.pack(got))) != crc:
            return
        yield base + end, Record(got, payload)
        at, seq = end, got + 1


class LogFile:
    """The log, open and held shared (see the module doc).

    Attributes:
        fd: its descriptor.
        ino: its inode number.
        made: True if this object created the file.
    """

    def __init__(self, statedir: StateDir, fd: int, ino: int, made: bool) -> None:
        self.statedir = statedir
        self.fd = fd
        self.ino = ino
        self.made = made
        self.path = statedir.join(LOG_NAME)

    @classmethod
    def acquire(cls, statedir: StateDir, operation: str) -> LogFile:
        """Open the log (made, mode 0600, if missing) and hold it shared.

        A process folding the log holds it exclusively and then removes
        it: the shared lock waits for that, and a file removed meanwhile
        is opened again.

        Raises:
            StateError: the log is a symlink or not a regular file of the
                caller's (named).
        """
        for attempt in range(100):
            try:
                fd = statedir.open_file(
                    LOG_NAME, os.O_RDWR, operation, "state store log", create=True
                )
            except StateError:
                if attempt < 99 and statedir.lstat(LOG_NAME) is None:
                    continue  # removed between its creation's refusal and the open
                raise
            made = LOG_NAME in statedir.created
            with contextlib.suppress(ValueError):
                statedir.created.remove(LOG_NAME)  # its removal is the store's
            try:
                _lock(fd, fcntl.F_RDLCK, wait=True)
                st = os.fstat(fd)
                named = statedir.lstat(LOG_NAME)
            except BaseException:
                os.close(fd)
                raise
            if named is not None and named.st_ino == st.st_ino and st.st_nlink > 0:
                if made:
                    _sync_directory(statedir)
                return cls(statedir, fd, st.st_ino, made)
            os.close(fd)  # folded and removed while we waited: again
        raise StateError(
            f"the pool state log {statedir.join(LOG_NAME)} kept being removed while it was opened",
            operation,
            None,
        )

    def stat(self) -> os.stat_result | None:
        """The log's stat by name (``None`` if it was removed)."""
        return self.statedir.lstat(LOG_NAME)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_from(self, offset: int, size: int) -> bytes:
        """The bytes from ``offset`` to ``size``."""
        chunks = []
        while offset < size:
            chunk = os.pread(self.fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def check_header(self, data: bytes, store_id: bytes) -> bool:
        """True if ``data`` (the file from offset 0) starts with this
        store's header; False if the file holds no complete header (a
        new log, or one whose creation a crash interrupted before any
        record).

        Raises:
            StateError: a header of another store, of a newer format, or
                damaged with records after it.
        """
        if len(data) < HEADER_SIZE:
            mine = header(store_id)[: len(data)]
            if data == mine or not any(data):
                return False  # a header whose write a crash cut short
            raise self.damaged("it is too short to be a libdm store log, and not one cut short")
        magic, fmt, _reserved, owner = _HEAD.unpack_from(data, 0)
        (crc,) = struct.unpack_from("<I", data, _HEAD.size)
        if magic != MAGIC or crc != zlib.crc32(data[: _HEAD.size]):
            if not any(data[: _HEAD.size + 4]):
                return False  # zeros: the header's write never reached the disk
            raise self.damaged("its header is not a libdm store log's, or is damaged")
        if fmt > FORMAT:
            raise StateError(
                f"the pool state log {self.path} was written by a newer libdm "
                f"(log format {fmt}, this one knows {FORMAT})",
                "open",
                None,
            )
        if owner != store_id:
            raise self.damaged(
                "it belongs to another state store than the state.db beside it "
                "(was state.db replaced by a copy?)"
            )
        return True

    def damaged(self, why: str) -> StateError:
        return StateError(
            f"the pool state log {self.path} is unusable: {why}; nothing was changed or "
            f"deleted — move it away to use state.db as it is (the changes it holds are "
            f"then lost)",
            "open",
            None,
        )

    def write_header(self, store_id: bytes) -> None:
        self._pwrite(header(store_id), 0)

    def append(self, data: bytes, offset: int, durable: bool) -> None:
        """Write ``data`` at ``offset``; with ``durable``, fdatasync."""
        self.write(data, offset)
        if durable:
            self.sync()

    def write(self, data: bytes, offset: int) -> None:
        self._pwrite(data, offset)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def _pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            if written <= 0:
                raise OSError(errno.EIO, f"short write to {self.path}")
            view, offset = view[written:], offset + written

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def try_exclusive(self) -> bool:
        """Hold the log exclusively if no other process has it open; on
        False the shared hold stays as it was."""
        return _lock(self.fd, fcntl.F_WRLCK, wait=False)

    def reshare(self) -> None:
        """Back from exclusive to shared (never refused)."""
        _lock(self.fd, fcntl.F_RDLCK, wait=True)

    def remove(self) -> None:
        """Unlink the log (held exclusively: no one else has it open)."""
        self.statedir.unlink(LOG_NAME)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock(fd: int, kind: int, wait: bool) -> bool:
    """An open-file-description lock on the whole log (``F_OFD_SETLK``):
    ``kind`` is ``fcntl.F_RDLCK``, ``F_WRLCK`` or ``F_UNLCK``.  Unlike
    ``flock``, a conversion that is refused leaves the lock held as it
    was, so a failed try for the exclusive lock never drops the shared
    one.  True if set; False if refused (only without ``wait``)."""
    request = struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _sync_directory(statedir: StateDir) -> None:
    """Make a new log's directory entry durable: a synced record in a
    file whose name a power cut lost would be lost with it."""
    with contextlib.suppress(OSError):  # a filesystem that cannot sync a directory
        os.fsync(statedir.fd)
