"""The pool's state store: one SQLite database per pool.

It lives in the pool's state directory (private: see ``statedir.py``) as
``state.db`` (mode 0600), in SQLite's WAL mode with ``synchronous=FULL``,
so a change committed before the kernel is told survives a power cut.
It holds:

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

What it returns are the frozen records of :mod:`libdm.thin.records`
(sizes in ``Sectors``, the configuration a ``PoolConfig``, an intent an
``Intent``), never rows; its changes take typed values too.

Every query touches rows by key, never a whole table, so a pool of 10,000
devices costs no more per change than a pool of 10.  A caller holding the
pool's lock wraps its store calls in :meth:`Store.held`: its reads share
one SQLite read transaction (one set of locks) until it writes.

SQLite's own write-ahead log (``state.db-wal``) is checkpointed into
``state.db`` as it grows (every 256 pages) and by the last connection to
close; a checkpoint that fails (a full filesystem) leaves the changes in
the WAL, where the next open finds them.

Schema versions: 1 (SQLite), 2 (a log of libdm's own in front of SQLite,
``state.db-log``), 3 (SQLite alone again).  An older store is upgraded in
place when it is opened (:data:`MIGRATIONS`): a schema 2 store's log is
checked, folded into ``state.db`` and removed.  A newer one is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, NamedTuple

from libdm.dm.errors import NEEDS_ROOT, DMError, PermissionDeniedError
from libdm.thin import oldlog
from libdm.thin.config import PoolConfig, PoolKind
from libdm.thin.errors import StateError
from libdm.thin.oldlog import LOG_NAME
from libdm.thin.records import (
    DeferredDelete,
    DeviceRecord,
    GrowthIntent,
    Intent,
    PoolRecord,
)
from libdm.thin.statedir import StateDir
from libdm.thin.units import Sectors

__all__ = [
    "COMPANIONS",
    "DB_NAME",
    "LOG_NAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STORE_FILES",
    "Migration",
    "Store",
]

logger = logging.getLogger("libdm")

DB_NAME = "state.db"
#: The files SQLite keeps beside the database (``state.db-wal`` ...).
COMPANIONS = ("-wal", "-shm", "-journal")
#: The store's files, the database first; the last is the log of schema
#: 2 stores, removed by their upgrade (refused if planted).
STORE_FILES = (DB_NAME, *tuple(DB_NAME + suffix for suffix in COMPANIONS), LOG_NAME)
SCHEMA_VERSION = 3
#: SQLite's codes for a -shm file it could not make or grow.
_NO_ROOM_FOR_THE_INDEX = frozenset(
    {"SQLITE_FULL", "SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_SHMOPEN", "SQLITE_IOERR_SHMMAP"}
)
#: SQLite checkpoints its WAL into state.db once it holds this many pages
#: (4 KiB each), and cuts the file back to WAL_LIMIT bytes after one.
CHECKPOINT_PAGES = 256
WAL_LIMIT = 1 << 20

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

# Each table's key and other columns, in the order SELECT * returns them.
_KEYS = {
    "pool": "id",
    "devices": "name",
    "intents": "txid",
    "deferred_deletes": "thin_id",
    "meta": "key",
    "free_ids": "thin_id",
    "foreign_ids": "thin_id",
}
_COLUMNS: dict[str, tuple[str, ...]] = {
    "pool": ("name", "uuid", "kind", "config", "transaction_id"),
    "devices": ("thin_id", "size", "parent", "active", "created"),
    "intents": ("op", "thin_id", "name", "size", "parent", "origin_id"),
    "deferred_deletes": ("name", "queued"),
    "meta": ("value",),
    "free_ids": (),
    "foreign_ids": (),
}


# -- migrations ----------------------------------------------------------------------


class Migration(NamedTuple):
    """One step of the schema: ``apply`` brings a database at version
    ``version - 1`` to ``version`` (inside the caller's transaction;
    ``after`` runs once it is committed)."""

    version: int
    what: str
    apply: Callable[[Store], None]
    after: Callable[[Store], None] | None = None


def _to_2(store: Store) -> None:
    store.db.execute("INSERT OR IGNORE INTO meta VALUES ('log_seq', '0')")
    store.db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (os.urandom(16).hex(),))


def _to_3(store: Store) -> None:
    store._fold_old_log()


def _after_3(store: Store) -> None:
    store._remove_old_log()


#: Every migration, in order; the last one's version is SCHEMA_VERSION.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "the log in front of state.db: meta.log_seq and meta.store_id", _to_2),
    Migration(3, "SQLite alone: the log folded into state.db and removed", _to_3, _after_3),
)


# A child of fork() must not use its parent's SQLite connection (SQLite's
# locks are the process's: the child would write without them).
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
        db: the SQLite connection to ``state.db``.

    Raises:
        StateError: the database is missing (``create=False``), corrupt,
            truncated, from a newer libdm, or not a regular file of the
            caller's (a symlink is refused); an older store's log is
            damaged, another store's, or held by an older libdm; the
            directory is not private (see
            :class:`~libdm.thin.statedir.StateDir`).  Nothing is deleted
            or chmod'ed.
        PoolReadOnlyError: the directory is on a read-only filesystem.

    Every failure to read or write the database (a full or failing
    filesystem included) is a ``StateError`` naming ``state.db`` and what
    failed; a failed transaction changes nothing.  Several processes may
    have one store open; changes must be serialised by the caller (the
    pool's lock).  A ``Store`` may be shared by threads.
    """

    db: sqlite3.Connection

    def __init__(self, directory: str | os.PathLike[str] | StateDir, *, create: bool = False):
        operation = "create" if create else "open"
        if isinstance(directory, StateDir):
            statedir = directory
        else:
            try:
                statedir = (
                    StateDir.claim(directory, STORE_FILES) if create else StateDir.open(directory)
                )
            except OSError as exc:
                raise _os_error(exc, os.path.abspath(directory), operation) from exc
        self._lock: threading.RLock = threading.RLock()
        self._depth = 0  # nested transaction() blocks
        self._held = 0  # nested held() blocks
        self._reading = False  # a read transaction of held() is open
        self._synchronous = "FULL"
        self._seq = 0  # own commits, and others' seen (data_version)
        self._data_version: int | None = None
        self._pid = os.getpid()
        self._forked = False
        self._closed = False
        self._old_log: int | None = None  # an upgrade's hold on the old log
        _open_stores.add(self)
        try:
            self._open(statedir, create)
        except BaseException as exc:
            if create and DB_NAME in statedir.created:
                # A creation takes back what it made: the database and the
                # files SQLite made beside it (the directory was claimed
                # without any of them, so none is another's), or a retry
                # would find "files named like a pool's" and refuse.
                for name in STORE_FILES:
                    with contextlib.suppress(OSError):
                        statedir.unlink(name)
            if statedir is not directory:
                with contextlib.suppress(OSError):
                    statedir.close(remove_made=True)
            if isinstance(exc, OSError):
                raise _os_error(exc, statedir.path, operation) from exc
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
            try:
                self._connect(create, exclusive=False)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorname", None) not in _NO_ROOM_FOR_THE_INDEX:
                    raise
                # No room for state.db-shm (a full filesystem), so no other
                # process has the store open: SQLite keeps the WAL's index
                # in memory instead, holding the store for this process
                # until it closes.  Reads work; a change needs room anyway.
                self._close_quietly()
                logger.warning(
                    "%s: no room for the WAL's index (%s): this process holds the pool "
                    "state alone until it closes",
                    self.path,
                    _what(exc),
                )
                self._connect(create, exclusive=True)
        except sqlite3.Error as exc:
            self._close_quietly()
            raise self._unreadable(exc) from exc
        except BaseException:
            self._close_quietly()
            raise

    def _connect(self, create: bool, exclusive: bool) -> None:
        self.db = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        if exclusive:
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        # WAL mode is recorded in the file; setting it again is a read.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
        self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        if create:
            # One transaction: a creation killed amid it leaves no table at
            # all (see blank()), never half a schema.
            self.db.executescript(
                f"BEGIN; {_SCHEMA} INSERT OR IGNORE INTO meta VALUES "
                f"('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
            )
        self._check_schema()

    def _close_quietly(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _unreadable(self, exc: sqlite3.Error) -> StateError:
        if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return StateError(
                f"the pool state in {self.path} is held by another process ({_what(exc)}); "
                f"nothing was changed — try again when it is done",
                "open",
                None,
            )
        if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_FULL", "SQLITE_IOERR")):
            return StateError(
                f"cannot read the pool state in {self.path} ({_what(exc)}{self._room()}); "
                f"nothing was changed or deleted",
                "open",
                None,
            )
        return StateError(
            f"the pool state in {self.path} is unreadable ({_what(exc)}); nothing was "
            f"changed or deleted — restore it from a backup or inspect it with sqlite3",
            "open",
            None,
        )

    def _room(self) -> str:
        """``: its filesystem is full`` when it is, else nothing."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return ""
        return ": its filesystem is full" if st.f_bavail == 0 else ""

    def _failed_write(self, exc: sqlite3.Error, what: str) -> StateError:
        return StateError(
            f"could not {what} the pool state in {self.path} ({_what(exc)}{self._room()}); "
            f"this change was not stored",
            "change",
            None,
        )

    def _refuse_permission(self) -> None:
        raise PermissionDeniedError(
            errno.EACCES,
            f"cannot open the pool state in {self.directory}: {NEEDS_ROOT}",
            "open",
            None,
        )

    # -- schema and upgrades -----------------------------------------------------------

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
        elif self.statedir.lstat(LOG_NAME) is not None:
            # An upgrade killed after its commit, before the log went.
            self._remove_old_log()

    def _schema_version(self) -> int:
        if not self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise _interrupted_creation(self.path)
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
        ran: list[Migration] = []
        try:
            found = self._schema_version()
            for step in MIGRATIONS:
                if step.version > found:
                    step.apply(self)
                    ran.append(step)
                    found = step.version
            self.db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(found),)
            )
            self.db.execute("COMMIT")
            for step in ran:
                if step.after is not None:
                    step.after(self)
        finally:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            old, self._old_log = self._old_log, None
            if old is not None:
                os.close(old)
        if not ran and self.statedir.lstat(LOG_NAME) is not None:
            self._remove_old_log()

    def _meta_now(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _fold_old_log(self) -> None:
        """Schema 2 to 3, inside the migration's transaction: check the
        log, and write its changes after ``log_seq`` into the tables.

        Raises:
            StateError: the log is damaged (before its last record),
                another store's, or held by a process of an older libdm.
        """
        if self.statedir.check_file(LOG_NAME, "open", "state store log") is None:
            return
        fd = self.statedir.open_file(LOG_NAME, os.O_RDWR, "open", "state store log")
        self._old_log = fd
        oldlog.hold(self.statedir, fd)
        log = self._read_old_log(fd)
        net: dict[tuple[str, int | str], list[Any] | None] = {}
        for _seq, changes in log.changes:
            for table, key, value in changes:
                net.pop((table, key), None)  # keep the order of last writes
                net[(table, key)] = value
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
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('log_seq', ?)", (str(log.last_seq),))

    def _read_old_log(self, fd: int) -> oldlog.OldLog:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        try:
            store_id = bytes.fromhex(self._meta_now("store_id") or "")
            folded = int(self._meta_now("log_seq") or "")
        except ValueError as exc:
            raise self.damaged("meta", f"has no valid log_seq and store_id ({exc})") from None
        return oldlog.read(
            self.statedir.join(LOG_NAME),
            b"".join(chunks),
            store_id,
            folded,
            {table: len(columns) for table, columns in _COLUMNS.items()},
        )

    def _remove_old_log(self) -> None:
        """The log of an upgraded store: removed if state.db holds every
        record it has (a crash may have left it after the upgrade's
        commit); else refused (an older libdm wrote to it since)."""
        if self._old_log is not None:  # the upgrade's, checked and folded
            self._unlink_old_log()
            return
        if self.statedir.check_file(LOG_NAME, "open", "state store log") is None:
            return
        fd = self.statedir.open_file(LOG_NAME, os.O_RDWR, "open", "state store log")
        try:
            oldlog.hold(self.statedir, fd)
            if self._read_old_log(fd).changes:
                raise StateError(
                    f"the pool state log {self.statedir.join(LOG_NAME)} holds changes an "
                    f"older libdm made after this one upgraded {self.path}; nothing was "
                    f"changed — open the pool with that libdm and close it, or move the "
                    f"log away to drop those changes",
                    "open",
                    None,
                )
            self._unlink_old_log()
        finally:
            os.close(fd)

    def _unlink_old_log(self) -> None:
        self.statedir.unlink(LOG_NAME)
        with contextlib.suppress(OSError):  # a filesystem that cannot sync a directory
            os.fsync(self.statedir.fd)

    # -- reading -------------------------------------------------------------------------

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one query; inside :meth:`held`, in its read transaction."""
        with self._lock:
            self._check_usable()
            try:
                if self._held and not self.db.in_transaction:
                    self.db.execute("BEGIN")
                    self._reading = True
                return self.db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                self._end_reading()
                raise self._unreadable(exc) from exc

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _end_reading(self) -> None:
        if self._reading:
            self._reading = False
            with contextlib.suppress(sqlite3.Error):
                if self.db.in_transaction:
                    self.db.execute("COMMIT")

    def _check_usable(self) -> None:
        if self._closed:
            raise StateError(f"the pool state in {self.path} is closed", "change", None)
        if self._forked:
            raise StateError(
                f"the pool state in {self.path} was opened by process {self._pid} before a "
                "fork(): open the pool again in this process to use it",
                "change",
                None,
            )

    @property
    def sequence(self) -> int:
        """A number that changes with every change of the store, this
        process's or another's: equal numbers mean equal contents, so a
        pool re-reads its configuration only when another process changed
        it."""
        if self._closed:
            return self._seq
        row = self._one("PRAGMA data_version")
        version = None if row is None else int(row[0])
        with self._lock:
            if version != self._data_version:
                self._data_version = version
                self._seq += 1
            return self._seq

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """``with store.held():`` around the store calls of a caller that
        holds the pool's lock: its reads share one SQLite read transaction
        (no other process changes the store while the pool's lock is
        held), ended by its first write and begun again by the next read.
        Optional: without it each read is a transaction of its own."""
        with self._lock:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
                if not self._held:
                    self._end_reading()

    def share_lock(self, lock: threading.RLock) -> None:
        """Use ``lock`` (a re-entrant lock) instead of the store's own: a
        pool passes the one it holds around its changes, so that the
        store's calls inside them wait for no lock of their own."""
        self._lock = lock

    # -- closing ------------------------------------------------------------------------

    def close_db(self) -> None:
        """Close the database (the directory stays open).  Never raises
        for a checkpoint that fails: the WAL keeps its changes."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._reading = False
            db = self.db
            if self._forked or os.getpid() != self._pid:
                # SQLite's connection is its parent's: closing it here could
                # checkpoint with the parent's view of the WAL.  Never freed.
                _keep_forever(db)
                return
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            try:
                db.close()
            except sqlite3.Error as exc:
                logger.warning(
                    "%s: closing the pool state left its write-ahead log (%s): the next open "
                    "reads it",
                    self.path,
                    _what(exc),
                )

    def close(self, remove_made: bool = False) -> None:
        """Close the store and the directory.

        Args:
            remove_made: remove what this store's directory object made
                (a failed creation): the database and its SQLite files if
                it made the database, the other files it made, and the
                directory if it made it and it is empty.
        """
        with self._lock:
            try:
                self.close_db()
            finally:
                if remove_made and DB_NAME in self.statedir.created:
                    for name in STORE_FILES:
                        self.statedir.unlink(name)
                self.statedir.close(remove_made=remove_made)

    # -- transactions ------------------------------------------------------------------

    def transaction(self, durable: bool = True) -> _Transaction:
        """``with store.transaction():`` — one atomic change.

        ``durable=False`` skips the fsync at commit (WAL ``synchronous=
        NORMAL``): the change survives a killed process but may be lost to
        a power cut.  The journal uses it for *outcomes* only: their intent
        was made durable first, so a lost outcome is re-derived from the
        intent by ``Pool.open``.  The next durable commit makes it durable
        too (the WAL is written in order).  A transaction inside another
        joins it (the outer one says whether it is durable).

        Raises:
            StateError: the change could not be written (a full or failing
                filesystem, a damaged database, a row that breaks a
                constraint): nothing of it was stored.
        """
        return _Transaction(self, durable)

    def _begin(self, durable: bool) -> None:
        self._lock.acquire()
        try:
            if self._depth == 0:
                self._check_usable()
                self._end_reading()
                level = "FULL" if durable else "NORMAL"
                try:
                    if level != self._synchronous:
                        self.db.execute(f"PRAGMA synchronous={level}")
                        self._synchronous = level
                    self.db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise self._failed_write(exc, "begin a change of") from exc
            self._depth += 1
        except BaseException:
            self._lock.release()
            raise

    def _end(self, failed: bool) -> None:
        try:
            self._depth -= 1
            if self._depth:
                return  # the outermost block commits or rolls back
            if failed:
                with contextlib.suppress(sqlite3.Error):
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                return
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    if self.db.in_transaction:  # SQLite may have rolled back itself
                        self.db.execute("ROLLBACK")
                raise self._failed_write(exc, "write") from exc
            self._seq += 1
            # Our own commit moves data_version for no other connection.
        finally:
            self._lock.release()

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """One statement of a change (in the current transaction, or in
        one of its own)."""
        with self.transaction():
            try:
                return self.db.execute(sql, params)
            except sqlite3.IntegrityError as exc:
                raise StateError(
                    f"the pool state in {self.path} refused a change ({exc}); nothing of it "
                    f"was stored",
                    "change",
                    None,
                ) from exc
            except sqlite3.Error as exc:
                raise self._failed_write(exc, "write") from exc

    # -- pool ----------------------------------------------------------------

    def init_pool(
        self, name: str, uuid: str, kind: PoolKind, config: PoolConfig, transaction_id: int = 0
    ) -> None:
        self._write(
            "INSERT INTO pool VALUES (1, ?, ?, ?, ?, ?)",
            (name, uuid, kind.value, _config_text(config), int(transaction_id)),
        )

    def record_made_files(self, inodes: Mapping[str, int]) -> None:
        """Record the inodes of the files a pool creation made, before it
        records the pool: what proves them libdm's if it is killed."""
        self._set_meta("made_files", json.dumps(dict(inodes), sort_keys=True))

    def record_making_files(self, sizes: Mapping[str, int]) -> None:
        """Record the files a pool creation is about to make (name to
        size), before it makes them."""
        self._set_meta("making_files", json.dumps(dict(sizes), sort_keys=True))

    def making_files(self) -> dict[str, int]:
        """The files a pool creation recorded it was about to make."""
        value = self._meta("making_files")
        return {} if value is None else {str(k): int(v) for k, v in json.loads(value).items()}

    def made_files(self) -> dict[str, int]:
        """The files a pool creation recorded making (name to inode)."""
        value = self._meta("made_files")
        return {} if value is None else {str(k): int(v) for k, v in json.loads(value).items()}

    def records_pool(self) -> bool:
        """Whether the store holds its pool's row: not when the creation
        that made the store was killed before it recorded the pool."""
        return self._one("SELECT 1 FROM pool WHERE id = 1") is not None

    def _pool_row(self) -> tuple[Any, ...]:
        row = self._one("SELECT * FROM pool WHERE id = 1")
        if row is None:
            raise _interrupted_creation(self.path)
        return row

    @staticmethod
    def blank(statedir: StateDir) -> bool:
        """Whether the directory's store holds no table at all: a creation
        killed before it committed the store's schema (nothing was made
        after that)."""
        for name in STORE_FILES:
            statedir.check_file(name, "create", "state store")  # SQLite follows symlinks
        if statedir.lstat(DB_NAME) is None:
            return False
        db = sqlite3.connect(statedir.join(DB_NAME), timeout=30, isolation_level=None)
        try:
            return not db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.Error:
            return False  # unreadable: not blank, and open says what it is
        finally:
            db.close()

    def pool(self) -> PoolRecord:
        """The pool's row.

        Raises:
            StateError: no pool recorded (an interrupted ``create``), a
                kind libdm does not know, or a config that is not a JSON
                object with the fields every pool has, of their types (the
                file and the field are named).
        """
        _, name, uuid, kind, config, transaction_id = self._pool_row()
        where = f"the pool state in {self.path}"
        return PoolRecord(
            name,
            uuid,
            PoolKind.parse(kind, where),
            PoolConfig.from_record(self._decode_config(config), where),
            int(transaction_id),
        )

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

    def set_config(self, config: PoolConfig) -> None:
        self._write("UPDATE pool SET config = ? WHERE id = 1", (_config_text(config),))

    def transaction_id(self) -> int:
        value: int = self._pool_row()[5]
        return value

    def set_transaction_id(self, txid: int) -> None:
        self._write("UPDATE pool SET transaction_id = ? WHERE id = 1", (int(txid),))

    # -- devices ---------------------------------------------------------------

    def device(self, name: str) -> DeviceRecord | None:
        row = self._one("SELECT * FROM devices WHERE name = ?", (name,))
        return None if row is None else _device(row)

    def device_by_id(self, thin_id: int) -> DeviceRecord | None:
        row = self._one("SELECT * FROM devices WHERE thin_id = ?", (thin_id,))
        return None if row is None else _device(row)

    def devices(self) -> list[DeviceRecord]:
        """Every device, by name."""
        return [_device(row) for row in self._rows("SELECT * FROM devices ORDER BY name")]

    def active_devices(self) -> list[DeviceRecord]:
        """The devices recorded active, by thin id."""
        rows = self._rows("SELECT * FROM devices WHERE active = 1 ORDER BY thin_id")
        return [_device(row) for row in rows]

    def children(self, name: str) -> list[str]:
        rows = self._rows("SELECT name FROM devices WHERE parent = ? ORDER BY name", (name,))
        return [row[0] for row in rows]

    def count_devices(self) -> int:
        row = self._one("SELECT COUNT(*) FROM devices")
        return 0 if row is None else int(row[0])

    def add_device(
        self, name: str, thin_id: int, size: Sectors, parent: str | None, active: bool = False
    ) -> None:
        self._write(
            "INSERT INTO devices (name, thin_id, size, parent, active) VALUES (?, ?, ?, ?, ?)",
            (name, thin_id, int(size), parent, 1 if active else 0),
        )

    def drop_device(self, name: str) -> None:
        """Forget device ``name``; its snapshots become roots (their origin
        is gone, and their data stays theirs)."""
        with self.transaction():
            self._write("DELETE FROM devices WHERE name = ?", (name,))
            self._write("UPDATE devices SET parent = NULL WHERE parent = ?", (name,))

    def set_active(self, name: str, active: bool) -> None:
        value = 1 if active else 0
        self._write(
            "UPDATE devices SET active = ? WHERE name = ? AND active != ?", (value, name, value)
        )

    def set_size(self, name: str, size: Sectors) -> None:
        self._write("UPDATE devices SET size = ? WHERE name = ?", (int(size), name))

    # -- thin ids --------------------------------------------------------------
    #
    # Every id below ``next_id`` is held by a device, an intent, a deferred
    # delete or the kernel alone (``foreign_ids``), or is in ``free_ids``.
    # So the lowest free id is MIN(free_ids) or else ``next_id``: one
    # indexed lookup, whatever the number of devices.

    def id_in_use(self, thin_id: int) -> bool:
        """True if the id is held by a device, an intent, a deferred delete
        or is known to be held by the kernel alone."""
        row = self._one(
            "SELECT EXISTS(SELECT 1 FROM devices WHERE thin_id = ?1)"
            " OR EXISTS(SELECT 1 FROM intents WHERE thin_id = ?1)"
            " OR EXISTS(SELECT 1 FROM deferred_deletes WHERE thin_id = ?1)"
            " OR EXISTS(SELECT 1 FROM foreign_ids WHERE thin_id = ?1)",
            (thin_id,),
        )
        return row is not None and row[0] == 1

    def allocate_id(self, limit: int) -> int | None:
        """Take the lowest free thin id (call inside a transaction).

        Returns:
            The id, or ``None`` when every id up to ``limit`` is taken.
        """
        with self.transaction():
            row = self._one("SELECT MIN(thin_id) FROM free_ids")
            if row is not None and row[0] is not None:
                self._write("DELETE FROM free_ids WHERE thin_id = ?", (row[0],))
                lowest: int = row[0]
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
        self._write("INSERT OR IGNORE INTO free_ids VALUES (?)", (thin_id,))

    def mark_foreign(self, thin_id: int) -> None:
        """Record that the kernel holds an id this store never made."""
        self._write("INSERT OR IGNORE INTO foreign_ids VALUES (?)", (thin_id,))

    def foreign_ids(self) -> list[int]:
        return [int(r[0]) for r in self._rows("SELECT thin_id FROM foreign_ids ORDER BY 1")]

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return default if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- intents ---------------------------------------------------------------

    def add_intent(self, intent: Intent) -> None:
        size = None if intent.size is None else int(intent.size)
        self._write(
            "INSERT INTO intents VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                intent.txid,
                intent.op.value,
                intent.thin_id,
                intent.name,
                size,
                intent.parent,
                intent.origin_id,
            ),
        )

    def intents(self) -> list[Intent]:
        """The changes of thin ids in flight, by transaction id.

        Raises:
            StateError: one of an operation this libdm does not know.
        """
        rows = self._rows("SELECT * FROM intents ORDER BY txid")
        return [Intent.stored(*row) for row in rows]

    def drop_intent(self, txid: int) -> None:
        self._write("DELETE FROM intents WHERE txid = ?", (txid,))

    # -- growth ----------------------------------------------------------------
    #
    # A growth (resize, extend, refresh, low water mark) changes no thin id
    # and no transaction id, so its intent is a JSON record of its own: the
    # configuration before and after, and the tables to roll back to.

    def growth_intent(self) -> GrowthIntent | None:
        """The growth in flight, or ``None``.

        Raises:
            StateError: a damaged record (the field is named).
        """
        text = self._meta("growth_intent")
        if text is None:
            return None
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise self.damaged("growth_intent", f"is not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise self.damaged("growth_intent", f"is not a JSON object (it is {text[:40]!r})")
        return GrowthIntent.from_record(record)

    def has_growth_intent(self) -> bool:
        """Whether a growth is in flight (its record is not read: a damaged
        one counts too)."""
        return self._meta("growth_intent") is not None

    def set_growth_intent(self, intent: GrowthIntent) -> None:
        self._set_meta("growth_intent", json.dumps(intent.to_record(), sort_keys=True))

    def drop_growth_intent(self) -> None:
        self._write("DELETE FROM meta WHERE key = 'growth_intent'")

    def resize_intent(self) -> str | None:
        """The device whose resize is recorded but may not be in its live
        table yet, or ``None``."""
        return self._meta("resize_intent")

    def resize_from(self) -> Sectors | None:
        """The size the device of :meth:`resize_intent` had before, if the
        mark says (a mark written before it did, or none: ``None``)."""
        value = self._meta("resize_from")
        if value is None:
            return None
        try:
            return Sectors(int(value))
        except ValueError:
            raise StateError(
                f"the pool state in {self.path} holds a resize mark whose size {value!r} "
                f"is not a number; restore the store from a backup, or inspect it with sqlite3",
                "open",
                None,
            ) from None

    def set_resize_intent(self, name: str, old: Sectors | None = None) -> None:
        self._set_meta("resize_intent", name)
        if old is None:
            self._write("DELETE FROM meta WHERE key = 'resize_from'")
        else:
            self._set_meta("resize_from", str(int(old)))

    def drop_resize_intent(self) -> None:
        self._write("DELETE FROM meta WHERE key IN ('resize_intent', 'resize_from')")

    def activation_intent(self) -> str | None:
        """The device whose activation or deactivation is under way (its
        kernel step may be done, its record not yet), or ``None``."""
        return self._meta("activation_intent")

    def set_activation_intent(self, name: str) -> None:
        self._set_meta("activation_intent", name)

    def drop_activation_intent(self) -> None:
        self._write("DELETE FROM meta WHERE key = 'activation_intent'")

    def lazy(self) -> bool:
        """Whether devices recorded active may be down until their first
        use: the pool was last opened lazily, or an eager open did not
        finish."""
        return self._meta("lazy") is not None

    def set_lazy(self, lazy: bool) -> None:
        if lazy:
            self._set_meta("lazy", "1")
        else:
            self._write("DELETE FROM meta WHERE key = 'lazy'")

    # -- deferred deletes ------------------------------------------------------

    def queue_delete(self, thin_id: int, name: str) -> None:
        self._write(
            "INSERT OR REPLACE INTO deferred_deletes (thin_id, name) VALUES (?, ?)",
            (thin_id, name),
        )

    def deferred_deletes(self) -> list[DeferredDelete]:
        """The thin ids queued for a later delete, by id."""
        rows = self._rows("SELECT * FROM deferred_deletes ORDER BY thin_id")
        return [DeferredDelete(int(thin_id), name, queued) for thin_id, name, queued in rows]

    def drop_deferred_delete(self, thin_id: int) -> None:
        self._write("DELETE FROM deferred_deletes WHERE thin_id = ?", (thin_id,))


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


def _device(row: tuple[Any, ...]) -> DeviceRecord:
    """The record of a ``devices`` row (its columns in table order)."""
    name, thin_id, size, parent, active, created = row
    return DeviceRecord(name, int(thin_id), Sectors(size), parent, bool(active), created)


def _config_text(config: PoolConfig) -> str:
    return json.dumps(config.to_record(), sort_keys=True)


def _is(value: object, types: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is no number here."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _os_error(exc: OSError, directory: str, operation: str) -> OSError:
    """libdm's own errors as they are; any other ``OSError`` (EIO from a
    failing disk) as a ``StateError`` naming the state directory, the
    file and what failed."""
    if isinstance(exc, DMError):
        return exc
    where = os.path.join(directory, exc.filename) if isinstance(exc.filename, str) else directory
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return StateError(
        f"cannot {operation} the pool state in {directory}: {exc.strerror or exc} "
        f"[{code}] on {where}; nothing was changed",
        operation,
        None,
    )


def _keep_forever(db: sqlite3.Connection) -> None:
    """One more reference to ``db`` that is never dropped, so that this
    process never closes it (not even at exit)."""
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(db))


def _interrupted_creation(path: str) -> StateError:
    return StateError(
        f"{path} records no pool (its creation was interrupted); the same pool "
        f"creation run again takes back what the interrupted one made",
        "open",
        None,
    )


def _what(exc: sqlite3.Error) -> str:
    """SQLite's message and its extended code (``SQLITE_FULL``,
    ``SQLITE_IOERR_WRITE`` ...): what failed."""
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc}: {name}" if name else str(exc)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock, or ROLLBACK on
    an exception (nested ones join the outermost)."""

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
