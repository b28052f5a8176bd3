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

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from types import TracebackType

from libdm.thin.errors import StateError
from libdm.thin.owner import DeviceOwner
from libdm.thin.statedir import StateDir
from libdm.thin.units import Bytes

__all__ = [
    "ACTIVE",
    "COMMITTED",
    "DB_NAME",
    "VIEW",
    "BaseDevice",
    "Kind",
    "MetaStore",
    "Row",
    "SocketRecord",
    "State",
]

DB_NAME = "snapshotter.db"
#: The database and the files SQLite keeps beside it.
DB_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal")
OPERATION = "snapshotter"
WHAT = "snapshotter database"


class Kind(enum.StrEnum):
    """A snapshot's kind, as containerd names it (``snapshots.Kind``)."""

    #: What an Update request's info carries: Update reads only its name
    #: and labels.  No stored snapshot has this kind.
    UNKNOWN = "unknown"
    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


VIEW, ACTIVE, COMMITTED = Kind.VIEW, Kind.ACTIVE, Kind.COMMITTED


class State(enum.StrEnum):
    """Where a row is in its life (see the module's text)."""

    CREATING = "creating"
    READY = "ready"
    REMOVING = "removing"


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


def _labels(text: str, where: str) -> dict[str, str]:
    value = json.loads(text)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"snapshotter.db: {where}: labels are not a table of strings: {text!r}")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One snapshot's row of ``snapshotter.db``."""

    id: int
    namespace: str
    #: The key (the name, once committed); None while the row is removed.
    key: str | None
    kind: Kind
    parent_id: int | None
    #: The thin device's name in the pool.
    device: str
    state: State
    labels: dict[str, str]
    created: float
    updated: float
    #: The bytes the device mapped when it was committed (0 before).
    mapped: Bytes

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> Row:
        return cls(
            id=r["id"],
            namespace=r["namespace"],
            key=r["key"],
            kind=Kind(r["kind"]),
            parent_id=r["parent_id"],
            device=r["device"],
            state=State(r["state"]),
            labels=_labels(r["labels"], f"snapshot {r['id']}"),
            created=r["created"],
            updated=r["updated"],
            mapped=Bytes(r["mapped"]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class BaseDevice:
    """What the store records of the base device, once it is made."""

    #: The filesystem on it, and so on every layer.
    fs_type: str
    size: Bytes
    #: Its name in the pool (``<prefix>base`` when made before names
    #: carried the owner's mark).
    device: str


@dataclasses.dataclass(frozen=True, slots=True)
class SocketRecord:
    """The unix socket the snapshotter last served on: the one it may
    remove when it is found stale (no program answers on it)."""

    path: str
    #: Its inode and change time: what identifies it across a reboot
    #: (a filesystem's device number can change from one boot to the
    #: next).  Inode 0 (no file has it) while the socket is being bound:
    #: ``ctime_ns`` is then a time before the bind.
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> SocketRecord:
        """The record of the socket just bound at ``path``."""
        return cls(path, st.st_ino, st.st_ctime_ns)

    @classmethod
    def binding(cls, path: str) -> SocketRecord:
        """The record written before binding at ``path``, so that a socket
        left by a kill before the bind was recorded is known as the
        snapshotter's (made after this time, at this path)."""
        # A second before now: file times come from a coarser clock.
        return cls(path, 0, time.time_ns() - 1_000_000_000)

    def made(self, path: str, st: os.stat_result) -> bool:
        """Whether the socket ``st`` at ``path`` is the one recorded."""
        if path != self.path:
            return False
        if self.ino == 0:
            return st.st_ctime_ns >= self.ctime_ns
        return (st.st_ino, st.st_ctime_ns) == (self.ino, self.ctime_ns)


class MetaStore:
    """The snapshotter's SQLite database (``snapshotter.db``) in its
    ``root_path``, trusted on the pool state directory's terms: the
    directory is the caller's and private, and the database's files are
    regular files of the caller's, never reached through a symlink (see
    :class:`~libdm.thin.statedir.StateDir`).

    Every change is one transaction with ``synchronous=FULL``: what a call
    returned is on disk.  Used under the snapshotter's lock only.

    Raises:
        StateError: the database or its directory fails those checks
            (named, and why); nothing is read from it.
    """

    def __init__(self, statedir: StateDir, *, create: bool = True) -> None:
        self.path = statedir.join(DB_NAME)
        if statedir.check_file(DB_NAME, OPERATION, WHAT) is None:
            if not create:
                raise StateError(f"no snapshotter database {self.path}", OPERATION, None)
            os.close(statedir.make_file(DB_NAME, OPERATION, WHAT))
        # SQLite opens these by name, following symlinks: check them first
        # (in a private directory no one else can swap them afterwards).
        for name in DB_FILES[1:]:
            statedir.check_file(name, OPERATION, WHAT)
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            if create:
                self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            # Another program's file, or a damaged one: left as it is.
            self._db.close()
            raise StateError(
                f"the snapshotter database {self.path} cannot be read ({exc}); it is left "
                f"as it is: restore it from a backup, or inspect it with sqlite3",
                OPERATION,
                None,
            ) from None
        self._lock = threading.RLock()

    def close(self) -> None:
        self._db.close()

    # -- transactions -------------------------------------------------------------

    def transaction(self) -> _Transaction:
        """``with store.transaction() as s:``: the writes in the block are
        one SQLite transaction, committed when the block ends normally and
        rolled back when it raises."""
        return _Transaction(self)

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[Row]:
        return [Row.from_sql(r) for r in self._db.execute(sql, args).fetchall()]

    def _row(self, sql: str, args: tuple[object, ...]) -> Row | None:
        r = self._db.execute(sql, args).fetchone()
        return None if r is None else Row.from_sql(r)

    # -- reads -----------------------------------------------------------------------

    def get(self, namespace: str, key: str) -> Row | None:
        return self._row("SELECT * FROM snapshots WHERE namespace=? AND key=?", (namespace, key))

    def by_id(self, row_id: int) -> Row:
        row = self._row("SELECT * FROM snapshots WHERE id=?", (row_id,))
        if row is None:
            raise LookupError(f"snapshotter.db has no snapshot {row_id}")
        return row

    def children(self, row_id: int) -> list[Row]:
        """Rows that still count as children (not being removed)."""
        return self._rows(
            "SELECT * FROM snapshots WHERE parent_id=? AND state!='removing'", (row_id,)
        )

    def has_rows_below(self, row_id: int) -> bool:
        """Whether any row, in any state, names ``row_id`` as its parent."""
        return (
            self._db.execute("SELECT 1 FROM snapshots WHERE parent_id=?", (row_id,)).fetchone()
            is not None
        )

    def all(self, namespace: str | None = None, state: State = State.READY) -> list[Row]:
        if namespace is None:
            return self._rows("SELECT * FROM snapshots WHERE state=? ORDER BY id", (state.value,))
        return self._rows(
            "SELECT * FROM snapshots WHERE namespace=? AND state=? ORDER BY id",
            (namespace, state.value),
        )

    def rows(self) -> list[Row]:
        return self._rows("SELECT * FROM snapshots ORDER BY id")

    def _meta(self, name: str) -> object:
        """The JSON value of meta ``name``, None when there is none."""
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else json.loads(row["value"])

    def _meta_bytes(self, name: str) -> Bytes | None:
        value = self._meta(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"snapshotter.db: meta {name} is not a number of bytes: {value!r}")
        return Bytes(value)

    def base(self, legacy_name: str) -> BaseDevice | None:
        """The base device, None until it is made; ``legacy_name`` is its
        name when the database does not record one (made by an older
        libdm)."""
        value = self._meta("base_ready")
        if not value:
            return None
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("fs_type"), str)
            or not isinstance(value.get("size"), int)
            or not isinstance(value.get("device", legacy_name), str)
        ):
            raise ValueError(f"snapshotter.db: meta base_ready is not what was written: {value!r}")
        return BaseDevice(value["fs_type"], Bytes(value["size"]), value.get("device", legacy_name))

    def owner_token(self) -> str | None:
        """The token this snapshotter marks its devices' names with
        (:class:`~libdm.thin.owner.DeviceOwner`), None before the first."""
        value = self._meta("owner_token")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"snapshotter.db: meta owner_token is not a string: {value!r}")
        return value

    def owner(self, prefix: str) -> DeviceOwner:
        """This snapshotter's :class:`DeviceOwner`: its token is drawn and
        recorded (durably) the first time, before any device is made."""
        token = self.owner_token()
        if token is None:
            with self.transaction() as s:
                token = s.owner_token()
                if token is None:
                    token = DeviceOwner.new(prefix).token
                    s._set_meta("owner_token", token)
        return DeviceOwner(prefix, token)

    def socket(self) -> SocketRecord | None:
        """The socket the snapshotter last bound, None if none."""
        value = self._meta("socket")
        if value is None:
            return None
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("path"), str)
            or not isinstance(value.get("ino"), int)
            or not isinstance(value.get("ctime_ns"), int)
        ):
            raise ValueError(f"snapshotter.db: meta socket is not what was written: {value!r}")
        return SocketRecord(value["path"], value["ino"], value["ctime_ns"])

    def base_mapped(self) -> Bytes:
        """The bytes the base device maps (0 before it is made)."""
        return self._meta_bytes("base_mapped") or Bytes(0)

    def owned(self, row_id: int) -> Bytes | None:
        """The bytes committed snapshot ``row_id`` owns, once computed."""
        return self._meta_bytes(f"owned:{row_id}")

    # -- writes (inside a transaction) ------------------------------------------------

    def _set_meta(self, name: str, value: object) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", (name, json.dumps(value))
        )

    def set_base(self, fs_type: str, size: Bytes, mapped: Bytes, device: str) -> None:
        self._set_meta("base_ready", {"fs_type": fs_type, "size": int(size), "device": device})
        self._set_meta("base_mapped", int(mapped))

    def set_socket(self, record: SocketRecord | None) -> None:
        if record is None:
            self._db.execute("DELETE FROM meta WHERE name='socket'")
        else:
            self._set_meta("socket", dataclasses.asdict(record))

    def set_owned(self, row_id: int, owned: Bytes) -> None:
        self._set_meta(f"owned:{row_id}", int(owned))

    def insert(
        self,
        namespace: str,
        key: str,
        kind: Kind,
        parent_id: int | None,
        labels: Mapping[str, str] | None,
        owner: DeviceOwner,
    ) -> tuple[int, str]:
        """Add a ``creating`` row; returns its id and its device's name
        (``owner``'s, with its mark)."""
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO snapshots(namespace, key, kind, parent_id, device, state, labels, "
            "created, updated) VALUES (?, ?, ?, ?, ?, 'creating', ?, ?, ?)",
            (
                namespace,
                key,
                kind.value,
                parent_id,
                owner.name(f"new{time.monotonic_ns()}"),
                json.dumps(dict(labels or {})),
                now,
                now,
            ),
        )
        row_id = cur.lastrowid
        assert row_id is not None  # an INSERT sets it
        device = owner.name(str(row_id))
        self._db.execute("UPDATE snapshots SET device=? WHERE id=?", (device, row_id))
        return row_id, device

    def mark_ready(self, row_id: int) -> None:
        self._db.execute("UPDATE snapshots SET state='ready' WHERE id=?", (row_id,))

    def commit(
        self, row_id: int, name: str, labels: Mapping[str, str] | None, mapped: Bytes
    ) -> None:
        """Make active snapshot ``row_id`` the committed snapshot ``name``."""
        now = time.time()
        self._db.execute(
            "UPDATE snapshots SET key=?, kind='committed', labels=?, created=?, "
            "updated=?, mapped=? WHERE id=?",
            (name, json.dumps(dict(labels or {})), now, now, int(mapped), row_id),
        )

    def set_labels(self, row_id: int, labels: Mapping[str, str]) -> None:
        self._db.execute(
            "UPDATE snapshots SET labels=?, updated=? WHERE id=?",
            (json.dumps(dict(labels)), time.time(), row_id),
        )

    def mark_removing(self, row_id: int) -> None:
        """Free the row's key; its device is deleted afterwards."""
        self._db.execute(
            "UPDATE snapshots SET state='removing', key=NULL, updated=? WHERE id=?",
            (time.time(), row_id),
        )

    def delete(self, row_id: int) -> None:
        """Forget row ``row_id`` (its device is gone) and what was kept of it."""
        self._db.execute("DELETE FROM snapshots WHERE id=?", (row_id,))
        self._db.execute("DELETE FROM meta WHERE name=?", (f"owned:{row_id}",))


class _Transaction:
    def __init__(self, store: MetaStore) -> None:
        self.store = store

    def __enter__(self) -> MetaStore:
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self.store

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.store._db.execute("COMMIT")
            else:
                self.store._db.execute("ROLLBACK")
        finally:
            self.store._lock.release()
