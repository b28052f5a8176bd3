"""Several processes and threads changing one pool at once, and callers
without root."""

import os
import subprocess
import sys
import threading

import pytest
from support import reliability, witness

import libdm
from libdm.thin.store import Store

pytestmark = pytest.mark.kernel

WORKER = """
import random, sys, libdm
directory, tag, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(tag)
pool = libdm.Pool.open(directory, lock_timeout=120)
mine = []
for i in range(rounds):
    op = rnd.choice(["create", "create", "snapshot", "delete"])
    if op == "create" or not mine:
        mine.append(pool.create_thin(f"{tag}-{i}", "1M").name)
    elif op == "snapshot":
        mine.append(pool.device(rnd.choice(mine)).snapshot(f"{tag}-{i}").name)
    else:
        victim = next((n for n in reversed(mine) if not pool.device(n).children()), None)
        if victim:
            pool.device(victim).delete()
            mine.remove(victim)
print(" ".join(sorted(mine)))
"""


def check_consistent(pool):
    store = Store(pool.directory)
    try:
        rows = store.devices()
        ids = [r.thin_id for r in rows]
        assert len(ids) == len(set(ids))  # no id given twice
        assert witness.thin_ids(pool.name) == set(ids)
        assert store.transaction_id() == witness.transaction_id(pool.name)
        assert store.intents() == []
        return {r.name for r in rows}
    finally:
        store.close()


def test_processes_racing_on_one_pool(dm_name, tmp_path):
    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="256M").close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(directory), f"p{n}", "12"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    survivors = set()
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        survivors |= set(out.split())
    pool = libdm.Pool.open(directory)
    try:
        assert check_consistent(pool) == survivors  # no lost or extra record
        reliability.record("concurrency", operations=4 * 12, processes=4, lost_records=0)
        for name in survivors:
            assert pool.device(name).active
    finally:
        pool.close()


def test_threads_racing_on_one_pool_object(make_pool):
    pool = make_pool(data_size="256M")
    errors = []

    def work(tag):
        try:
            base = pool.create_thin(f"{tag}-base", "1M")
            for i in range(4):
                base.snapshot(f"{tag}-s{i}")
            pool.device(f"{tag}-s0").delete()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    names = check_consistent(pool)
    assert len(names) == 6 * 4
    reliability.record("concurrency", operations=6 * 6, threads=6, lost_records=0)


def test_a_pool_opened_in_two_processes_sees_the_others_changes(tmp_path, make_pool):
    directory = tmp_path / "pool"
    first = make_pool(directory=directory, data_size="64M")
    code = f"import libdm\nlibdm.Pool.open({str(directory)!r}).create_thin('other', '1M')\n"
    subprocess.run([sys.executable, "-c", code], check=True)
    made = first.create_thin("mine", "1M")  # must not reuse the other's id
    assert made.thin_id == 1
    assert {d.name for d in first.devices()} == {"other", "mine"}
    check_consistent(first)


def _as_nobody(fn):
    """Run fn() in a forked child as uid/gid 65534; return its exit code and
    what it wrote."""
    from libdm.dm._lib import lib

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            lib.dm_lib_release()  # a fresh control fd, opened as nobody
            os.setgid(65534)
            os.setuid(65534)
            code, text = fn()
            os.write(write_end, text.encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        said = fh.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), said


def test_non_root_gets_a_clear_permission_error_and_nothing_is_made(dm_name, tmp_path):
    name = dm_name("pool")
    target = tmp_path / "nobody-pool"
    os.chmod(tmp_path, 0o777)

    def attempt():
        try:
            libdm.Pool.create_loop(name, target, data_size="64M")
        except PermissionError as exc:
            return 3, str(exc)
        return 1, "no error"

    code, said = _as_nobody(attempt)
    assert code == 3, said
    assert "CAP_SYS_ADMIN" in said
    assert name not in witness.names()
    assert not target.exists()


def test_non_root_cannot_open_a_pool(dm_name, tmp_path):
    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M").close()
    os.chmod(tmp_path, 0o777)

    def attempt():
        try:
            libdm.Pool.open(directory)
        except PermissionError as exc:
            return 3, str(exc)
        return 1, "no error"

    code, said = _as_nobody(attempt)
    assert code == 3, said
    assert "CAP_SYS_ADMIN" in said or "root" in said


CHURN = """
import sys, time, libdm
p = libdm.Pool.load(sys.argv[1])
end, i = time.monotonic() + float(sys.argv[2]), 0
print("started", flush=True)
while time.monotonic() < end:
    p.create_thin(f"x{i}", "1M").snapshot(f"y{i}")
    p.delete_device(f"y{i}")
    p.delete_device(f"x{i}")
    i += 1
print(i)
"""


def test_listing_while_another_process_deletes(make_pool):
    """A listing races another process's creates, snapshots and deletes:
    it never fails (a device deleted, or being deleted, after the list was
    read is not active, and its parent is the one recorded with it), and
    the command line's listing exits 0."""
    from support.cli import run_cli

    from libdm.cli.thin_cmds import device_rows

    pool = make_pool(data_size="128M")
    pool.create_thin("a", "8M")
    churn = subprocess.Popen(
        [sys.executable, "-c", CHURN, pool.directory, "25"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert churn.stdout is not None and churn.stdout.readline() == "started\n"
        listings = 0
        with libdm.Pool.load(pool.directory) as reader:
            while churn.poll() is None:
                rows = device_rows(reader)
                assert "a" in {row["name"] for row in rows}
                listings += 1
                if listings % 10 == 0:
                    for args in (("thin", "ls"), ("thin", "ls", "--tree")):
                        proc = run_cli(*args, "--pool", pool.directory)
                        assert proc.returncode == 0, proc.stderr
        assert churn.wait() == 0
        rounds = int(churn.stdout.read().split()[-1])
    finally:
        churn.kill()
        churn.wait()
    assert rounds > 5 and listings >= 10, (rounds, listings)
    check_consistent(pool)
