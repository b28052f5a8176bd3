"""The Docker plugin's own records: which layer is which thin device, in
what state, and how many ``Get`` calls hold its mount.

A SQLite database in a private directory (``<pool>/docker`` by default),
written before every device change, so that after a kill the plugin knows
exactly which devices it made: a row is added (``creating``) before its
device is made, and a device is deleted only after its row says so
(``removing``).  Device names carry the plugin's own mark, a random token
drawn once and kept here (:class:`~libdm.thin.owner.DeviceOwner`), and a
never-reused row number (``docker-<token>-17``), so a name is never given
to two devices and never taken for a device someone else made.  Records
written before names carried the mark name ``docker-<n>`` and
``docker-base``; they stay as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator

from libdm.thin.errors import PoolError, StateError
from libdm.thin.owner import DeviceOwner
from libdm.thin.statedir import StateDir

__all__ = ["BaseInfo", "LayerRow", "LayerState", "LayerStore"]

DB_NAME = "docker.db"
#: Held (flock) by the one plugin that serves the records, from before its
#: start-up recovery until it stops; it holds that plugin's pid and socket.
LOCK_NAME = "plugin.lock"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    parent TEXT,
    device TEXT UNIQUE,
    state TEXT NOT NULL,
    refs INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class LayerState(enum.StrEnum):
    #: The row is written, the device may or may not exist yet.
    CREATING = "creating"
    READY = "ready"
    #: An ApplyDiff is writing it; Docker has not taken the layer.
    APPLYING = "applying"
    #: Its device is being deleted.
    REMOVING = "removing"


@dataclasses.dataclass(frozen=True, slots=True)
class LayerRow:
    seq: int
    id: str
    parent: str | None
    device: str
    state: LayerState
    refs: int

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> LayerRow:
        return cls(r["seq"], r["id"], r["parent"], r["device"], LayerState(r["state"]), r["refs"])


@dataclasses.dataclass(frozen=True, slots=True)
class BaseInfo:
    """The base device every layer without a parent is a snapshot of."""

    device: str
    fs: str
    size: int
    #: True once its filesystem is made; False while it is being made.
    ready: bool


class LayerStore:
    """The records in ``directory`` (made 0700 if missing; it must be
    private, as a pool's state directory: see
    :class:`~libdm.thin.statedir.StateDir`).

    Raises:
        StateError: the directory or database is not private or not ours,
            or the database is damaged.
    """

    def __init__(self, directory: str, prefix: str) -> None:
        self.prefix = prefix
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        self.statedir = StateDir.open(directory, "docker plugin")
        self._lock_fd = self._take_lock()
        self.statedir.check_file(DB_NAME, "docker plugin", "layer database")
        self.path = self.statedir.join(DB_NAME)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            version = self._meta("schema")
            if version is None:
                with self.transaction():
                    self._set_meta("schema", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise StateError(
                    f"{self.path} has layer records of version {version}; this libdm "
                    f"reads version {SCHEMA_VERSION}",
                    "docker plugin",
                    None,
                )
            #: The mark of the plugin's devices (drawn and recorded before
            #: any device carries it).
            self.owner = self._owner()
        except sqlite3.DatabaseError as exc:
            self._release_lock()
            self.statedir.close()
            raise StateError(
                f"the layer database {self.path} cannot be read: {exc}", "docker plugin", None
            ) from None

    def _owner(self) -> DeviceOwner:
        token = self._meta("owner_token")
        if token is None:
            with self.transaction():
                token = self._meta("owner_token")
                if token is None:
                    token = DeviceOwner.new(self.prefix).token
                    self._set_meta("owner_token", token)
        try:
            if not isinstance(token, str):
                raise ValueError(f"bad device owner token {token!r}")
            return DeviceOwner(self.prefix, token)
        except ValueError as exc:
            self._db.close()
            self._release_lock()
            self.statedir.close()
            raise StateError(
                f"the layer database {self.path} is not what the plugin wrote: {exc}",
                "docker plugin",
                None,
            ) from None

    def _take_lock(self) -> int:
        """The records' lock, taken without waiting.

        Raises:
            PoolError: another plugin holds it (EBUSY; named, with its pid).
        """
        fd = self.statedir.open_file(
            LOCK_NAME, os.O_RDWR, "docker plugin", "plugin lock", create=True
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            self.statedir.close()
            raise PoolError(
                errno.EBUSY,
                f"another Docker plugin serves this pool's layers ({holder}); its records "
                f"in {self.statedir.path} are its own while it runs (stop it first, or "
                f"serve another pool)",
                "docker plugin",
            ) from None
        except BaseException:
            os.close(fd)
            self.statedir.close()
            raise
        self._lock_fd = fd
        self.set_holder("starting")
        return fd

    def set_holder(self, what: str) -> None:
        """Say in the lock file who holds it (for a refused second plugin)."""
        data = f"pid {os.getpid()}, {what}\n".encode()
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, data, 0)

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def close(self) -> None:
        self._db.close()
        self._release_lock()
        self.statedir.close()

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """One write transaction, its reads included.

        Args:
            durable: sync the commit to disk before returning (the default).
                ``False`` leaves it in the kernel's cache: a kill of the
                plugin keeps it (the write-ahead log is written), a power
                cut may take it back, and the next durable commit syncs it
                with its own (the log is written in order).  Only for
                changes whose loss recovery makes good: reference counts
                (no mount outlives a power cut, and the driver's recovery
                resets the count of a layer that is not mounted) and the
                row of a finished removal (a ``removing`` row whose device
                is gone, which recovery deletes).
        """
        try:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"the layer database {self.path} failed: {exc}", "docker plugin", None
            ) from None

    # -- meta ---------------------------------------------------------------------------

    def _meta(self, name: str) -> object:
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else json.loads(row["value"])

    def _set_meta(self, name: str, value: object) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", (name, json.dumps(value))
        )

    def base(self) -> BaseInfo | None:
        value = self._meta("base")
        if not isinstance(value, dict):
            return None
        return BaseInfo(
            str(value["device"]), str(value["fs"]), int(value["size"]), bool(value["ready"])
        )

    def set_base(self, base: BaseInfo | None) -> None:
        if base is None:
            self._db.execute("DELETE FROM meta WHERE name='base'")
        else:
            self._set_meta("base", dataclasses.asdict(base))

    def pool_uuid(self) -> str | None:
        """The uuid of the pool the records were made on (``None``: not yet
        recorded, records older than this check)."""
        value = self._meta("pool_uuid")
        return value if isinstance(value, str) else None

    def set_pool_uuid(self, uuid: str) -> None:
        self._set_meta("pool_uuid", uuid)

    def home(self) -> str | None:
        """The home of the dockerd that last sent ``Init`` (``None``: none yet)."""
        value = self._meta("home")
        return value if isinstance(value, str) else None

    def set_home(self, home: str) -> None:
        self._set_meta("home", home)

    def socket(self) -> tuple[str, int, int] | None:
        value = self._meta("socket")
        if not isinstance(value, list) or len(value) != 3:
            return None
        return str(value[0]), int(value[1]), int(value[2])

    def set_socket(self, path: str, dev: int, ino: int) -> None:
        self._set_meta("socket", [path, dev, ino])

    # -- layers -------------------------------------------------------------------------

    def get(self, layer_id: str) -> LayerRow | None:
        row = self._db.execute("SELECT * FROM layers WHERE id=?", (layer_id,)).fetchone()
        return None if row is None else LayerRow.from_sql(row)

    def all(self) -> list[LayerRow]:
        rows = self._db.execute("SELECT * FROM layers ORDER BY seq").fetchall()
        return [LayerRow.from_sql(r) for r in rows]

    def insert(self, layer_id: str, parent: str | None) -> LayerRow:
        """Add a ``creating`` row and name its device (inside a transaction)."""
        cur = self._db.execute(
            "INSERT INTO layers(id, parent, state, created) VALUES (?, ?, ?, ?)",
            (layer_id, parent, LayerState.CREATING.value, time.time()),
        )
        seq = cur.lastrowid
        assert seq is not None  # an INSERT sets it
        device = self.owner.name(str(seq))
        self._db.execute("UPDATE layers SET device=? WHERE seq=?", (device, seq))
        return LayerRow(seq, layer_id, parent, device, LayerState.CREATING, 0)

    def set_state(self, layer_id: str, state: LayerState) -> None:
        self._db.execute("UPDATE layers SET state=? WHERE id=?", (state.value, layer_id))

    def set_refs(self, layer_id: str, refs: int) -> None:
        self._db.execute("UPDATE layers SET refs=? WHERE id=?", (refs, layer_id))

    def delete(self, layer_id: str) -> None:
        self._db.execute("DELETE FROM layers WHERE id=?", (layer_id,))
