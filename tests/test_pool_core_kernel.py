"""The pool's round trips to the kernel: each change makes only the
device-mapper calls it needs (the guard's status gives the pool's device
number and uuid too, a new device is created without looking for it
first, and a device is acted on only once its info and table prove it the
pool's own, which costs an info and a table, and the info alone when no
device has the name)."""

import pytest

import libdm
from libdm.dm import task as dm_task

pytestmark = pytest.mark.kernel


@pytest.fixture
def calls(monkeypatch):
    """The device-mapper tasks run, by operation, while the test records."""
    seen = []
    real = dm_task.Task.run

    def run(self, *args, **kwargs):
        seen.append(self.operation)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(dm_task.Task, "run", run)
    return seen


def test_create_snapshot_and_delete_make_only_the_calls_they_need(dm_name, tmp_path, calls):
    pool = libdm.Pool.create_loop(dm_name("pool"), tmp_path / "pool", data_size="64M")
    try:
        calls.clear()
        pool.create_thin("vol", "8M")
        # status (guard, with the devno), info (the name is free), create_thin,
        # set_transaction_id, status (commit), create + load + resume.
        assert calls == ["status", "info", "message", "message", "status"] + ["create"] * 3
        calls.clear()
        pool.snapshot_device("vol", "snap")
        assert calls == [
            "status",
            "info",
            "info",  # the origin is proven the pool's: info and table
            "table",
            "suspend",
            "message",
            "resume",
            "message",
            "status",
            "create",
            "create",
            "create",
        ]
        calls.clear()
        pool.delete_device("snap")
        # status (guard), info and table (proven the pool's; its open count
        # before the discard), remove, delete, set_transaction_id, status
        # (commit).
        assert calls == ["status", "info", "table", "remove", "message", "message", "status"]
        pool.deactivate_device("vol")
        calls.clear()
        pool.snapshot_device("vol", "of-inactive")
        # status, info (the name is free), info (a name with a dash: is
        # "<pool>-of" a libdm pool, whose namespace it would enter?); an
        # inactive origin: its info says so, and the message is sent
        # without a suspend (which would fail, and be logged as an error).
        assert calls[:6] == ["status", "info", "info", "info", "message", "message"]
    finally:
        pool.destroy(remove_files=True)


def test_open_activates_each_device_in_one_create(dm_name, tmp_path, calls):
    pool = libdm.Pool.create_loop(dm_name("pool"), tmp_path / "pool", data_size="64M")
    try:
        for name in ("a", "b", "c"):
            pool.create_thin(name, "4M")
        for name in ("a", "b", "c"):
            pool.deactivate_device(name)
            pool.activate_device(name)
        directory = pool.directory
        pool.destroy()
        calls.clear()
        again = libdm.Pool.open(directory)
        assert calls.count("create") == 3 + 3 * 3  # the pool's, then each device's
        assert calls.count("info") <= 4  # the pool's checks only, none per device
        again.destroy(remove_files=True)
    except BaseException:
        pool.close()
        raise
