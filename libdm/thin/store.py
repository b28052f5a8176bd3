"""The pool's state store: one SQLite database per pool.

It lives in the pool's state directory (private: see ``statedir.py``) as
``state.db`` (mode 0600), in WAL mode with ``synchronous=FULL``, so a
record committed before a kernel message survives a power cut.  It holds:

* ``pool``: one row of configuration (devices, block size, features, low
  water mark, options) and the last committed transaction id;
* ``devices``: every thin device (name, thin id, size in sectors, parent,
  whether it should be active);
* ``intents``: the journal of a change in flight.  An intent is written
  before the kernel is asked, and removed in the same SQLite transaction
  that records the outcome, so after a crash ``Pool.open`` knows exactly
  which change may be half done (see ``journal.py``);
* ``deferred_deletes``: thin ids whose delete met EBUSY, retried later;
* ``free_ids`` / ``foreign_ids`` and ``meta.next_id``: thin id allocation
  (the lowest free id is reused; ids the kernel holds without a record
  here are never handed out).

Every query touches O(1) rows by key, never the whole table, so a pool of
10,000 devices costs no more per operation than a pool of 10.
"""

import errno
import json
import os
import sqlite3

from libdm.dm.errors import NEEDS_ROOT, PermissionDeniedError
from libdm.thin.errors import StateError
from libdm.thin.statedir import StateDir

__all__ = ["COMPANIONS", "DB_NAME", "SCHEMA_VERSION", "STORE_FILES", "Store"]

DB_NAME = "state.db"
#: The files SQLite keeps beside the database (``state.db-wal`` ...).
COMPANIONS = ("-wal", "-shm", "-journal")
#: The store's files, the database first.
STORE_FILES = (DB_NAME, *tuple(DB_NAME + suffix for suffix in COMPANIONS))
SCHEMA_VERSION = 1

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


class Store:
    """The state database of one pool.

    Args:
        directory: the pool's state directory: a path, or a
            :class:`~libdm.thin.statedir.StateDir`, which the store then
            owns (:meth:`close` closes it).
        create: make the database (and, given a path, the directory);
            otherwise a missing database is a ``StateError``.

    Raises:
        StateError: the database is missing (``create=False``), corrupt,
            truncated, from a newer libdm, or not a regular file of the
            caller's (a symlink is refused); the directory is not private
            (see :class:`~libdm.thin.statedir.StateDir`).  Nothing is
            deleted or chmod'ed.
        PoolReadOnlyError: the directory is on a read-only filesystem.
    """

    def __init__(self, directory, *, create=False):
        if isinstance(directory, StateDir):
            statedir = directory
        else:
            statedir = (
                StateDir.claim(directory, STORE_FILES) if create else StateDir.open(directory)
            )
        try:
            self._open(statedir, create)
        except BaseException:
            if statedir is not directory:
                statedir.close(remove_made=True)
            raise
        self.statedir = statedir

    def _open(self, statedir, create):
        self.directory = statedir.path
        self.path = statedir.join(DB_NAME)
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
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            if hasattr(self, "db"):
                self.db.close()
            raise StateError(
                f"the pool state in {self.path} is unreadable ({exc}); nothing was "
                f"changed or deleted — restore it from a backup or inspect it with sqlite3",
                "open",
                None,
            ) from exc

    def _refuse_permission(self):
        raise PermissionDeniedError(
            errno.EACCES,
            f"cannot open the pool state in {self.directory}: {NEEDS_ROOT}",
            "open",
            None,
        )

    def _check_schema(self):
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise sqlite3.DatabaseError("no schema version")
        if int(row[0]) > SCHEMA_VERSION:
            raise StateError(
                f"the pool state in {self.path} was written by a newer libdm "
                f"(schema {row[0]}, this one knows {SCHEMA_VERSION})",
                "open",
                None,
            )

    def close_db(self):
        """Close the database only (the directory stays open)."""
        self.db.close()

    def close(self, remove_made=False):
        """Close the database and the directory.

        Args:
            remove_made: remove what this store's directory object made
                (a failed creation): the database and its SQLite files if
                it made the database, the other files it made, and the
                directory if it made it and it is empty.
        """
        self.db.close()
        if remove_made and DB_NAME in self.statedir.created:
            for name in STORE_FILES:
                self.statedir.unlink(name)
        self.statedir.close(remove_made=remove_made)

    # -- transactions --------------------------------------------------------

    def transaction(self, durable=True):
        """``with store.transaction():`` — one atomic change.

        ``durable=False`` skips the fsync at commit (WAL ``synchronous=
        NORMAL``): the change survives a killed process but may be lost to a
        power cut.  The journal uses it for *outcomes* only: their intent
        was made durable first, so a lost outcome is re-derived from the
        intent by ``Pool.open``.  The next durable commit makes it durable
        too (the WAL is written in order).
        """
        return _Transaction(self.db, durable)

    # -- pool ----------------------------------------------------------------

    def init_pool(self, name, uuid, kind, config, transaction_id=0):
        with self.transaction():
            self.db.execute(
                "INSERT INTO pool VALUES (1, ?, ?, ?, ?, ?)",
                (name, uuid, kind, json.dumps(config, sort_keys=True), transaction_id),
            )

    def pool(self):
        """The pool row as a dict with ``config`` decoded.

        Raises:
            StateError: no pool recorded (an interrupted ``create``), or a
                config that is not a JSON object with the fields every pool
                has (the file and the field are named).
        """
        row = self.db.execute("SELECT * FROM pool WHERE id = 1").fetchone()
        if row is None:
            raise StateError(
                f"{self.path} records no pool (its creation was interrupted)",
                "open",
                None,
            )
        out = dict(row)
        out["config"] = self._decode_config(out["config"])
        return out

    def _decode_config(self, text):
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

    def damaged(self, field, why):
        """The ``StateError`` for a stored field ``field`` that ``why``."""
        return StateError(
            f"the pool state in {self.path} is damaged: its field {field!r} {why}; nothing "
            f"was changed — restore it from a backup or inspect it with sqlite3",
            "open",
            None,
        )

    def set_config(self, config):
        self.db.execute(
            "UPDATE pool SET config = ? WHERE id = 1", (json.dumps(config, sort_keys=True),)
        )

    def transaction_id(self):
        return self.db.execute("SELECT transaction_id FROM pool WHERE id = 1").fetchone()[0]

    def set_transaction_id(self, txid):
        self.db.execute("UPDATE pool SET transaction_id = ? WHERE id = 1", (txid,))

    # -- devices ---------------------------------------------------------------

    def device(self, name):
        row = self.db.execute("SELECT * FROM devices WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def device_by_id(self, thin_id):
        row = self.db.execute("SELECT * FROM devices WHERE thin_id = ?", (thin_id,)).fetchone()
        return dict(row) if row else None

    def devices(self):
        return [dict(r) for r in self.db.execute("SELECT * FROM devices ORDER BY name")]

    def active_devices(self):
        return [
            dict(r)
            for r in self.db.execute("SELECT * FROM devices WHERE active = 1 ORDER BY thin_id")
        ]

    def children(self, name):
        return [
            r[0]
            for r in self.db.execute(
                "SELECT name FROM devices WHERE parent = ? ORDER BY name", (name,)
            )
        ]

    def count_devices(self):
        return self.db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]

    def add_device(self, name, thin_id, size, parent, active=False):
        self.db.execute(
            "INSERT INTO devices (name, thin_id, size, parent, active) VALUES (?, ?, ?, ?, ?)",
            (name, thin_id, int(size), parent, 1 if active else 0),
        )

    def drop_device(self, name):
        """Forget device ``name``; its snapshots become roots (their origin
        is gone, and their data stays theirs)."""
        self.db.execute("DELETE FROM devices WHERE name = ?", (name,))
        self.db.execute("UPDATE devices SET parent = NULL WHERE parent = ?", (name,))

    def set_active(self, name, active):
        self.db.execute("UPDATE devices SET active = ? WHERE name = ?", (1 if active else 0, name))

    def set_size(self, name, size):
        self.db.execute("UPDATE devices SET size = ? WHERE name = ?", (int(size), name))

    # -- thin ids --------------------------------------------------------------
    #
    # Every id below ``next_id`` is held by a device, an intent, a deferred
    # delete or the kernel alone (``foreign_ids``), or is in ``free_ids``.
    # So the lowest free id is MIN(free_ids) or else ``next_id``: one
    # indexed lookup, whatever the number of devices.

    def id_in_use(self, thin_id):
        """True if the id is held by a device, an intent, a deferred delete
        or is known to be held by the kernel alone."""
        return (
            self.db.execute(
                "SELECT EXISTS(SELECT 1 FROM devices WHERE thin_id = ?1)"
                " OR EXISTS(SELECT 1 FROM intents WHERE thin_id = ?1)"
                " OR EXISTS(SELECT 1 FROM deferred_deletes WHERE thin_id = ?1)"
                " OR EXISTS(SELECT 1 FROM foreign_ids WHERE thin_id = ?1)",
                (thin_id,),
            ).fetchone()[0]
            == 1
        )

    def allocate_id(self, limit):
        """Take the lowest free thin id (call inside a transaction).

        Returns:
            The id, or ``None`` when every id up to ``limit`` is taken.
        """
        row = self.db.execute("SELECT MIN(thin_id) FROM free_ids").fetchone()
        if row[0] is not None:
            self.db.execute("DELETE FROM free_ids WHERE thin_id = ?", (row[0],))
            return row[0]
        nxt = int(self._meta("next_id", "0"))
        while nxt <= limit and self.id_in_use(nxt):
            nxt += 1
        if nxt > limit:
            return None
        self._set_meta("next_id", str(nxt + 1))
        return nxt

    def release_id(self, thin_id):
        """Give an id back for reuse (call inside a transaction)."""
        self.db.execute("INSERT OR IGNORE INTO free_ids VALUES (?)", (thin_id,))

    def mark_foreign(self, thin_id):
        """Record that the kernel holds an id this store never made."""
        self.db.execute("INSERT OR IGNORE INTO foreign_ids VALUES (?)", (thin_id,))

    def foreign_ids(self):
        return [r[0] for r in self.db.execute("SELECT thin_id FROM foreign_ids ORDER BY 1")]

    def _meta(self, key, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def _set_meta(self, key, value):
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- intents ---------------------------------------------------------------

    def add_intent(self, txid, op, thin_id, name, size=None, parent=None, origin_id=None):
        self.db.execute(
            "INSERT INTO intents VALUES (?, ?, ?, ?, ?, ?, ?)",
            (txid, op, thin_id, name, None if size is None else int(size), parent, origin_id),
        )

    def intents(self):
        return [dict(r) for r in self.db.execute("SELECT * FROM intents ORDER BY txid")]

    def drop_intent(self, txid):
        self.db.execute("DELETE FROM intents WHERE txid = ?", (txid,))

    # -- growth ----------------------------------------------------------------
    #
    # A growth (resize, extend, refresh, low water mark) changes no thin id
    # and no transaction id, so its intent is a JSON record of its own: the
    # configuration before and after, and the tables to roll back to.

    def growth_intent(self):
        """The growth in flight, a dict, or ``None``."""
        text = self._meta("growth_intent")
        return None if text is None else json.loads(text)

    def set_growth_intent(self, intent):
        self._set_meta("growth_intent", json.dumps(intent, sort_keys=True))

    def drop_growth_intent(self):
        self.db.execute("DELETE FROM meta WHERE key = 'growth_intent'")

    # -- deferred deletes ------------------------------------------------------

    def queue_delete(self, thin_id, name):
        self.db.execute(
            "INSERT OR REPLACE INTO deferred_deletes (thin_id, name) VALUES (?, ?)",
            (thin_id, name),
        )

    def deferred_deletes(self):
        return [
            dict(r) for r in self.db.execute("SELECT * FROM deferred_deletes ORDER BY thin_id")
        ]

    def drop_deferred_delete(self, thin_id):
        self.db.execute("DELETE FROM deferred_deletes WHERE thin_id = ?", (thin_id,))


# The configuration fields every pool has, and their JSON types.
_CONFIG_FIELDS = {
    "block_size": (int,),
    "low_water_mark": (int,),
    "features": (list,),
    "min_free_space": (int, float),
    "deferred_removal": (bool,),
    "deferred_deletion": (bool,),
    "token": (str,),
}


def _is(value, types):
    """isinstance, except that a bool is no number here."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db, durable=True):
        self.db = db
        self.durable = durable

    def __enter__(self):
        if not self.durable:
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")
        finally:
            if not self.durable:
                self.db.execute("PRAGMA synchronous=FULL")
        return False
