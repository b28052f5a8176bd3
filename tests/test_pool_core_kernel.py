"""The pool's round trips to the kernel: each change makes only the
device-mapper calls it needs (the guard's status gives the pool's device
number too, a new device is created without looking for it first, and
nothing is checked for existence before a remove or a suspend)."""

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
        # status (guard), info (open count before the discard), remove,
        # delete, set_transaction_id, status (commit).
        assert calls == ["status", "info", "remove", "message", "message", "status"]
        pool.deactivate_device("vol")
        calls.clear()
        pool.snapshot_device("vol", "of-inactive")
        # An inactive origin: the suspend is refused (no such device) and
        # the message is sent without it.
        assert calls[:5] == ["status", "info", "suspend", "message", "message"]
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
