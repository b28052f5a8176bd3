"""The autoextend monitor against a writer going as fast as it can."""

import hashlib
import os
import threading

import pytest
from support import witness

import libdm

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def fill(path, megabytes, seed, errors, digests):
    """Write ``megabytes`` of distinct data, 1 MiB at a time, syncing each."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(megabytes):
            chunk = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (MiB // 32)
            os.pwrite(fd, chunk, i * MiB)
            os.fsync(fd)
            digests[(path, i)] = hashlib.sha256(chunk).hexdigest()
    except OSError as exc:
        errors.append(f"{path}: {exc}")
    finally:
        os.close(fd)


def test_monitor_keeps_a_full_speed_writer_in_space(make_pool):
    # error_if_no_space: running out would fail a write at once.
    # 128 MiB, grown at 50%: the writers are 64 MiB from the end when the
    # monitor starts its turn, which it needs under a coverage tracer (at
    # 80% of 96 MiB, 19 MiB, three writers syncing each MiB won the race).
    pool = make_pool(data_size="128M", features=["error_if_no_space"], min_free_space=0)
    devices = [pool.create_thin(f"v{i}", "128M") for i in range(3)]
    errors, digests = [], {}
    with pool.monitor(threshold=50, percent=20, interval=1.0) as monitor:
        writers = [
            threading.Thread(target=fill, args=(d.path, 64, i, errors, digests))
            for i, d in enumerate(devices)
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
    assert errors == []
    assert pool.status().mode == "rw"
    grown = [s for s in monitor.history if s.ok and s.part == "data"]
    assert len(grown) >= 3
    assert all(s.new_size > s.old_size for s in grown)
    final = pool.data_size()
    assert final >= 192 * MiB and final == grown[-1].new_size
    assert int(witness.table(pool.name)[0].split()[1]) * 512 == final
    # Every byte written is readable.
    for (path, i), digest in digests.items():
        with open(path, "rb") as fh:
            fh.seek(i * MiB)
            assert hashlib.sha256(fh.read(MiB)).hexdigest() == digest
    print(f"pool grew 128 MiB -> {final // MiB} MiB in {len(grown)} steps")


def test_monitor_sets_the_low_water_mark_and_respects_its_limit(make_pool):
    pool = make_pool(data_size="16M", min_free_space=0)
    dev = pool.create_thin("v", "64M")
    monitor = pool.monitor(threshold=50, percent=50, max_data_size="20M")
    monitor._arm()
    assert witness.table(pool.name)[0].split()[6] == str(256 * 50 // 100)
    errors, digests = [], {}
    fill(dev.path, 10, 0, errors, digests)
    steps = monitor.check()
    assert [s.ok for s in steps] == [True]
    assert pool.data_size() == 20 * MiB  # 24 MiB wanted, capped at 20
    steps = monitor.check()
    assert steps and "hard limit" in steps[0].error
    assert pool.data_size() == 20 * MiB


def test_monitor_reports_no_room_on_the_filesystem(dm_name, tmp_path):
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(small)], check=True)
    try:
        pool = libdm.Pool.create_loop(
            dm_name("pool"), small / "p", data_size="32M", min_free_space=0
        )
        try:
            dev = pool.create_thin("v", "64M")
            errors, digests = [], {}
            fill(dev.path, 28, 0, errors, digests)
            monitor = pool.monitor(threshold=80, percent=50, reserve="16M")
            steps = monitor.check()
            assert steps and not steps[0].ok and "no room" in steps[0].error
            assert pool.data_size() == 32 * MiB
            assert monitor.check() == []  # backing off
        finally:
            pool.destroy(remove_files=True)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_monitor_extends_a_block_pool_onto_spares(tmp_path, make_pool):
    import subprocess

    def attach(name, size):
        path = tmp_path / name
        with open(path, "wb") as fh:
            fh.truncate(size)
        return subprocess.run(
            ["losetup", "-f", "--show", str(path)], check=True, capture_output=True, text=True
        ).stdout.strip()

    data, meta, spare = attach("d", 32 * MiB), attach("m", 4 * MiB), attach("s", 32 * MiB)
    pool = make_pool(data, meta, min_free_space=0)
    dev = pool.create_thin("v", "128M")
    errors, digests = [], {}
    fill(dev.path, 28, 0, errors, digests)
    monitor = pool.monitor(threshold=80, percent=20, spares=[spare])
    steps = monitor.check()
    # Each device loses its first MiB to the pool's label: 31 + 31 MiB.
    assert [s.ok for s in steps] == [True] and steps[0].new_size == 62 * MiB
    assert len(witness.table(f"{pool.name}-tdata")) == 2
    assert monitor.spares == []
    fill(dev.path, 60, 1, errors, digests)
    steps = monitor.check()
    assert steps and not steps[0].ok and "no way to grow" in steps[0].error
    assert errors == []


def test_stop_ends_a_long_wait_at_once(make_pool, monkeypatch):
    from libdm.thin import monitor as monitor_module

    waiting = threading.Event()
    real_wait_event = monitor_module.wait_event

    def wait_event(*args, **kwargs):
        waiting.set()
        return real_wait_event(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "wait_event", wait_event)
    pool = make_pool(data_size="16M")
    monitor = pool.monitor(interval=3600).start()
    assert waiting.wait(timeout=60), "the monitor never began its wait"
    monitor.join(timeout=60)
    assert not monitor._thread.is_alive()  # an hour-long wait was cut short
