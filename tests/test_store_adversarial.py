"""An adversarial review of the state store's log (``state.db-log``):
several processes on one store, processes killed at any point, failed
writes and folds, foreign files where the log should be.  No kernel.

Every test states a property the store promises (docs/store.rst).  The
ones marked ``xfail(strict=True)`` show a defect: they fail today, and
will report XPASS (and so fail the run) once it is fixed, so that the
mark is removed with the fix.
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
import sqlite3
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

import libdm
from libdm.thin import store as store_module
from libdm.thin import storelog
from libdm.thin.errors import StateError
from libdm.thin.store import DB_NAME, LOG_NAME, Store

CONFIG: dict[str, Any] = {
    "block_size": 128,
    "low_water_mark": 0,
    "features": [],
    "min_free_space": 10,
    "deferred_removal": True,
    "deferred_deletion": True,
    "token": "t",
}
MAX = 2**24 - 1
V1 = Path(__file__).resolve().parent / "data" / "store-v1"

#: What a store holds, as the tests compare it: no timestamps.
View = dict[str, Any]


def made(directory: Path) -> Store:
    store = Store(directory, create=True)
    store.init_pool("p", "LIBDM-POOL-x", "loop", CONFIG)
    return store


def view(store: Store) -> View:
    """Everything the store says, without the ``created``/``queued`` times."""
    return {
        "devices": [
            (r["name"], r["thin_id"], r["size"], r["parent"], r["active"]) for r in store.devices()
        ],
        "intents": [(r["txid"], r["op"], r["thin_id"], r["name"]) for r in store.intents()],
        "deferred": [(r["thin_id"], r["name"]) for r in store.deferred_deletes()],
        "low_water_mark": store.pool()["config"]["low_water_mark"],
        "transaction_id": store.transaction_id(),
        "children": {r["name"]: store.children(r["name"]) for r in store.devices()},
        "count": store.count_devices(),
    }


def fresh_view(directory: Path) -> View:
    store = Store(directory)
    try:
        return view(store)
    finally:
        store.close()


def names(store: Store) -> list[str]:
    return [r["name"] for r in store.devices()]


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


# -- defects -----------------------------------------------------------------------------


def test_a_failed_fold_attempt_never_loses_another_stores_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state"
    first = made(directory)
    second = Store(directory)
    # The first changes the configuration while the second has the store
    # open: its fold attempt fails, and between that failure and taking the
    # shared hold back (two system calls) the second closes.  The scheduler
    # may do this on any loaded machine; here the pause is made certain.
    real = storelog.LogFile.reshare

    def late_reshare(log: storelog.LogFile) -> None:
        monkeypatch.setattr(storelog.LogFile, "reshare", real)
        second.close()  # alone (the first's hold is gone): folds, removes the log
        real(log)

    monkeypatch.setattr(storelog.LogFile, "reshare", late_reshare)
    first.set_config(dict(CONFIG, low_water_mark=5))
    third = Store(directory)
    try:
        with third.transaction():
            third.add_device("committed", 1, 2048, None)
        first.close()
        assert names(third) == ["committed"]
    finally:
        third.close()
    assert [d[0] for d in fresh_view(directory)["devices"]] == ["committed"]


def die(store: Store) -> None:
    """Let go of everything as a killed process does: no fold."""
    if store._log is not None:
        store._log.close()
        store._log = None
    store.db.close()
    store.statedir.close()


def test_a_change_after_a_failed_fold_attempt_in_a_held_block_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state"
    first = made(directory)
    second = Store(directory)
    real = storelog.LogFile.reshare

    def late_reshare(log: storelog.LogFile) -> None:
        monkeypatch.setattr(storelog.LogFile, "reshare", real)
        second.close()
        real(log)

    monkeypatch.setattr(storelog.LogFile, "reshare", late_reshare)
    with first.held():  # a growth, as Pool does it: the pool's lock is held
        first.set_config(dict(CONFIG, low_water_mark=5))
        with first.transaction():
            first.add_device("after", 1, 2048, None)
    try:
        assert [d[0] for d in fresh_view(directory)["devices"]] == ["after"]
    finally:
        die(first)  # the process is killed later: no fold
    assert [d[0] for d in fresh_view(directory)["devices"]] == ["after"]


def _changer(directory: str, report: int, stop: float) -> None:  # pragma: no cover
    """Pool-like changes (the pool's lock held, so inside held()): a
    setting, then a device; each finished one reported; then killed."""
    store = Store(directory)
    i = 0
    while time.monotonic() < stop:
        with store.held():
            store.set_config(dict(CONFIG, low_water_mark=i))
            with store.transaction(durable=False):
                store.add_device(f"a{i}", i, 2048, None)
        os.write(report, f"{i}\n".encode())
        i += 1
    os._exit(0)  # no close, no fold


def _opener(directory: str) -> None:  # pragma: no cover
    """Commands that come and go: open and close, over and over."""
    while True:
        Store(directory).close()


def test_changes_survive_other_processes_opening_and_closing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    budget = time.monotonic() + float(os.environ.get("STORE_ADVERSARIAL_SECONDS", "30"))
    round_ = 0
    while time.monotonic() < budget:  # until a loss is seen, or the budget is spent
        round_ += 1
        directory = tmp_path / f"state{round_}"
        made(directory).close()
        opener = ctx.Process(target=_opener, args=(str(directory),))
        opener.start()
        read, write = os.pipe()
        changer = ctx.Process(target=_changer, args=(str(directory), write, time.monotonic() + 4))
        changer.start()
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            done = len(fh.read().split())
        changer.join()
        opener.kill()
        opener.join()
        got = {row[0] for row in fresh_view(directory)["devices"]}
        missing = [f"a{i}" for i in range(done) if f"a{i}" not in got]
        assert missing == [], f"{len(missing)} of {done} finished changes lost"


def _burst_writer(directory: str, report: int, stop: float) -> None:  # pragma: no cover
    """Changes in blocks of 20 inside held() (the pool's lock), each block
    reported when finished; then killed."""
    store = Store(directory)
    i = 0
    while time.monotonic() < stop:
        with store.held():
            for _ in range(20):
                with store.transaction(durable=False):
                    store.add_device(f"d{i}", i, 2048, None)
                i += 1
        os.write(report, b"20\n")
    os._exit(0)  # no close, no fold


def _busy_reader(directory: str) -> None:  # pragma: no cover
    """A monitor: reads, without a lock, over and over."""
    store = Store(directory)
    while True:
        store.count_devices()


def test_a_writer_and_a_reader_past_the_fold_threshold_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "LOG_LIMIT", 1024)  # both processes inherit it
    ctx = multiprocessing.get_context("fork")
    budget = time.monotonic() + float(os.environ.get("STORE_ADVERSARIAL_SECONDS", "30"))
    round_ = 0
    while time.monotonic() < budget:  # until a loss is seen, or the budget is spent
        round_ += 1
        directory = tmp_path / f"state{round_}"
        made(directory).close()
        reader = ctx.Process(target=_busy_reader, args=(str(directory),))
        reader.start()
        read, write = os.pipe()
        writer = ctx.Process(
            target=_burst_writer, args=(str(directory), write, time.monotonic() + 3)
        )
        writer.start()
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            done = sum(int(n) for n in fh.read().split())
        writer.join()
        reader.kill()
        reader.join()
        assert fresh_view(directory)["count"] == done


def test_a_write_taken_back_is_taken_back_for_readers_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state"
    writer = made(directory)
    reader = Store(directory)  # another process's store (its own open file)
    real = os.fdatasync

    def failing_sync(fd: int) -> None:
        monkeypatch.setattr(os, "fdatasync", real)
        # The record is in the file: a reader now reads, without a lock.
        names(reader)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing_sync)
    with pytest.raises(OSError), writer.transaction():
        writer.add_device("fails", 1, 2048, None)
    assert names(writer) == []
    with writer.transaction():
        writer.add_device("works", 1, 2048, None)  # the same length as "fails"
    try:
        assert names(reader) == names(writer) == ["works"]
    finally:
        writer.close()
        reader.close()  # the last: folds what it holds
    assert [d[0] for d in fresh_view(directory)["devices"]] == ["works"]


def test_a_failed_fold_of_a_configuration_leaves_memory_and_log_agreeing(
    tmp_path: Path,
) -> None:
    """A configuration change is logged, then folded into state.db at once;
    when that fold fails (state.db cannot grow), the caller, the other
    processes and the next open must still agree on one value."""
    directory = tmp_path / "state"
    made(directory).close()

    def work() -> tuple[int, int, str]:
        store = Store(directory)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # The log's small record fits; SQLite's WAL frame for the fold does not
        # (EFBIG, as a full disk gives ENOSPC).
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
        try:
            store.set_config(dict(CONFIG, low_water_mark=5))
            failure = ""
        except (OSError, sqlite3.Error) as exc:
            failure = str(exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        mine = store.pool()["config"]["low_water_mark"]
        other = Store(directory)
        theirs = other.pool()["config"]["low_water_mark"]
        other.close()
        store._log = None  # killed: no fold
        return mine, theirs, failure

    mine, theirs, failure = in_child(work)
    assert mine == theirs, f"this process sees {mine}, another {theirs} ({failure})"
    assert fresh_view(directory)["low_water_mark"] == mine


@pytest.mark.parametrize(
    "content",
    [b"my notes\n", b"\0" * 12 + b"not a libdm header" * 2],
    ids=["text", "zeros-then-text"],
)
def test_a_short_foreign_file_named_like_the_log_is_refused_and_kept(
    tmp_path: Path, content: bytes
) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    (directory / LOG_NAME).write_bytes(content)
    os.chmod(directory / LOG_NAME, 0o600)
    with pytest.raises(libdm.StateError) as caught:
        Store(directory).close()
    assert str(directory / LOG_NAME) in str(caught.value)
    assert (directory / LOG_NAME).read_bytes() == content


def test_a_store_whose_log_cannot_be_reopened_still_closes(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("x", 1, 2048, None)
    # Its shared hold lost (as after a fork's close), another store folds
    # and removes the log, and something that is no log takes the name.
    assert store._log is not None
    storelog._lock(store._log.fd, fcntl.F_UNLCK, wait=False)
    Store(directory).close()
    os.symlink(tmp_path / "nowhere", directory / LOG_NAME)
    with pytest.raises(libdm.StateError, match="symbolic link"):
        store.devices()
    with contextlib.suppress(libdm.StateError):
        store.close()
    assert os.path.islink(directory / LOG_NAME)


def test_a_forked_child_cannot_change_its_parents_store(tmp_path: Path) -> None:
    """A forked child shares its parent's open log and its lock, so the
    parent's close could fold and remove the log under the child's change
    (a change lost).  The child's change is refused with a clear error
    instead, and nothing the parent holds is lost."""
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("parent", 1, 2048, None)
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            with store.held():  # as Pool holds its lock around a change
                os.write(to_parent_w, b"x")
                os.read(to_child_r, 1)  # the parent has closed meanwhile
                try:
                    with store.transaction():
                        store.add_device("child", 2, 2048, None)
                except StateError as exc:
                    code = 0 if "fork" in str(exc) and store.device("child") is None else 2
        finally:
            os._exit(code)
    os.read(to_parent_r, 1)
    store.close()
    os.write(to_child_w, b"x")
    _, status = os.waitpid(pid, 0)
    for fd in (to_parent_r, to_parent_w, to_child_r, to_child_w):
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0  # refused, by name, and undone in memory
    assert [d[0] for d in fresh_view(directory)["devices"]] == ["parent"]


# -- what held -------------------------------------------------------------------------


def test_a_torn_header_of_our_own_is_still_written_over(tmp_path: Path) -> None:
    """The counterpart of the test above: a log whose header write a
    crash cut short (a prefix of the store's own header, or zeros) must
    keep opening, whatever the fix for foreign files."""
    directory = tmp_path / "state"
    store = made(directory)
    store_id = store._store_id
    store.close()
    for torn in (storelog.header(store_id)[:20], b"\0" * 40, b""):
        (directory / LOG_NAME).write_bytes(torn)
        os.chmod(directory / LOG_NAME, 0o600)
        again = Store(directory)
        with again.transaction():
            again.set_transaction_id(len(torn))
        again.close()
        assert fresh_view(directory)["transaction_id"] == len(torn)
        assert not (directory / LOG_NAME).exists()


def test_a_log_whose_records_stop_short_of_state_db_is_refused_and_kept(
    tmp_path: Path,
) -> None:
    """state.db from a later fold than the log beside it (its last record
    is below log_seq): refused, nothing changed."""
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("a", 1, 2048, None)
    old_log = (directory / LOG_NAME).read_bytes()
    with store.transaction():
        store.add_device("b", 2, 2048, None)
    store.close()  # state.db now at a later log_seq than old_log's last record
    (directory / LOG_NAME).write_bytes(old_log)
    os.chmod(directory / LOG_NAME, 0o600)
    before = (directory / DB_NAME).read_bytes()
    with pytest.raises(libdm.StateError, match="newer copy") as caught:
        Store(directory)
    assert str(directory / LOG_NAME) in str(caught.value)
    assert (directory / LOG_NAME).read_bytes() == old_log
    assert (directory / DB_NAME).read_bytes() == before


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink-to-nothing"])
def test_something_else_named_like_the_log_is_refused_and_kept(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "state"
    made(directory).close()
    log = directory / LOG_NAME
    if kind == "directory":
        log.mkdir()
    elif kind == "fifo":
        os.mkfifo(log)
    else:
        os.symlink(tmp_path / "nowhere", log)
    with pytest.raises(libdm.StateError) as caught:
        Store(directory)
    assert str(log) in str(caught.value)
    assert not (tmp_path / "nowhere").exists()
    assert os.path.lexists(log)


def test_a_write_that_cannot_grow_the_log_is_taken_back(tmp_path: Path) -> None:
    """A record cut short by a full disk (EFBIG past RLIMIT_FSIZE here, in a
    process of its own): the change is undone in memory, the file is cut
    back, and the next change and a fresh open agree."""
    directory = tmp_path / "state"
    made(directory).close()

    def work() -> tuple[View, View, int, int]:
        store = Store(directory)
        with store.transaction():
            store.add_device("kept", 1, 2048, None)
        before = view(store)
        size = os.stat(directory / LOG_NAME).st_size
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
        with contextlib.suppress(OSError), store.transaction():
            # A growth intent larger than the room left: written in part.
            store.set_growth_intent({"tables": "x" * 4000})
            store.add_device("lost", 2, 2048, None)
        after = view(store)
        cut = os.stat(directory / LOG_NAME).st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        with store.transaction():
            store.add_device("next", 2, 2048, None)
        store.close()
        return before, after, size, cut

    before, after, size, cut = in_child(work)
    assert after == before
    assert cut == size
    assert [d[0] for d in fresh_view(directory)["devices"]] == ["kept", "next"]


def _close_on_a_full_disk(directory: Path) -> tuple[View, str]:
    """In a process of its own: changes, then a close whose fold cannot
    grow state.db's WAL (EFBIG past RLIMIT_FSIZE, as ENOSPC on a full
    disk).  Returns the view before the close and the close's error."""

    def work() -> tuple[View, str]:
        store = Store(directory)
        with store.transaction():
            store.add_device("a", 1, 2048, None, active=True)
            store.add_intent(3, "create_thin", 2, "b", 2048)
        before = view(store)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            store.close()
            error = ""
        except (OSError, sqlite3.Error) as exc:
            error = str(exc)
        return before, error

    made(directory).close()
    result: tuple[View, str] = in_child(work)
    return result


def test_a_fold_that_fails_at_close_keeps_the_log(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    before, error = _close_on_a_full_disk(directory)
    assert error and str(directory / LOG_NAME) in error
    assert (directory / LOG_NAME).exists()
    assert fresh_view(directory) == before
    assert sorted(os.listdir(directory)) == [DB_NAME]


@pytest.mark.xfail(
    strict=True,
    reason="the failed ROLLBACK no longer hides the error, but SQLite reports the file "
    "limit (EFBIG) as 'disk I/O error', and the store's message does not say what the "
    "disk lacks",
)
def test_a_fold_that_fails_at_close_says_why(tmp_path: Path) -> None:
    _before, error = _close_on_a_full_disk(tmp_path / "state")
    assert "full" in error and "cannot rollback" not in error, error


def test_a_fork_child_writes_and_exits_while_the_parent_closes_first(tmp_path: Path) -> None:
    """A forked child shares the parent's open log (and its lock): the
    parent's close folds and removes the log.  The child's change through
    the parent's store is refused (it could land in the removed log); the
    store the child opens itself takes it, and nothing is lost."""
    directory = tmp_path / "state"
    store = made(directory)
    with store.transaction():
        store.add_device("parent", 1, 2048, None)
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(go_write)
            os.read(go_read, 1)  # the parent has closed
            with contextlib.suppress(StateError), store.transaction():
                store.add_device("child", 2, 2048, None)
            if store.device("child") is not None:
                os._exit(3)
            store.close()  # a fork's copy: no fold
            own = Store(directory)
            with own.transaction():
                own.add_device("child", 2, 2048, None)
            own.close()
            code = 0 if names(Store(directory)) == ["child", "parent"] else 2
        finally:
            os._exit(code)
    os.close(go_read)
    store.close()
    assert not (directory / LOG_NAME).exists()  # folded by the parent
    os.write(go_write, b"x")
    os.close(go_write)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [d[0] for d in fresh_view(directory)["devices"]] == ["child", "parent"]
    assert sorted(os.listdir(directory)) == [DB_NAME]


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


def _writer(directory: str, report: int, log_limit: int) -> None:  # pragma: no cover
    """Change the store forever, writing the number of each committed
    transaction to ``report``."""
    store_module.LOG_LIMIT = log_limit
    store = Store(directory)
    for i in range(WRITER_STEPS):
        with store.transaction(durable=i % 2 == 0):
            store.add_device(f"d{i}", i, 2048 + i, None, active=True)
            if i % 5 == 4:
                store.drop_device(f"d{i - 2}")
            store.set_transaction_id(i)
        if i % 7 == 3:
            store.set_config(dict(CONFIG, low_water_mark=i))
        os.write(report, f"{i + 1}\n".encode())
    store.close()
    os._exit(0)


def _reader(directory: str, stop: float) -> None:  # pragma: no cover
    """Read the store without a lock until ``stop``; exit 3 if a view is
    ever one the writer never made (its devices and transaction id are
    changed in one transaction)."""
    store = Store(directory)
    while time.monotonic() < stop:
        with store.held():  # one look at the log for the whole view
            got = view(store)
        txid = got["transaction_id"]
        steps = [0, 1] if txid == 0 else [txid + 1]
        if got["devices"] not in [_writer_model(n)["devices"] for n in steps]:
            os._exit(3)
    store.close()
    os._exit(0)


@pytest.mark.parametrize("log_limit", [1 << 20, 2048], ids=["no-fold", "folds-often"])
def test_a_writer_killed_anywhere_loses_no_committed_change(
    tmp_path: Path, log_limit: int
) -> None:
    """SIGKILL at random moments (mid-append, mid-fold of a configuration
    or of a long log), with a reader following the log the whole time:
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
        writer = ctx.Process(target=_writer, args=(str(directory), write, log_limit))
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


def test_a_migration_killed_anywhere_leaves_a_store_that_opens(tmp_path: Path) -> None:
    """A schema-1 store whose upgrade is killed at random moments: every
    later open succeeds and shows what the old libdm wrote."""
    with open(V1 / "expected.json") as fh:
        want = json.load(fh)
    rng = random.Random(99)
    ctx = multiprocessing.get_context("fork")
    for round_ in range(6):
        directory = tmp_path / f"state{round_}"
        directory.mkdir(mode=0o700)
        shutil.copyfile(V1 / DB_NAME, directory / DB_NAME)
        os.chmod(directory / DB_NAME, 0o600)
        proc = ctx.Process(target=_open_and_close, args=(str(directory),))
        proc.start()
        time.sleep(rng.uniform(0.0, 0.05))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        store = Store(directory)
        try:
            assert store.devices() == want["devices"]
            assert store.intents() == want["intents"]
            assert store.transaction_id() == want["transaction_id"]
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
    store_module.LOG_LIMIT = 4096  # folds past the threshold every few changes
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
            s.add_device(name, thin_id, size, parent, active=True)
        return thin_id
    if op == "burst":
        prefix, count = args
        ids = []
        for i in range(count):
            with s.transaction(durable=i % 2 == 0):
                thin_id = _allocate(s)
                s.add_device(f"{prefix}{i}", thin_id, 4096, None)
            ids.append(thin_id)
        return ids
    if op == "drop":
        (name,) = args
        with s.transaction():
            row = s.device(name)
            assert row is not None
            s.drop_device(name)
            s.release_id(row["thin_id"])
        return None
    if op == "active":
        name, active = args
        s.set_active(name, active)
        return None
    if op == "config":
        (lwm,) = args
        s.set_config(dict(CONFIG, low_water_mark=lwm))
        return None
    if op == "intent":
        txid, name = args
        with s.transaction():
            thin_id = _allocate(s)
            s.add_intent(txid, "create_thin", thin_id, name, 2048)
            s.set_transaction_id(txid)
        return thin_id
    if op == "drop_intent":
        (txid,) = args
        row = next(r for r in s.intents() if r["txid"] == txid)
        with s.transaction(durable=False):
            s.drop_intent(txid)
            s.queue_delete(row["thin_id"], row["name"])
        return None
    if op == "undelete":
        (thin_id,) = args
        with s.transaction():
            s.drop_deferred_delete(thin_id)
            s.release_id(thin_id)
        return None
    if op == "fail":
        with pytest.raises(RuntimeError), s.transaction():
            s.add_device("never", MAX, 1, None)
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
        """One writes many records (past the fold threshold) while the
        other reads without a lock: every count it sees is one the writer
        passed through."""
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
        """SIGKILL between changes: no fold, the log stays for the others."""
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
