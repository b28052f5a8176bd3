"""The pool's state store: a SQLite checkpoint and a log in front of it.

It lives in the pool's state directory (private: see ``statedir.py``) as
``state.db`` (mode 0600, SQLite, WAL mode, ``synchronous=FULL``) and,
while the store is open, ``state.db-log`` (see ``storelog.py``).  It
holds:

* ``pool``: one row of configuration (devices, block size, features, low
  water mark, options) and the last committed transaction id;
* ``devices``: every thin device (name, thin id, size in sectors, parent,
  whether it should be active);
* ``intents``: the journal of a change in flight.  An intent is written
  before the kernel is asked, and removed in the same store transaction
  that records the outcome, so after a crash ``Pool.open`` knows exactly
  which change may be half done (see ``journal.py``);
* ``deferred_deletes``: thin ids whose delete met EBUSY, retried later;
* ``free_ids`` / ``foreign_ids`` and ``meta.next_id``: thin id allocation
  (the lowest free id is reused; ids the kernel holds without a record
  here are never handed out).

How a change is stored: every table is held in memory, indexed, and a
store transaction is one record appended to the log: one ``pwrite``, and
one ``fdatasync`` when it must be durable (an intent must be on disk
before the kernel is told; an outcome may be lost to a power cut, since
``Pool.open`` rolls it forward from its intent, and the next synced
record makes it durable too).  Reads cost no system call but one
``stat`` of the log, which tells whether another process appended to it.
The log is folded into ``state.db`` (one SQLite transaction) by the last
process to close the store, by a process that finds it past
:data:`LOG_LIMIT` while it is the only one with the store open, and by
the next open after a crash, which first replays it (a torn tail, the
unsynced end of a write a crash interrupted, fails its checksum and is
ignored).  ``state.db`` is otherwise never written, so between uses it
is the whole state, and can be inspected and repaired with ``sqlite3``.

Schema versions: 1 (every change a SQLite transaction), 2 (the log;
``meta`` records ``log_seq``, the last log record folded, and
``store_id``, which the log's header repeats).  An older store is
upgraded in place when it is opened (:data:`MIGRATIONS`); a newer one is
refused.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, NamedTuple

from libdm.dm.errors import NEEDS_ROOT, PermissionDeniedError
from libdm.thin import storelog
from libdm.thin.errors import StateError
from libdm.thin.statedir import StateDir
from libdm.thin.storelog import HEADER_SIZE, LOG_NAME, LogFile

__all__ = [
    "COMPANIONS",
    "DB_NAME",
    "LOG_LIMIT",
    "LOG_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STORE_FILES",
    "Migration",
    "Store",
]

logger = logging.getLogger("libdm")

#: A row as the store returns it: column name -> value (a fresh dict).
Row = dict[str, Any]

DB_NAME = "state.db"
#: The files SQLite keeps beside the database (``state.db-wal`` ...).
COMPANIONS = ("-wal", "-shm", "-journal")
#: The store's files, the database first.
STORE_FILES = (DB_NAME, *tuple(DB_NAME + suffix for suffix in COMPANIONS), LOG_NAME)
SCHEMA_VERSION = 2
#: The log is folded into state.db when it grows past this many bytes
#: (and this process is the only one with the store open).
LOG_LIMIT = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pool (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    uuid TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    transaction_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    thin_id INTEGER NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    parent TEXT,
    active INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE INDEX IF NOT EXISTS devices_parent ON devices(parent);
CREATE INDEX IF NOT EXISTS devices_active ON devices(active) WHERE active = 1;
CREATE TABLE IF NOT EXISTS intents (
    txid INTEGER PRIMARY KEY,
    op TEXT NOT NULL,
    thin_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    size INTEGER,
    parent TEXT,
    origin_id INTEGER
);
CREATE TABLE IF NOT EXISTS free_ids (thin_id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS foreign_ids (thin_id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS deferred_deletes (
    thin_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    queued TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
"""


# -- migrations ----------------------------------------------------------------------


class Migration(NamedTuple):
    """One step of the schema: ``apply`` brings a database at version
    ``version - 1`` to ``version`` (inside the caller's transaction)."""

    version: int
    what: str
    apply: Callable[[sqlite3.Connection], None]


def _to_2(db: sqlite3.Connection) -> None:
    db.execute("INSERT OR IGNORE INTO meta VALUES ('log_seq', '0')")
    db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (os.urandom(16).hex(),))


#: Every migration, in order; the last one's version is SCHEMA_VERSION.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "the log in front of state.db: meta.log_seq and meta.store_id", _to_2),
)


# -- the tables in memory --------------------------------------------------------------
#
# A change is (table, key, value): the row's new value, or None to delete
# it.  The log's records are lists of changes, JSON-encoded as
# [table, key, value]; a row's value is a list of its columns, in the
# order of _COLUMNS.

_COLUMNS: dict[str, tuple[str, ...]] = {
    "pool": ("name", "uuid", "kind", "config", "transaction_id"),
    "devices": ("thin_id", "size", "parent", "active", "created"),
    "intents": ("op", "thin_id", "name", "size", "parent", "origin_id"),
    "deferred_deletes": ("name", "queued"),
    "meta": ("value",),
    "free_ids": (),
    "foreign_ids": (),
}
_KEYS = {
    "pool": "id",
    "devices": "name",
    "intents": "txid",
    "deferred_deletes": "thin_id",
    "meta": "key",
    "free_ids": "thin_id",
    "foreign_ids": "thin_id",
}

Key = int | str
Change = tuple[str, Key, "list[Any] | None"]


class _Tables:
    """Every table of the store, in memory, with the indexes the reads use."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[Key, list[Any]]] = {table: {} for table in _COLUMNS}
        self.by_id: dict[int, str] = {}  # thin id -> device name
        self.children: dict[str, set[str]] = {}  # parent -> snapshot names
        self.intent_ids: dict[int, int] = {}  # thin id -> intents holding it
        self.free_heap: list[int] = []  # free_ids, lazily pruned

    def get(self, table: str, key: Key) -> list[Any] | None:
        return self.rows[table].get(key)

    def put(self, table: str, key: Key, value: list[Any] | None) -> list[Any] | None:
        """Set (or with ``None`` delete) one row; returns the old one."""
        rows = self.rows[table]
        old = rows.get(key)
        if old is not None:
            self._unindex(table, key, old)
        if value is None:
            rows.pop(key, None)
        else:
            rows[key] = value
            self._index(table, key, value)
        return old

    def _index(self, table: str, key: Key, value: list[Any]) -> None:
        if table == "devices":
            assert isinstance(key, str)
            self.by_id[value[0]] = key
            if value[2] is not None:
                self.children.setdefault(value[2], set()).add(key)
        elif table == "intents":
            self.intent_ids[value[1]] = self.intent_ids.get(value[1], 0) + 1
        elif table == "free_ids":
            assert isinstance(key, int)
            heapq.heappush(self.free_heap, key)

    def _unindex(self, table: str, key: Key, old: list[Any]) -> None:
        if table == "devices":
            if self.by_id.get(old[0]) == key:
                del self.by_id[old[0]]
            if old[2] is not None:
                names = self.children.get(old[2])
                if names is not None:
                    names.discard(str(key))
                    if not names:
                        del self.children[old[2]]
        elif table == "intents":
            left = self.intent_ids.get(old[1], 0) - 1
            if left > 0:
                self.intent_ids[old[1]] = left
            else:
                self.intent_ids.pop(old[1], None)

    def min_free(self) -> int | None:
        heap, free = self.free_heap, self.rows["free_ids"]
        while heap and heap[0] not in free:
            heapq.heappop(heap)
        return heap[0] if heap else None


def _row(table: str, key: Key, value: list[Any]) -> Row:
    row: Row = {_KEYS[table]: key}
    row.update(zip(_COLUMNS[table], value, strict=True))
    return row


def _by_key(item: tuple[Key, list[Any]]) -> Key:
    return item[0]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Stores open in this process: a child of fork() must not write through
# its parent's (they share the log's open file and its lock, so the parent
# may fold and remove the log under the child's change).
_open_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        store._forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class Store:
    """The state store of one pool.

    Args:
        directory: the pool's state directory: a path, or a
            :class:`~libdm.thin.statedir.StateDir`, which the store then
            owns (:meth:`close` closes it).
        create: make the database (and, given a path, the directory);
            otherwise a missing database is a ``StateError``.

    Attributes:
        db: the SQLite connection to ``state.db`` (the checkpoint; the
            current state is the store's, in memory and in the log).

    Raises:
        StateError: the database is missing (``create=False``), corrupt,
            truncated, from a newer libdm, or not a regular file of the
            caller's (a symlink is refused); its log is damaged or
            another store's; the directory is not private (see
            :class:`~libdm.thin.statedir.StateDir`).  Nothing is deleted
            or chmod'ed.
        PoolReadOnlyError: the directory is on a read-only filesystem.

    Several processes may have one store open.  Changes must be
    serialised by the caller (the pool's lock); each read and each
    transaction first takes in the changes other processes made.  A
    ``Store`` may be shared by threads.
    """

    db: sqlite3.Connection

    def __init__(self, directory: str | os.PathLike[str] | StateDir, *, create: bool = False):
        if isinstance(directory, StateDir):
            statedir = directory
        else:
            statedir = (
                StateDir.claim(directory, STORE_FILES) if create else StateDir.open(directory)
            )
        self._lock: threading.RLock = threading.RLock()
        self._depth = 0
        self._held = 0
        self._changes: list[tuple[str, Key, list[Any] | None, list[Any] | None]] = []
        self._durable = False
        self._log: LogFile | None = None
        self._pid = os.getpid()
        self._forked = False
        _open_stores.add(self)
        self._tables = _Tables()
        self._unfolded: list[list[Change]] = []
        self._fold_tried = 0
        self._unsynced = False
        self._folded_config: str | None = None
        try:
            self._open(statedir, create)
        except BaseException:
            if statedir is not directory:
                statedir.close(remove_made=True)
            raise
        self.statedir = statedir

    def _open(self, statedir: StateDir, create: bool) -> None:
        self.directory = statedir.path
        self.path = statedir.join(DB_NAME)
        self.statedir = statedir
        operation = "create" if create else "open"
        if create:
            os.close(statedir.make_file(DB_NAME, operation, "state store"))
        elif statedir.check_file(DB_NAME, operation, "state store") is None:
            raise StateError(
                f"no pool state in {self.directory} ({DB_NAME} is missing)", operation, None
            )
        # SQLite opens these by name, following symlinks: check them first.
        for name in STORE_FILES[1:]:
            statedir.check_file(name, operation, "state store")
        if not os.access(self.path, os.R_OK | os.W_OK):
            self._refuse_permission()
        try:
            self.db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            if create:
                self.db.executescript(_SCHEMA)
                self.db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                _to_2(self.db)
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            if hasattr(self, "db"):
                self.db.close()
            raise self._unreadable(exc) from exc
        try:
            self._load(operation)
        except BaseException:
            self._release_log(fold=False)
            self.db.close()
            raise

    def _unreadable(self, exc: Exception) -> StateError:
        return StateError(
            f"the pool state in {self.path} is unreadable ({exc}); nothing was "
            f"changed or deleted — restore it from a backup or inspect it with sqlite3",
            "open",
            None,
        )

    def _refuse_permission(self) -> None:
        raise PermissionDeniedError(
            errno.EACCES,
            f"cannot open the pool state in {self.directory}: {NEEDS_ROOT}",
            "open",
            None,
        )

    def _check_schema(self) -> None:
        found = self._schema_version()
        if found > SCHEMA_VERSION:
            raise StateError(
                f"the pool state in {self.path} was written by a newer libdm "
                f"(schema {found}, this one knows {SCHEMA_VERSION})",
                "open",
                None,
            )
        if found < SCHEMA_VERSION:
            self._migrate()

    def _schema_version(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise sqlite3.DatabaseError("no schema version")
        try:
            return int(row[0])
        except ValueError:
            raise sqlite3.DatabaseError(f"schema version {row[0]!r}") from None

    def _migrate(self) -> None:
        """Bring an older schema up to SCHEMA_VERSION, in one transaction
        (another process may be doing the same: the second finds it done)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            found = self._schema_version()
            for step in MIGRATIONS:
                if step.version > found:
                    step.apply(self.db)
                    found = step.version
            self.db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(found),)
            )
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    # -- loading and following the log ---------------------------------------------

    def _load(self, operation: str) -> None:
        """Hold the log, read state.db, replay the log after it; a log
        left with records (a crash, or processes that kept the store open
        while others closed it) is folded now if this process is alone."""
        self._log = LogFile.acquire(self.statedir, operation)
        self._reload()
        if self._unfolded:
            self._maybe_compact(now=True)

    def _reload(self) -> None:
        """Everything again: state.db, then the log (held shared)."""
        assert self._log is not None
        self._log_end = -1  # readers wait for the lock until this is done
        tables = _Tables()
        try:
            cursor = self.db.cursor()
            cursor.row_factory = None  # plain tuples: faster for every row
            cursor.execute("BEGIN")
            try:
                meta = dict(cursor.execute("SELECT key, value FROM meta").fetchall())
                for table in _COLUMNS:
                    if table == "meta":
                        continue
                    columns = ", ".join((_KEYS[table], *_COLUMNS[table]))
                    where = " WHERE id = 1" if table == "pool" else ""
                    for row in cursor.execute(f"SELECT {columns} FROM {table}{where}"):
                        tables.put(table, row[0], list(row[1:]))
            finally:
                cursor.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from exc
        for key, value in meta.items():
            tables.put("meta", key, [value])
        try:
            self._db_seq = int(meta["log_seq"])
            self._store_id = bytes.fromhex(meta["store_id"])
            if len(self._store_id) != 16:
                raise ValueError("not 16 bytes")
        except (KeyError, ValueError) as exc:
            raise self.damaged("meta", f"has no valid log_seq and store_id ({exc})") from None
        self._tables = tables
        pool_row = tables.get("pool", 1)
        self._folded_config = None if pool_row is None else pool_row[3]
        self._seq = self._db_seq
        self._unfolded = []
        self._log_end = HEADER_SIZE
        self._log_ino = self._log.ino
        size = self._log.size()
        data = self._log.read_from(0, size)
        if not self._log.check_header(data, self._store_id):
            if size > HEADER_SIZE and any(data):
                raise self._log.damaged("its header is incomplete but records follow it")
            self._log.write_header(self._store_id)
            self._log_size = HEADER_SIZE if size <= HEADER_SIZE else size
            return
        self._log_size = size
        records = storelog.decode(data[HEADER_SIZE:], None, HEADER_SIZE)
        first = next(records, None)
        if first is None:
            return
        if first[1].seq > self._db_seq + 1:
            raise self._log.damaged(
                f"its first record is number {first[1].seq} but state.db ends at "
                f"{self._db_seq} (was state.db replaced by an older copy?)"
            )
        # Records up to state.db's log_seq were folded already (a crash
        # between the fold and the log's truncation leaves them).
        for end, record in (first, *records):
            if record.seq <= self._db_seq:
                self._log_end = end
            else:
                self._apply(end, record)
        if self._log_end > HEADER_SIZE and self._seq == self._db_seq and record.seq != self._seq:
            raise self._log.damaged(
                f"its records end at number {record.seq} but state.db at {self._db_seq} "
                f"(was state.db replaced by a newer copy?)"
            )

    def _apply(self, end: int, record: storelog.Record) -> None:
        """Apply one record read from the log, ending at offset ``end``."""
        try:
            changes = _decode_changes(record.payload)
        except ValueError as exc:
            assert self._log is not None
            raise self._log.damaged(f"record {record.seq} is not valid ({exc})") from None
        for table, key, value in changes:
            self._tables.put(table, key, value)
        self._unfolded.append(changes)
        self._seq = record.seq
        self._log_end = end

    def _read_tail(self, size: int) -> None:
        """Apply the records from the last one read to byte ``size``."""
        assert self._log is not None
        data = self._log.read_from(self._log_end, size)
        for end, record in storelog.decode(data, self._seq + 1, self._log_end):
            self._apply(end, record)

    @property
    def sequence(self) -> int:
        """The number of the last change this store has taken in or made
        (they never restart): equal numbers mean equal contents, so a pool
        re-reads its configuration only when another process changed it."""
        self._refresh()
        return self._seq

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """``with store.held():`` around the store calls of a caller that
        holds the pool's lock: other processes' changes are taken in once,
        here, and the calls inside skip their check of the log (no other
        process can change the store while the pool's lock is held).
        Optional: without it each call checks for itself."""
        self._refresh()
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    def share_lock(self, lock: threading.RLock) -> None:
        """Use ``lock`` (a re-entrant lock) instead of the store's own: a
        pool passes the one it holds around its changes, so that the
        store's transactions inside them take no lock of their own (on
        CPython 3.11 each first acquisition reads the clock, a system
        call where there is no vDSO, as in User-Mode Linux)."""
        self._lock = lock

    def _refresh(self) -> None:
        """Take in what other processes appended since the last look: a
        ``stat`` of the log, and the store's lock only if it moved."""
        log = self._log
        if self._depth or self._held or log is None:
            return
        st = log.stat()
        if st is not None and st.st_ino == self._log_ino and st.st_size == self._log_end:
            return
        with self._lock:
            if self._log is not None:
                self._take_in(self._log.stat())

    def _take_in(self, st: os.stat_result | None) -> None:
        """Under the lock: follow the log from ``st``, its stat now."""
        assert self._log is not None
        if st is not None and st.st_ino == self._log_ino and st.st_size == self._log_end:
            return
        if (
            st is None
            or st.st_ino != self._log_ino
            or st.st_size < self._log_end
            or self._log_end < 0  # a reload that failed
        ):
            # Folded and removed or truncated: by a process that found this
            # one gone (a fork's close, or the shared hold lost for a moment).
            log, self._log = self._log, None
            log.close()
            self._log = LogFile.acquire(self.statedir, "open")
            self._reload()
            return
        self._log_size = st.st_size
        self._read_tail(st.st_size)
        if self._log_end > LOG_LIMIT:
            self._maybe_compact()  # a reader alone at last folds what others left

    # -- closing ------------------------------------------------------------------------

    def close_db(self) -> None:
        """Close the database and the log (the directory stays open)."""
        with self._lock:
            try:
                self._release_log(fold=True)
            finally:
                self.db.close()

    def close(self, remove_made: bool = False) -> None:
        """Close the store and the directory.

        Args:
            remove_made: remove what this store's directory object made
                (a failed creation): the database, its log and its SQLite
                files if it made the database, the other files it made,
                and the directory if it made it and it is empty.
        """
        with self._lock:
            try:
                self._release_log(fold=not remove_made)
            finally:
                self.db.close()
                if remove_made and DB_NAME in self.statedir.created:
                    for name in STORE_FILES:
                        self.statedir.unlink(name)
                self.statedir.close(remove_made=remove_made)

    def __del__(self) -> None:
        # A store dropped without close: let go of the log (no fold).
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()

    def _release_log(self, fold: bool) -> None:
        """Close the log; if no other process has it open, fold it into
        state.db first (with ``fold``) and remove it."""
        log, self._log = self._log, None
        if log is None:
            return
        try:
            if os.getpid() != self._pid or self._depth:
                return  # a fork's copy, or closed mid-transaction: leave it
            if not log.try_exclusive():
                return
            self._log = log
            try:
                if fold:
                    self._catch_up()
                    self._fold()
                    log.remove()
                elif log.size() <= HEADER_SIZE and (log.made or self._header_only(log)):
                    log.remove()  # a failed open's, holding no record
            finally:
                self._log = None
        finally:
            log.close()

    def _header_only(self, log: LogFile) -> bool:
        store_id = getattr(self, "_store_id", None)
        return store_id is not None and log.read_from(0, HEADER_SIZE) == storelog.header(store_id)

    def _catch_up(self) -> None:
        """Read the log's tail (held exclusively: nothing is in flight)."""
        assert self._log is not None
        size = self._log_size = self._log.size()
        if size > self._log_end:
            self._read_tail(size)

    def _fold(self) -> None:
        """Write the log's changes into state.db in one durable SQLite
        transaction (the log is held exclusively)."""
        if not self._unfolded:
            return
        net: dict[tuple[str, Key], list[Any] | None] = {}
        for changes in self._unfolded:
            for table, key, value in changes:
                net.pop((table, key), None)  # keep the order of last writes
                net[(table, key)] = value
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for (table, key), value in net.items():
                    if value is None:
                        self.db.execute(f"DELETE FROM {table} WHERE {_KEYS[table]} = ?", (key,))
                for (table, key), value in net.items():
                    if value is not None:
                        columns = (_KEYS[table], *_COLUMNS[table])
                        self.db.execute(
                            f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) "
                            f"VALUES ({', '.join('?' * len(columns))})",
                            (key, *value),
                        )
                self.db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('log_seq', ?)", (str(self._seq),)
                )
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back itself
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"could not write the pool state log into {self.path} ({exc}); the log "
                f"{self.statedir.join(LOG_NAME)} keeps the changes",
                "close",
                None,
            ) from exc
        self._db_seq = self._seq
        self._unfolded = []
        pool_row = self._tables.get("pool", 1)
        self._folded_config = None if pool_row is None else pool_row[3]

    def _compact(self, now: bool = False) -> None:
        """Past LOG_LIMIT (or ``now``): fold and empty the log if this
        process is the only one with the store open (else try again
        later)."""
        assert self._log is not None
        if not now and self._log_end - self._fold_tried < LOG_LIMIT // 4:
            return
        self._fold_tried = self._log_end
        if self._log.try_exclusive():
            try:
                self._catch_up()
                self._fold()
                self._log.truncate(HEADER_SIZE)
                self._log_end = self._log_size = HEADER_SIZE
                self._fold_tried = 0
            finally:
                self._log.reshare()
        else:
            self._log.reshare()

    # -- transactions ------------------------------------------------------------------

    def transaction(self, durable: bool = True) -> _Transaction:
        """``with store.transaction():`` — one atomic change.

        ``durable=False`` skips the ``fdatasync`` at commit: the change
        survives a killed process but may be lost to a power cut.  The
        journal uses it for *outcomes* only: their intent was made durable
        first, so a lost outcome is re-derived from the intent by
        ``Pool.open``.  The next durable commit makes it durable too (the
        log is written in order).  A transaction inside another joins it
        (the outer one says whether it is durable).
        """
        return _Transaction(self, durable)

    def _begin(self, durable: bool) -> None:
        self._lock.acquire()
        try:
            if self._depth == 0:
                self._refresh()
                self._changes = []
                self._durable = durable  # the outermost transaction's
            self._depth += 1
        except BaseException:
            self._lock.release()
            raise

    def _end(self, failed: bool) -> None:
        try:
            self._depth -= 1
            if self._depth:
                return
            changes, self._changes = self._changes, []
            if failed:
                self._undo(changes)
                return
            if changes:
                try:
                    self._append([(t, k, new) for t, k, _old, new in changes], self._durable)
                except BaseException:
                    self._undo(changes)
                    if self._unsynced:
                        self._unsynced = False
                        self._take_back(changes)
                    raise
        finally:
            self._lock.release()

    def _take_back(
        self, changes: list[tuple[str, Key, list[Any] | None, list[Any] | None]]
    ) -> None:
        """A record complete in the log failed to sync: another process
        may have applied it already, so it is taken back by a record that
        restores the old rows (synced, as far as the disk allows), not by
        cutting it off."""
        with contextlib.suppress(OSError):
            self._append([(t, k, old) for t, k, old, _new in reversed(changes)], True)

    def _undo(self, changes: list[tuple[str, Key, list[Any] | None, list[Any] | None]]) -> None:
        for table, key, old, _new in reversed(changes):
            self._tables.put(table, key, old)

    def _append(self, changes: list[Change], durable: bool) -> None:
        log = self._log
        if log is None:
            raise ValueError(f"the pool state in {self.path} is closed")
        if self._forked:
            raise StateError(
                f"the pool state in {self.path} was opened by process {self._pid} before a "
                "fork(): open the pool again in this process to change it",
                "change",
            )
        if self._log_size > self._log_end:
            # The torn tail of a write a crash interrupted (the caller holds
            # the pool's lock: no write is in flight): cut it off.
            log.truncate(self._log_end)
        seq = self._seq + 1
        data = storelog.encode(seq, json.dumps(changes, separators=(",", ":")).encode())
        written = False
        try:
            log.write(data, self._log_end)
            written = True  # complete in the file: readers may apply it
            if durable:
                log.sync()
        except BaseException:
            if written:  # kept, and taken back by the caller (_take_back)
                self._unsynced = True
                self._seq, self._log_end = seq, self._log_end + len(data)
                self._log_size = self._log_end
                self._unfolded.append(changes)
                raise
            # Maybe written in part, or not synced: take it back (the next
            # append cuts it off if this cannot).
            self._log_size = self._log_end + len(data)
            with contextlib.suppress(OSError):
                log.truncate(self._log_end)
                self._log_size = self._log_end
            raise
        self._seq = seq
        self._log_end = self._log_size = self._log_end + len(data)
        self._unfolded.append(changes)
        now = any(
            table == "pool" and value is not None and value[3] != self._folded_config
            for table, _key, value in changes
        )
        # now: the configuration changed (a new pool, a growth, a setting):
        # rare, and read from state.db by tools, so written there at once.
        if now or self._log_end > LOG_LIMIT:
            self._maybe_compact(now)

    def _maybe_compact(self, now: bool = False) -> None:
        """:meth:`_compact`, whose failure leaves the log as it is (it
        keeps every change: folding is for later)."""
        try:
            self._compact(now)
        except (OSError, StateError) as exc:
            logger.warning("%s: the log stays unfolded for now: %s", self.path, exc)

    def _put(self, table: str, key: Key, value: list[Any] | None) -> None:
        """Change one row, inside the current transaction (or in one of
        its own, as SQLite's autocommit did)."""
        if self._depth == 0:
            with self.transaction():
                self._put(table, key, value)
            return
        old = self._tables.put(table, key, value)
        self._changes.append((table, key, old, value))

    def _get(self, table: str, key: Key) -> list[Any] | None:
        self._refresh()
        return self._tables.get(table, key)

    # -- pool ----------------------------------------------------------------

    def init_pool(
        self, name: str, uuid: str, kind: str, config: dict[str, Any], transaction_id: int = 0
    ) -> None:
        with self.transaction():
            if self._tables.get("pool", 1) is not None:
                raise sqlite3.IntegrityError("UNIQUE constraint failed: pool.id")
            self._put(
                "pool",
                1,
                [name, uuid, kind, json.dumps(config, sort_keys=True), int(transaction_id)],
            )

    def _pool_row(self) -> list[Any]:
        row = self._get("pool", 1)
        if row is None:
            raise StateError(
                f"{self.path} records no pool (its creation was interrupted)",
                "open",
                None,
            )
        return row

    def pool(self) -> Row:
        """The pool row as a dict with ``config`` decoded.

        Raises:
            StateError: no pool recorded (an interrupted ``create``), or a
                config that is not a JSON object with the fields every pool
                has (the file and the field are named).
        """
        out = _row("pool", 1, self._pool_row())
        out["config"] = self._decode_config(out["config"])
        return out

    def _decode_config(self, text: Any) -> dict[str, Any]:
        try:
            config = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise self.damaged("config", f"is not JSON ({exc})") from None
        if not isinstance(config, dict):
            raise self.damaged("config", f"is not a JSON object (it is {text[:40]!r})")
        for field, types in _CONFIG_FIELDS.items():
            if field not in config:
                raise self.damaged(field, "is missing")
            if not _is(config[field], types):
                raise self.damaged(
                    field, f"is {config[field]!r}, not {' or '.join(t.__name__ for t in types)}"
                )
        return config

    def damaged(self, field: str, why: str) -> StateError:
        """The ``StateError`` for a stored field ``field`` that ``why``."""
        return StateError(
            f"the pool state in {self.path} is damaged: its field {field!r} {why}; nothing "
            f"was changed — restore it from a backup or inspect it with sqlite3",
            "open",
            None,
        )

    def set_config(self, config: dict[str, Any]) -> None:
        with self.transaction():
            row = self._tables.get("pool", 1)
            if row is not None:
                self._put("pool", 1, [*row[:3], json.dumps(config, sort_keys=True), row[4]])

    def transaction_id(self) -> int:
        value: int = self._pool_row()[4]
        return value

    def set_transaction_id(self, txid: int) -> None:
        with self.transaction():
            row = self._tables.get("pool", 1)
            if row is not None:
                self._put("pool", 1, [*row[:4], int(txid)])

    # -- devices ---------------------------------------------------------------

    def device(self, name: str) -> Row | None:
        row = self._get("devices", name)
        return None if row is None else _row("devices", name, row)

    def device_by_id(self, thin_id: int) -> Row | None:
        self._refresh()
        tables = self._tables
        name = tables.by_id.get(thin_id)
        row = None if name is None else tables.get("devices", name)
        return None if name is None or row is None else _row("devices", name, row)

    def devices(self) -> list[Row]:
        self._refresh()
        rows = sorted(self._tables.rows["devices"].items(), key=_by_key)
        return [_row("devices", name, value) for name, value in rows]

    def active_devices(self) -> list[Row]:
        self._refresh()
        rows = list(self._tables.rows["devices"].items())
        active = sorted((value[0], name, value) for name, value in rows if value[3])
        return [_row("devices", name, value) for _id, name, value in active]

    def children(self, name: str) -> list[str]:
        self._refresh()
        return sorted(self._tables.children.get(name, ()))

    def count_devices(self) -> int:
        self._refresh()
        return len(self._tables.rows["devices"])

    def add_device(
        self, name: str, thin_id: int, size: int, parent: str | None, active: bool = False
    ) -> None:
        with self.transaction():
            if self._tables.get("devices", name) is not None:
                raise sqlite3.IntegrityError("UNIQUE constraint failed: devices.name")
            if thin_id in self._tables.by_id:
                raise sqlite3.IntegrityError("UNIQUE constraint failed: devices.thin_id")
            self._put("devices", name, [thin_id, int(size), parent, 1 if active else 0, _now()])

    def drop_device(self, name: str) -> None:
        """Forget device ``name``; its snapshots become roots (their origin
        is gone, and their data stays theirs)."""
        with self.transaction():
            self._put("devices", name, None)
            for child in sorted(self._tables.children.get(name, ())):
                row = self._tables.get("devices", child)
                assert row is not None
                self._put("devices", child, [row[0], row[1], None, row[3], row[4]])

    def set_active(self, name: str, active: bool) -> None:
        self._update_device(name, 3, 1 if active else 0)

    def set_size(self, name: str, size: int) -> None:
        self._update_device(name, 1, int(size))

    def _update_device(self, name: str, column: int, value: int) -> None:
        with self.transaction():
            row = self._tables.get("devices", name)
            if row is not None and row[column] != value:
                new = list(row)
                new[column] = value
                self._put("devices", name, new)

    # -- thin ids --------------------------------------------------------------
    #
    # Every id below ``next_id`` is held by a device, an intent, a deferred
    # delete or the kernel alone (``foreign_ids``), or is in ``free_ids``.
    # So the lowest free id is the least of free_ids or else ``next_id``.

    def id_in_use(self, thin_id: int) -> bool:
        """True if the id is held by a device, an intent, a deferred delete
        or is known to be held by the kernel alone."""
        self._refresh()
        tables = self._tables
        return (
            thin_id in tables.by_id
            or thin_id in tables.intent_ids
            or thin_id in tables.rows["deferred_deletes"]
            or thin_id in tables.rows["foreign_ids"]
        )

    def allocate_id(self, limit: int) -> int | None:
        """Take the lowest free thin id (call inside a transaction).

        Returns:
            The id, or ``None`` when every id up to ``limit`` is taken.
        """
        with self.transaction():
            lowest = self._tables.min_free()
            if lowest is not None:
                self._put("free_ids", lowest, None)
                return lowest
            nxt = int(self._meta("next_id", "0") or 0)
            while nxt <= limit and self.id_in_use(nxt):
                nxt += 1
            if nxt > limit:
                return None
            self._set_meta("next_id", str(nxt + 1))
            return nxt

    def release_id(self, thin_id: int) -> None:
        """Give an id back for reuse (call inside a transaction)."""
        with self.transaction():
            if self._tables.get("free_ids", thin_id) is None:
                self._put("free_ids", thin_id, [])

    def mark_foreign(self, thin_id: int) -> None:
        """Record that the kernel holds an id this store never made."""
        with self.transaction():
            if self._tables.get("foreign_ids", thin_id) is None:
                self._put("foreign_ids", thin_id, [])

    def foreign_ids(self) -> list[int]:
        self._refresh()
        return sorted(int(k) for k in list(self._tables.rows["foreign_ids"]))

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._get("meta", key)
        return default if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._put("meta", key, [value])

    # -- intents ---------------------------------------------------------------

    def add_intent(
        self,
        txid: int,
        op: str,
        thin_id: int,
        name: str,
        size: int | None = None,
        parent: str | None = None,
        origin_id: int | None = None,
    ) -> None:
        with self.transaction():
            if self._tables.get("intents", txid) is not None:
                raise sqlite3.IntegrityError("UNIQUE constraint failed: intents.txid")
            self._put(
                "intents",
                txid,
                [op, thin_id, name, None if size is None else int(size), parent, origin_id],
            )

    def intents(self) -> list[Row]:
        self._refresh()
        rows = sorted(self._tables.rows["intents"].items(), key=_by_key)
        return [_row("intents", txid, value) for txid, value in rows]

    def drop_intent(self, txid: int) -> None:
        with self.transaction():
            if self._tables.get("intents", txid) is not None:
                self._put("intents", txid, None)

    # -- growth ----------------------------------------------------------------
    #
    # A growth (resize, extend, refresh, low water mark) changes no thin id
    # and no transaction id, so its intent is a JSON record of its own: the
    # configuration before and after, and the tables to roll back to.

    def growth_intent(self) -> dict[str, Any] | None:
        """The growth in flight, a dict, or ``None``."""
        text = self._meta("growth_intent")
        if text is None:
            return None
        record: dict[str, Any] = json.loads(text)
        return record

    def set_growth_intent(self, intent: dict[str, Any]) -> None:
        with self.transaction():
            self._set_meta("growth_intent", json.dumps(intent, sort_keys=True))

    def drop_growth_intent(self) -> None:
        with self.transaction():
            if self._tables.get("meta", "growth_intent") is not None:
                self._put("meta", "growth_intent", None)

    # -- deferred deletes ------------------------------------------------------

    def queue_delete(self, thin_id: int, name: str) -> None:
        with self.transaction():
            self._put("deferred_deletes", thin_id, [name, _now()])

    def deferred_deletes(self) -> list[Row]:
        self._refresh()
        rows = sorted(self._tables.rows["deferred_deletes"].items(), key=_by_key)
        return [_row("deferred_deletes", key, value) for key, value in rows]

    def drop_deferred_delete(self, thin_id: int) -> None:
        with self.transaction():
            if self._tables.get("deferred_deletes", thin_id) is not None:
                self._put("deferred_deletes", thin_id, None)


# The configuration fields every pool has, and their JSON types.
_CONFIG_FIELDS: dict[str, tuple[type, ...]] = {
    "block_size": (int,),
    "low_water_mark": (int,),
    "features": (list,),
    "min_free_space": (int, float),
    "deferred_removal": (bool,),
    "deferred_deletion": (bool,),
    "token": (str,),
}


def _is(value: object, types: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is no number here."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _decode_changes(payload: bytes) -> list[Change]:
    """A record's changes, checked against the tables' shapes.

    Raises:
        ValueError: not a list of [table, key, row or null].
    """
    items = json.loads(payload)
    if not isinstance(items, list):
        raise ValueError("not a list")
    out: list[Change] = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and item[0] in _COLUMNS):
            raise ValueError(f"not a change: {str(item)[:60]}")
        table, key, value = item
        if not isinstance(key, int | str) or isinstance(key, bool):
            raise ValueError(f"bad key {key!r}")
        if value is not None and not (
            isinstance(value, list) and len(value) == len(_COLUMNS[table])
        ):
            raise ValueError(f"bad row for {table}: {str(value)[:60]}")
        out.append((table, key, value))
    return out


class _Transaction:
    """The store's lock and one log record; undone in memory on an exception."""

    def __init__(self, store: Store, durable: bool = True) -> None:
        self.store = store
        self.durable = durable

    def __enter__(self) -> Store:
        self.store._begin(self.durable)
        return self.store

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.store._end(exc_type is not None)
