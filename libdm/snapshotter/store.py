"""The snapshotter's own metadata: a small SQLite database.

One row per snapshot: its containerd namespace, key (or, once committed,
name), kind, parent, labels, times, and the name of the thin device that
holds it in the pool.  The pool's own store knows the devices; this one
knows what containerd calls them.

Rows have a *state* that makes the pair of stores crash-safe:

``creating``
    written (durably) before the pool is asked for the device; a crash
    before ``ready`` leaves a row that :meth:`Snapshotter.recover` rolls
    back (the device is deleted if the pool made it, then the row);
``ready``
    the snapshot exists;
``removing``
    written (durably) when containerd removes the snapshot: its key is
    freed at once, and the device is deleted afterwards, at once or in the
    background, and after a crash by ``recover``.

A committed snapshot is a ``ready`` row whose kind changed in one SQLite
transaction, so a commit is atomic on its own.
"""

import json
import os
import sqlite3
import threading
import time

__all__ = ["ACTIVE", "COMMITTED", "VIEW", "MetaStore"]

VIEW, ACTIVE, COMMITTED = "view", "active", "committed"

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    key TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('view', 'active', 'committed')),
    parent_id INTEGER REFERENCES snapshots(id),
    device TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    labels TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    mapped INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS snapshots_key ON snapshots(namespace, key)
    WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class MetaStore:
    """The snapshotter's SQLite database (``snapshotter.db``).

    Every change is one transaction with ``synchronous=FULL``: what a call
    returned is on disk.  Used under the snapshotter's lock only.
    """

    def __init__(self, path):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.RLock()
        self._db.executescript(SCHEMA)

    def close(self):
        self._db.close()

    # -- transactions -------------------------------------------------------------

    def transaction(self):
        return _Transaction(self)

    def execute(self, sql, args=()):
        return self._db.execute(sql, args)

    # -- reads -----------------------------------------------------------------------

    def get(self, namespace, key):
        return self.execute(
            "SELECT * FROM snapshots WHERE namespace=? AND key=?", (namespace, key)
        ).fetchone()

    def by_id(self, row_id):
        return self.execute("SELECT * FROM snapshots WHERE id=?", (row_id,)).fetchone()

    def children(self, row_id):
        """Rows that still count as children (not being removed)."""
        return self.execute(
            "SELECT * FROM snapshots WHERE parent_id=? AND state!='removing'", (row_id,)
        ).fetchall()

    def all(self, namespace=None, state="ready"):
        if namespace is None:
            return self.execute(
                "SELECT * FROM snapshots WHERE state=? ORDER BY id", (state,)
            ).fetchall()
        return self.execute(
            "SELECT * FROM snapshots WHERE namespace=? AND state=? ORDER BY id", (namespace, state)
        ).fetchall()

    def rows(self):
        return self.execute("SELECT * FROM snapshots ORDER BY id").fetchall()

    def meta(self, name, default=None):
        row = self.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return default if row is None else json.loads(row["value"])

    # -- writes (inside a transaction) ------------------------------------------------

    def set_meta(self, name, value):
        self.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", (name, json.dumps(value))
        )

    def insert(self, namespace, key, kind, parent_id, labels, device_prefix):
        now = time.time()
        cur = self.execute(
            "INSERT INTO snapshots(namespace, key, kind, parent_id, device, state, labels, "
            "created, updated) VALUES (?, ?, ?, ?, ?, 'creating', ?, ?, ?)",
            (
                namespace,
                key,
                kind,
                parent_id,
                f"{device_prefix}new-{time.monotonic_ns()}",
                json.dumps(labels or {}),
                now,
                now,
            ),
        )
        row_id = cur.lastrowid
        device = f"{device_prefix}{row_id}"
        self.execute("UPDATE snapshots SET device=? WHERE id=?", (device, row_id))
        return row_id, device


class _Transaction:
    def __init__(self, store):
        self.store = store

    def __enter__(self):
        self.store._lock.acquire()
        self.store._db.execute("BEGIN IMMEDIATE")
        return self.store

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.store._db.execute("COMMIT")
            else:
                self.store._db.execute("ROLLBACK")
        finally:
            self.store._lock.release()
        return False


def labels_of(row):
    return json.loads(row["labels"])
