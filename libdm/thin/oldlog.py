"""Reading the log that schema 2 stores kept in front of ``state.db``
(``state.db-log``), for their upgrade: the store folds it into SQLite
once, at the first open, and removes it (see :mod:`libdm.thin.store`).

Layout (little-endian)::

    header   8 bytes "LIBDMLOG", u32 format, u32 reserved,
             16 bytes the store's id (state.db's meta.store_id),
             u32 CRC-32 of the 32 bytes before it, 28 bytes zero
    record   u32 payload length, u32 CRC-32 of (seq, payload), u64 seq,
             payload (JSON: a list of [table, key, row or null])

Records carry consecutive sequence numbers from ``meta.log_seq + 1``.
Only the last record may be incomplete or fail its CRC: the torn end of
a write a crash interrupted (never synced, so nothing relied on it; the
older libdm cut such a tail off before it wrote the next record).  A
record that fails its CRC with more bytes after it is damage, and the
upgrade refuses it rather than lose the records behind it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from libdm.thin.errors import StateError
from libdm.thin.statedir import StateDir

__all__ = ["LOG_NAME", "OldLog", "read"]

LOG_NAME = "state.db-log"
FORMAT = 1
MAGIC = b"LIBDMLOG"
HEADER_SIZE = 64
_HEAD = struct.Struct("<8sII16s")
_RECORD = struct.Struct("<IIQ")
_SEQ = struct.Struct("<Q")
MAX_RECORD = 1 << 24

#: A change as the log recorded it: table, key, the row's columns or None.
Change = tuple[str, "int | str", "list[Any] | None"]


@dataclass(frozen=True)
class OldLog:
    """A log read whole: its records' changes after ``state.db``'s
    ``log_seq``, and the number of its last record."""

    changes: tuple[tuple[int, tuple[Change, ...]], ...]
    last_seq: int


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))


def _damaged(path: str, why: str) -> StateError:
    return StateError(
        f"the pool state log {path} of an older libdm is damaged: {why}; nothing was "
        f"changed or deleted — restore the pool's state directory from a backup, or move "
        f"the log away to open state.db without the changes it holds",
        "open",
        None,
    )


def hold(statedir: StateDir, fd: int) -> None:
    """Take the log exclusively (an open-file-description lock, as the
    older libdm held it shared while it had the pool open).

    Raises:
        StateError: a process of an older libdm has the pool open.
    """
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise StateError(
            f"a process of an older libdm has the pool open (it holds "
            f"{statedir.join(LOG_NAME)}); close it, then open the pool with this libdm "
            f"to upgrade its state store",
            "open",
            None,
        ) from None


def read(path: str, data: bytes, store_id: bytes, folded: int, columns: dict[str, int]) -> OldLog:
    """Check and decode the log's bytes ``data``.

    Args:
        path: the log's path, for errors.
        store_id: state.db's ``meta.store_id``.
        folded: state.db's ``meta.log_seq`` (records up to it are in
            state.db already: a fold whose removal of the log a crash
            interrupted).
        columns: each table's number of columns in a row.

    Raises:
        StateError: another store's or a newer format's header, damage
            before the last record, records that do not follow state.db,
            a record that is not a list of changes.
    """
    if len(data) < HEADER_SIZE:
        head = _HEAD.pack(MAGIC, FORMAT, 0, store_id)
        mine = (head + struct.pack("<I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")
        if not any(data) or data == mine[: len(data)]:
            return OldLog((), folded)  # a header whose write a crash cut short
        raise _damaged(path, "it is too short to be a libdm store log")
    magic, fmt, _reserved, owner = _HEAD.unpack_from(data, 0)
    (crc,) = struct.unpack_from("<I", data, _HEAD.size)
    if magic != MAGIC or crc != zlib.crc32(data[: _HEAD.size]):
        if not any(data[: _HEAD.size + 4]) and not any(data[HEADER_SIZE:]):
            return OldLog((), folded)  # zeros: the header never reached the disk
        raise _damaged(path, "its header is not a libdm store log's, or is damaged")
    if fmt > FORMAT:
        raise _damaged(path, f"its format {fmt} is newer than this libdm knows ({FORMAT})")
    if owner != store_id:
        raise _damaged(path, "it belongs to another state store than the state.db beside it")
    out: list[tuple[int, tuple[Change, ...]]] = []
    at = HEADER_SIZE
    last: int | None = None
    while at + _RECORD.size <= len(data):
        length, crc, seq = _RECORD.unpack_from(data, at)
        end = at + _RECORD.size + length
        expected = None if last is None else last + 1
        whole = length <= MAX_RECORD and end <= len(data)
        payload = bytes(data[at + _RECORD.size : end]) if whole else b""
        if not whole or _crc(seq, payload) != crc or (expected is not None and seq != expected):
            # The torn tail of a last write has nothing valid after it.
            if _valid_record_after(data, at + 1, (last or folded) + 1):
                number = (last or folded) + 1
                raise _damaged(
                    path,
                    f"record {number} (at byte {at}) fails its checksum and valid records "
                    f"follow it",
                )
            break
        if last is None and seq > folded + 1:
            raise _damaged(
                path,
                f"its first record is number {seq} but state.db ends at {folded} "
                f"(was state.db replaced by an older copy?)",
            )
        if seq > folded:
            out.append((seq, _decode(path, seq, payload, columns)))
        last, at = seq, end
    if last is not None and last < folded:
        raise _damaged(
            path,
            f"its records end at number {last} but state.db at {folded} "
            f"(was state.db replaced by a newer copy?)",
        )
    return OldLog(tuple(out), folded if last is None else max(last, folded))


def _valid_record_after(data: bytes, start: int, min_seq: int) -> bool:
    """True if a whole record numbered ``min_seq`` or later, with a
    matching CRC, starts anywhere from byte ``start``."""
    for at in range(start, len(data) - _RECORD.size + 1):
        length, crc, seq = _RECORD.unpack_from(data, at)
        end = at + _RECORD.size + length
        if seq < min_seq or seq > min_seq + (1 << 20) or length > MAX_RECORD:
            continue
        if end <= len(data) and _crc(seq, bytes(data[at + _RECORD.size : end])) == crc:
            return True
    return False


def _decode(path: str, seq: int, payload: bytes, columns: dict[str, int]) -> tuple[Change, ...]:
    try:
        items = json.loads(payload)
        if not isinstance(items, list):
            raise ValueError("not a list")
        out: list[Change] = []
        for item in items:
            if not (isinstance(item, list) and len(item) == 3 and item[0] in columns):
                raise ValueError(f"not a change: {str(item)[:60]}")
            table, key, value = item
            if not isinstance(key, int | str) or isinstance(key, bool):
                raise ValueError(f"bad key {key!r}")
            if value is not None and not (
                isinstance(value, list) and len(value) == columns[table]
            ):
                raise ValueError(f"bad row for {table}: {str(value)[:60]}")
            out.append((table, key, value))
    except ValueError as exc:
        raise _damaged(path, f"record {seq} is not valid ({exc})") from None
    return tuple(out)
