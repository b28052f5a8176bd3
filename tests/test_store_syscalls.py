"""System calls per store change: the store traffic of a thin create,
snapshot and delete, replayed against a :class:`~libdm.thin.store.Store`
alone (the same calls in the same order as the pool makes them, with no
kernel), counted with ``strace -f -c``.

As a test it checks that the store's part of an operation stays what
SQLite needs for it, so that a change that adds transactions or re-reads
shows (a count, not a time).  As a script it prints the table
that docs/store.rst quotes::

    python tests/test_store_syscalls.py
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from support.store import MAX_THIN_ID, intent, made

from libdm.testing import in_ci
from libdm.thin.store import Store
from libdm.thin.units import Sectors


def create(store: Store, name: str) -> None:
    """The store calls of ``Pool.create_thin`` (the lock taken, the
    deferred deletes retried, the name checked, the intent, the outcome,
    the device read back by its activation)."""
    store.pool()
    store.deferred_deletes()
    assert store.device(name) is None
    with store.transaction():
        thin_id = store.allocate_id(MAX_THIN_ID)
        assert thin_id is not None
        txid = store.transaction_id() + 1
        store.add_intent(intent(txid, "create_thin", thin_id, name, 2048))
    with store.transaction(durable=False):
        store.add_device(name, thin_id, Sectors(2048), None, active=True)
        store.set_transaction_id(txid)
        store.drop_intent(txid)
    store.device(name)
    store.device(name)


def snapshot(store: Store, origin: str, name: str) -> None:
    """The store calls of ``Pool.snapshot_device``."""
    store.pool()
    row = store.device(origin)
    assert row is not None
    store.deferred_deletes()
    assert store.device(name) is None
    with store.transaction():
        thin_id = store.allocate_id(MAX_THIN_ID)
        assert thin_id is not None
        txid = store.transaction_id() + 1
        store.add_intent(
            intent(txid, "create_snap", thin_id, name, int(row.size), origin, row.thin_id)
        )
    with store.transaction(durable=False):
        store.add_device(name, thin_id, row.size, origin, active=True)
        store.set_transaction_id(txid)
        store.drop_intent(txid)
    store.device(name)
    store.device(name)


def delete(store: Store, name: str) -> None:
    """The store calls of ``Pool.delete_device``."""
    store.pool()
    row = store.device(name)
    assert row is not None
    store.deferred_deletes()
    with store.transaction():
        txid = store.transaction_id() + 1
        store.add_intent(intent(txid, "delete", row.thin_id, name))
    with store.transaction():
        store.set_active(name, False)
    with store.transaction(durable=False):
        again = store.device(name)
        assert again is not None
        store.drop_device(name)
        store.drop_deferred_delete(row.thin_id)
        store.release_id(row.thin_id)
        store.set_transaction_id(txid)
        store.drop_intent(txid)


def run(directory: str, rounds: int, only: str, held: bool = False) -> None:
    """``rounds`` of one kind of operation on a store in ``directory``;
    with ``held``, each inside ``Store.held()`` (as a pool holding its
    lock may call it)."""
    store = Store(directory)
    try:
        for i in range(rounds):
            with store.held() if held else contextlib.nullcontext():
                if only == "create":
                    create(store, f"c{i}")
                elif only == "snapshot":
                    snapshot(store, "origin", f"s{i}")
                else:
                    delete(store, f"d{i}")
    finally:
        store.close()


def prepare(directory: str, rounds: int) -> None:
    store = made(directory)
    try:
        create(store, "origin")
        for i in range(rounds):
            create(store, f"d{i}")
    finally:
        store.close()


# Not the store's: the allocator's (Python's heap grows at its own pace,
# faster under a coverage tracer), and strace's own summary line.
SKIP = frozenset({"total", "brk", "mmap", "munmap", "mremap", "madvise", "mprotect"})


def count(rounds: int, only: str, held: bool = False) -> collections.Counter[str]:
    """System calls of ``rounds`` operations (strace -f -c), by name."""
    base = tempfile.mkdtemp(prefix="store-syscalls-")
    try:
        directory = os.path.join(base, "state")
        prepare(directory, rounds)
        out = os.path.join(base, "strace.txt")
        here = os.path.dirname(os.path.abspath(__file__))
        code = (
            f"import sys; sys.path.insert(0, {here!r}); import test_store_syscalls as t; "
            f"t.run({directory!r}, {rounds}, {only!r}, {held!r})"
        )
        # The child imports the libdm under test (no PYTHONPATH of the
        # source tree: in the README's run that is the installed wheel).
        subprocess.run(["strace", "-f", "-c", "-o", out, sys.executable, "-c", code], check=True)
        calls: collections.Counter[str] = collections.Counter()
        with open(out) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] not in SKIP:
                    calls[fields[-1]] += int(fields[3])
        return calls
    finally:
        shutil.rmtree(base)


def per_operation(only: str, n: int = 20, held: bool = False) -> dict[str, float]:
    """System calls per operation: (n + 1 operations - 1 operation) / n."""
    one, many = count(1, only, held), count(n + 1, only, held)
    return {k: (many[k] - one[k]) / n for k in many if many[k] - one[k] > 0}


# Under CI=true a missing strace fails the test (setup installs it); elsewhere it skips.
@pytest.mark.skipif(shutil.which("strace") is None and not in_ci(), reason="needs strace")
@pytest.mark.parametrize("only", ["create", "snapshot", "delete"])
def test_a_store_change_is_a_handful_of_system_calls(only: str) -> None:
    # SQLite in WAL mode: 43-46 (its locks, two writes per changed page,
    # one sync per durable commit), 37-42 with the reads of held() in one
    # read transaction; a few more leave room for SQLite's versions.
    calls = per_operation(only, 10)
    assert sum(calls.values()) <= 50, calls
    syncs = calls.get("fdatasync", 0) + calls.get("fsync", 0)
    assert syncs <= (2 if only == "delete" else 1), calls
    held = per_operation(only, 10, held=True)
    assert sum(held.values()) <= 45, held
    assert sum(held.values()) < sum(calls.values()), (held, calls)


def main() -> None:
    for held in (False, True):
        for only in ("create", "snapshot", "delete"):
            calls = per_operation(only, held=held)
            detail = ", ".join(f"{k} {v:g}" for k, v in sorted(calls.items(), key=lambda x: -x[1]))
            print(f"{only}{' (held)' if held else ''}: {sum(calls.values()):g} ({detail})")


if __name__ == "__main__":
    main()
