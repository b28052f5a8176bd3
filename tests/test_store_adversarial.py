"""The state store attacked: several processes on one store, processes
killed at any point, writes and checkpoints that fail, foreign files
where the store's files should be, two long-lived processes and the
WAL.  No kernel.

Every test states a property the store promises (docs/store.rst).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import pickle
import random
import resource
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)
from support.store import MAX_THIN_ID as MAX
from support.store import config, device_record, intent, intent_record, made

import libdm
from libdm.thin.errors import StateError
from libdm.thin.records import GrowthIntent
from libdm.thin.store import DB_NAME, LOG_NAME, Store
from libdm.thin.units import Sectors

V1 = Path(__file__).resolve().parent / "data" / "store-v1"

#: What a store holds, as the tests compare it: no timestamps.
View = dict[str, Any]


def view(store: Store) -> View:
    """Everything the store says, without the ``created``/``queued`` times."""
    return {
        "devices": [
            (r.name, r.thin_id, int(r.size), r.parent, int(r.active)) for r in store.devices()
        ],
        "intents": [(r.txid, r.op.value, r.thin_id, r.name) for r in store.intents()],
        "deferred": [(r.thin_id, r.name) for r in store.deferred_deletes()],
        "low_water_mark": int(store.pool().config.low_water_mark),
        "transaction_id": store.transaction_id(),
        "children": {r.name: store.children(r.name) for r in store.devices()},
        "count": store.count_devices(),
    }


def fresh_view(directory: Path) -> View:
    store = Store(directory)
    try:
        return view(store)
    finally:
        store.close()


def names(store: Store) -> list[str]:
    return [r.name for r in store.devices()]


def in_child(work: Callable[[], Any]) -> Any:
    """Run ``work`` in a forked process and return what it returned (or
    raise what it raised, as a RuntimeError naming it)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            try:
                out: tuple[str, Any] = ("ok", work())
            except BaseException as exc:
                out = ("err", f"{type(exc).__name__}: {exc}")
            with os.fdopen(write, "wb") as fh:
                pickle.dump(out, fh)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status != "ok":
        raise RuntimeError(value)
    return value


# -- a forked child ----------------------------------------------------------------------


def test_a_forked_child_cannot_use_its_parents_store(tmp_path: Path) -> None:
    """SQLite's connection is the process's: a child of fork() that used
    its parent's would write without the parent's locks, and its close
    could checkpoint with a stale view of the WAL.  The child's change and
    read are refused by name; a store it opens itself works; nothing the
    parent holds is lost."""
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("parent", 1, Sectors(2048), None)
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.write(to_parent_w, b"x")
            os.read(to_child_r, 1)  # the parent has changed and closed meanwhile
            refused = 0
            try:
                with store.transaction():
                    store.add_device("child", 2, Sectors(2048), None)
            except StateError as exc:
                refused += "fork" in str(exc)
            try:
                store.devices()
            except StateError as exc:
                refused += "fork" in str(exc)
            store.close()  # the parent's connection is left alone
            own = Store(directory)
            with own.transaction():
                own.add_device("child", 3, Sectors(2048), None)
            own.close()
            code = 0 if refused == 2 else 2
        finally:
            os._exit(code)
    os.read(to_parent_r, 1)
    with store.transaction():
        store.add_device("later", 4, Sectors(2048), None)
    store.close()
    os.write(to_child_w, b"x")
    _, status = os.waitpid(pid, 0)
    for fd in (to_parent_r, to_parent_w, to_child_r, to_child_w):
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [d[0] for d in fresh_view(directory)["devices"]] == ["child", "later", "parent"]


# -- failed writes and checkpoints -------------------------------------------------------


def _limit_file_size(size: int) -> None:
    """Writes past ``size`` bytes fail (EFBIG, as ENOSPC on a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


def test_a_write_that_cannot_grow_the_wal_is_a_clear_error_and_changes_nothing(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    made(directory).close()

    def work() -> tuple[View, View, str, View]:
        store = Store(directory)
        with store.transaction():
            store.add_device("kept", 1, Sectors(2048), None)
        before = view(store)
        _limit_file_size(os.stat(directory / (DB_NAME + "-wal")).st_size)
        error = ""
        try:
            with store.transaction():
                store.set_growth_intent(
                    GrowthIntent("refresh", config(), config(), {"pool": ("x" * 40000,)})
                )
                store.add_device("lost", 2, Sectors(2048), None)
        except StateError as exc:
            error = str(exc)
        after = view(store)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        with store.transaction():
            store.add_device("next", 2, Sectors(2048), None)
        final = view(store)
        store.close()
        return before, after, error, final

    before, after, error, final = in_child(work)
    assert str(directory / DB_NAME) in error and "not stored" in error, error
    assert after == before
    assert [d[0] for d in final["devices"]] == ["kept", "next"]
    assert fresh_view(directory) == final


def test_a_checkpoint_that_fails_at_close_raises_nothing_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """The last close checkpoints the WAL into state.db; when state.db
    cannot grow (a full filesystem), close() still returns, the WAL keeps
    the changes, and the next open has them."""
    directory = tmp_path / "state"
    made(directory).close()

    def work() -> tuple[View, str]:
        store = Store(directory)
        for i in range(60):
            with store.transaction(durable=False):
                store.add_device(f"d{i:03}-" + "x" * 200, i, Sectors(2048), None)
        before = view(store)
        _limit_file_size(os.stat(directory / DB_NAME).st_size)
        try:
            store.close()
            error = ""
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
        return before, error

    before, error = in_child(work)
    assert error == ""
    assert os.stat(directory / (DB_NAME + "-wal")).st_size > 0  # kept for the next open
    assert fresh_view(directory) == before
    assert sorted(os.listdir(directory)) == [DB_NAME]


# -- foreign files and damage ------------------------------------------------------------


@pytest.mark.parametrize("name", [DB_NAME + "-wal", DB_NAME + "-shm", LOG_NAME])
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink-to-nothing"])
def test_something_else_named_like_a_store_file_is_refused_and_kept(
    tmp_path: Path, kind: str, name: str
) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    path = directory / name
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(tmp_path / "nowhere", path)
    with pytest.raises(libdm.StateError) as caught:
        Store(directory)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "nowhere").exists()
    assert os.path.lexists(path)


def test_a_damaged_byte_in_state_db_is_refused_and_nothing_is_removed(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    for i in range(40):
        with store.transaction():
            store.add_device(f"d{i}", i, Sectors(2048), None)
    store.close()
    data = bytearray((directory / DB_NAME).read_bytes())
    page = 4096
    data[page * 2] = 0x55  # a b-tree page's type byte: not a page type
    (directory / DB_NAME).write_bytes(bytes(data))
    with pytest.raises(libdm.StateError) as caught:
        s = Store(directory)
        try:
            s.devices()
            s.intents()
            s.pool()
        finally:
            s.close()
    said = str(caught.value)
    assert str(directory / DB_NAME) in said and "malformed" in said, said
    assert "sqlite3" in said  # how to inspect it
    assert (directory / DB_NAME).read_bytes() == bytes(data)
    assert sorted(os.listdir(directory)) == [DB_NAME]


# -- two long-lived processes ------------------------------------------------------------


def _long_lived_reader(directory: str, stop: float) -> None:  # pragma: no cover
    """A process that keeps the store open and reads it now and then, as
    the monitor service does while the snapshotter changes the pool."""
    store = Store(directory)
    while time.monotonic() < stop:
        store.pool()
        store.count_devices()
        time.sleep(0.005)
    store.close()
    os._exit(0)


def _timed_open(directory: Path) -> float:
    start = time.perf_counter()
    store = Store(directory)
    store.pool()
    store.intents()
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed


def test_two_long_lived_processes_keep_the_store_bounded_and_open_fast(tmp_path: Path) -> None:
    """Two processes keep the store open (a reader, and this one, which
    writes 12,000 changes): what lies beside state.db stays bounded, and
    a fresh open, while both are still open, takes no longer at the end
    than near the start."""
    directory = tmp_path / "state"
    writer = made(directory)
    ctx = multiprocessing.get_context("fork")
    reader = ctx.Process(target=_long_lived_reader, args=(str(directory), time.monotonic() + 300))
    reader.start()
    try:
        beside = 0
        opens: list[float] = []
        for i in range(12000):
            with writer.transaction(durable=i % 2 == 0):
                writer.add_device(f"d{i}", i, Sectors(2048), None, active=True)
                writer.set_transaction_id(i)
            if i % 500 == 0:
                beside = max(
                    beside,
                    sum(
                        os.stat(directory / name).st_size
                        for name in os.listdir(directory)
                        if name != DB_NAME
                    ),
                )
            if i in (1000, 11999):
                opens.append(min(_timed_open(directory) for _ in range(3)))
        assert reader.is_alive()
        assert beside <= 2 << 20, beside  # the WAL and its index (and no log)
        assert opens[1] <= opens[0] * 4 + 0.05, opens
    finally:
        reader.kill()
        reader.join()
        writer.close()
    assert fresh_view(directory)["count"] == 12000


# -- killed processes --------------------------------------------------------------------

WRITER_STEPS = 400


def _writer_model(steps: int) -> View:
    """What the writer below has done after ``steps`` transactions."""
    devices: dict[str, tuple[int, int, str | None, int]] = {}
    lwm, txid = 0, 0
    for i in range(steps):
        devices[f"d{i}"] = (i, 2048 + i, None, 1)
        if i % 7 == 3:
            lwm = i
        if i % 5 == 4:
            devices.pop(f"d{i - 2}", None)
        txid = i
    return {
        "devices": sorted((name, *row) for name, row in devices.items()),
        "low_water_mark": lwm,
        "transaction_id": txid,
    }


def _writer(directory: str, report: int) -> None:  # pragma: no cover
    """Change the store forever, writing the number of each committed
    transaction to ``report``."""
    store = Store(directory)
    for i in range(WRITER_STEPS):
        with store.transaction(durable=i % 2 == 0):
            store.add_device(f"d{i}", i, Sectors(2048 + i), None, active=True)
            if i % 5 == 4:
                store.drop_device(f"d{i - 2}")
            store.set_transaction_id(i)
        if i % 7 == 3:
            store.set_config(config(low_water_mark=i))
        os.write(report, f"{i + 1}\n".encode())
    store.close()
    os._exit(0)


def _reader(directory: str, stop: float) -> None:  # pragma: no cover
    """Read the store without a lock until ``stop``; exit 3 if a view is
    ever one the writer never made (its devices and transaction id are
    changed in one transaction)."""
    store = Store(directory)
    while time.monotonic() < stop:
        with store.held():  # one read transaction for the whole view
            got = view(store)
        txid = got["transaction_id"]
        steps = [0, 1] if txid == 0 else [txid + 1]
        if got["devices"] not in [_writer_model(n)["devices"] for n in steps]:
            os._exit(3)
    store.close()
    os._exit(0)


def test_a_writer_killed_anywhere_loses_no_committed_change(tmp_path: Path) -> None:
    """SIGKILL at random moments (mid-commit, mid-checkpoint), with a
    reader following the store the whole time:
    the next open holds every transaction the writer finished, and at
    most the one in flight."""
    rng = random.Random(1234)
    ctx = multiprocessing.get_context("fork")
    for round_ in range(8):
        directory = tmp_path / f"state{round_}"
        made(directory).close()
        reader = ctx.Process(target=_reader, args=(str(directory), time.monotonic() + 60))
        reader.start()
        read, write = os.pipe()  # after the reader's fork: only the writer holds it
        writer = ctx.Process(target=_writer, args=(str(directory), write))
        writer.start()
        os.close(write)
        time.sleep(rng.uniform(0.05, 0.6))
        assert writer.pid is not None
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        done = 0
        with os.fdopen(read, "rb") as fh:
            for line in fh.read().split():
                done = int(line)
        got = fresh_view(directory)
        now, next_ = _writer_model(done), _writer_model(done + 1)
        state = (got["devices"], got["transaction_id"])
        assert state in [(m["devices"], m["transaction_id"]) for m in (now, next_)], done
        assert got["low_water_mark"] in (now["low_water_mark"], next_["low_water_mark"])
        assert reader.exitcode in (None, 0), "the reader saw a state never written"
        reader.kill()
        reader.join()


@pytest.mark.parametrize("fixture", ["store-v1", "store-v2"])
def test_a_migration_killed_anywhere_leaves_a_store_that_opens(
    tmp_path: Path, fixture: str
) -> None:
    """A store of an older schema (1, or 2 with an unfolded log) whose
    upgrade is killed at random moments: every later open succeeds and
    shows what the old libdm wrote, and the log is gone."""
    data = V1.parent / fixture
    with open(data / "expected.json") as fh:
        want = json.load(fh)
    rng = random.Random(99)
    ctx = multiprocessing.get_context("fork")
    for round_ in range(6):
        directory = tmp_path / f"state{round_}"
        directory.mkdir(mode=0o700)
        for name in os.listdir(data):
            if name != "expected.json":
                shutil.copyfile(data / name, directory / name)
                os.chmod(directory / name, 0o600)
        proc = ctx.Process(target=_open_and_close, args=(str(directory),))
        proc.start()
        time.sleep(rng.uniform(0.0, 0.05))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        store = Store(directory)
        try:
            assert store.devices() == [device_record(row) for row in want["devices"]]
            assert store.intents() == [intent_record(row) for row in want["intents"]]
            assert store.transaction_id() == want["transaction_id"]
            assert not (directory / LOG_NAME).exists()
        finally:
            store.close()
        assert sorted(os.listdir(directory)) == [DB_NAME]


def _open_and_close(directory: str) -> None:  # pragma: no cover
    Store(directory).close()
    os._exit(0)


# -- two processes against a model ----------------------------------------------------


def _serve(conn: Connection, directory: str, lock_path: str) -> None:  # pragma: no cover
    """A process with the store open, doing what it is told.  Writes take
    the pool's lock (an flock of its own file), as Pool does."""
    store: Store | None = None
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def pool_lock() -> Iterator[Store]:
        assert store is not None
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            with store.held():
                yield store
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    while True:
        op, args = conn.recv()
        try:
            result: Any = None
            if op == "open":
                store = Store(directory)
            elif op == "close":
                assert store is not None
                store.close()
                store = None
            elif op == "view":
                assert store is not None
                result = view(store)
            elif op == "reads":
                assert store is not None
                result = [view(store)["count"] for _ in range(args[0])]
            else:
                with pool_lock() as s:
                    result = _change(s, op, args)
            conn.send(("ok", result))
        except Exception as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}"))


def _allocate(s: Store) -> int:  # pragma: no cover
    thin_id = s.allocate_id(MAX)
    assert thin_id is not None
    return thin_id


def _change(s: Store, op: str, args: tuple[Any, ...]) -> Any:  # pragma: no cover
    if op == "add":
        name, size, parent = args
        with s.transaction():
            thin_id = _allocate(s)
            s.add_device(name, thin_id, Sectors(size), parent, active=True)
        return thin_id
    if op == "burst":
        prefix, count = args
        ids = []
        for i in range(count):
            with s.transaction(durable=i % 2 == 0):
                thin_id = _allocate(s)
                s.add_device(f"{prefix}{i}", thin_id, Sectors(4096), None)
            ids.append(thin_id)
        return ids
    if op == "drop":
        (name,) = args
        with s.transaction():
            row = s.device(name)
            assert row is not None
            s.drop_device(name)
            s.release_id(row.thin_id)
        return None
    if op == "active":
        name, active = args
        s.set_active(name, active)
        return None
    if op == "config":
        (lwm,) = args
        s.set_config(config(low_water_mark=lwm))
        return None
    if op == "intent":
        txid, name = args
        with s.transaction():
            thin_id = _allocate(s)
            s.add_intent(intent(txid, "create_thin", thin_id, name, 2048))
            s.set_transaction_id(txid)
        return thin_id
    if op == "drop_intent":
        (txid,) = args
        found = next(r for r in s.intents() if r.txid == txid)
        with s.transaction(durable=False):
            s.drop_intent(txid)
            s.queue_delete(found.thin_id, found.name)
        return None
    if op == "undelete":
        (thin_id,) = args
        with s.transaction():
            s.drop_deferred_delete(thin_id)
            s.release_id(thin_id)
        return None
    if op == "fail":
        with pytest.raises(RuntimeError), s.transaction():
            s.add_device("never", MAX, Sectors(1), None)
            s.set_transaction_id(MAX)
            raise RuntimeError("undone")
        return None
    raise ValueError(op)


class _Worker:
    """One process serving a store."""

    def __init__(self, directory: Path, lock_path: Path) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(theirs, str(directory), str(lock_path)), daemon=True
        )
        self.proc.start()
        theirs.close()
        self.open = False

    def send(self, op: str, *args: Any) -> None:
        self.conn.send((op, args))

    def result(self) -> Any:
        if not self.conn.poll(60):
            raise AssertionError("the worker did not answer")
        status, value = self.conn.recv()
        if status != "ok":
            raise AssertionError(f"the worker failed: {value}")
        return value

    def call(self, op: str, *args: Any) -> Any:
        self.send(op, *args)
        return self.result()

    def kill(self) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join()
        self.conn.close()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.kill()


class TwoProcesses(RuleBasedStateMachine):
    """Two processes change one store in turns (and sometimes at once:
    one reads while the other writes); after every step each one's view,
    and a fresh open's, must be the model's."""

    names = Bundle("names")

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(_machine_root())
        self.directory = self.root / "state"
        made(self.directory).close()
        self.workers = [_Worker(self.directory, self.root / "pool.lock") for _ in range(2)]
        for worker in self.workers:
            worker.call("open")
            worker.open = True
        self.devices: dict[str, tuple[int, int, str | None, int]] = {}
        self.intents: dict[int, tuple[str, int, str]] = {}
        self.deferred: dict[int, str] = {}
        self.lwm = 0
        self.txid = 0
        self.counter = 0

    # -- the model's ids

    def used_ids(self) -> set[int]:
        used = {row[0] for row in self.devices.values()}
        used |= {row[1] for row in self.intents.values()}
        return used | set(self.deferred)

    def took(self, thin_id: int) -> None:
        assert thin_id not in self.used_ids(), f"id {thin_id} handed out twice"

    def fresh(self) -> str:
        self.counter += 1
        return f"n{self.counter}"

    def open_worker(self, data: st.DataObject) -> _Worker:
        opened = [w for w in self.workers if w.open]
        return data.draw(st.sampled_from(opened), label="process")

    # -- rules

    @precondition(lambda self: any(w.open for w in self.workers))
    @rule(target=names, data=st.data(), size=st.integers(1, 10**6))
    def add(self, data: st.DataObject, size: int) -> str:
        name = self.fresh()
        parents = [None, *sorted(self.devices)]
        parent = data.draw(st.sampled_from(parents), label="parent")
        thin_id = self.open_worker(data).call("add", name, size, parent)
        self.took(thin_id)
        self.devices[name] = (thin_id, size, parent, 1)
        return name

    @precondition(lambda self: any(w.open for w in self.workers))
    @rule(data=st.data(), name=consumes(names))
    def drop(self, data: st.DataObject, name: str) -> None:
        if name not in self.devices:
            return
        self.open_worker(data).call("drop", name)
        del self.devices[name]
        for child, row in list(self.devices.items()):
            if row[2] == name:
                self.devices[child] = (row[0], row[1], None, row[3])

    @precondition(lambda self: any(w.open for w in self.workers))
    @rule(data=st.data(), name=names, active=st.booleans())
    def set_active(self, data: st.DataObject, name: str, active: bool) -> None:
        if name not in self.devices:
            return
        self.open_worker(data).call("active", name, active)
        row = self.devices[name]
        self.devices[name] = (row[0], row[1], row[2], int(active))

    @precondition(lambda self: any(w.open for w in self.workers))
    @rule(data=st.data(), lwm=st.integers(0, 1000))
    def set_config(self, data: st.DataObject, lwm: int) -> None:
        self.open_worker(data).call("config", lwm)
        self.lwm = lwm

    @precondition(lambda self: any(w.open for w in self.workers))
    @rule(data=st.data())
    def intent(self, data: st.DataObject) -> None:
        self.txid += 1
        name = self.fresh()
        thin_id = self.open_worker(data).call("intent", self.txid, name)
        self.took(thin_id)
        self.intents[self.txid] = ("create_thin", thin_id, name)

    @precondition(lambda self: self.intents and any(w.open for w in self.workers))
    @rule(data=st.data())
    def intent_to_deferred(self, data: st.DataObject) -> None:
        txid = data.draw(st.sampled_from(sorted(self.intents)), label="txid")
        self.open_worker(data).call("drop_intent", txid)
        _op, thin_id, name = self.intents.pop(txid)
        self.deferred[thin_id] = name

    @precondition(lambda self: self.deferred and any(w.open for w in self.workers))
    @rule(data=st.data())
    def deferred_done(self, data: st.DataObject) -> None:
        thin_id = data.draw(st.sampled_from(sorted(self.deferred)), label="thin id")
        self.open_worker(data).call("undelete", thin_id)
        del self.deferred[thin_id]

    @precondition(lambda self: any(w.open for w in self.workers))
    @rule(data=st.data())
    def failed_transaction(self, data: st.DataObject) -> None:
        self.open_worker(data).call("fail")

    @precondition(lambda self: all(w.open for w in self.workers))
    @rule(data=st.data(), count=st.integers(5, 60))
    def burst_while_the_other_reads(self, data: st.DataObject, count: int) -> None:
        """One writes many changes (past a WAL checkpoint) while the other
        reads without a lock: every count it sees is one the writer passed
        through."""
        writer = data.draw(st.sampled_from(self.workers), label="writer")
        reader = self.workers[1 - self.workers.index(writer)]
        prefix = self.fresh() + "-"
        start = len(self.devices)
        writer.send("burst", prefix, count)
        reader.send("reads", 200)
        ids = writer.result()
        counts = reader.result()
        assert all(start <= c <= start + count for c in counts), counts
        assert counts == sorted(counts), "a reader went back in time"
        for i, thin_id in enumerate(ids):
            self.took(thin_id)
            self.devices[f"{prefix}{i}"] = (thin_id, 4096, None, 0)

    @precondition(lambda self: any(w.open for w in self.workers))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        worker = self.open_worker(data)
        worker.call("close")
        worker.open = False

    @precondition(lambda self: any(not w.open for w in self.workers))
    @rule(data=st.data())
    def reopen(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from([w for w in self.workers if not w.open]))
        worker.call("open")
        worker.open = True

    @precondition(lambda self: any(w.open for w in self.workers))
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        """SIGKILL between changes: no close, the WAL stays for the others."""
        worker = self.open_worker(data)
        index = self.workers.index(worker)
        worker.kill()
        fresh = _Worker(self.directory, self.root / "pool.lock")
        fresh.call("open")
        fresh.open = True
        self.workers[index] = fresh

    # -- checks

    def model(self) -> View:
        children: dict[str, list[str]] = {name: [] for name in self.devices}
        for name, row in self.devices.items():
            if row[2] is not None:
                children[row[2]].append(name)
        return {
            "devices": sorted((name, *row) for name, row in self.devices.items()),
            "intents": sorted((txid, *row) for txid, row in self.intents.items()),
            "deferred": sorted(self.deferred.items()),
            "low_water_mark": self.lwm,
            "transaction_id": self.txid,
            "children": {name: sorted(kids) for name, kids in children.items()},
            "count": len(self.devices),
        }

    @invariant()
    def everyone_sees_the_model(self) -> None:
        want = self.model()
        for worker in self.workers:
            if worker.open:
                assert worker.call("view") == want
        assert fresh_view(self.directory) == want

    def teardown(self) -> None:
        for worker in self.workers:
            worker.stop()
        assert fresh_view(self.directory) == self.model()
        assert sorted(os.listdir(self.directory)) == [DB_NAME]
        shutil.rmtree(self.root)


_ROOT: list[Path] = []


def _machine_root() -> str:
    base = _ROOT[0]
    base.mkdir(exist_ok=True)
    for n in range(10**6):
        path = base / f"m{n}"
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            return str(path)
    raise AssertionError("no room")


def test_two_processes_against_a_model(tmp_path: Path) -> None:
    _ROOT[:] = [tmp_path / "machines"]
    TwoProcesses.TestCase.settings = settings(
        max_examples=int(os.environ.get("STORE_ADVERSARIAL_EXAMPLES", "12")),
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )
    TwoProcesses.TestCase().runTest()
