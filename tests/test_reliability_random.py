"""Randomized crash trials: a process doing random changes drawn from every
state-changing operation of a loop pool (create, snapshot, delete,
activate, deactivate, resize of data and of metadata, refresh, the low
water mark, a monitor growth step, and writes that give the monitor
something to grow for) is killed at a random moment or at a random named
crash point.  Pool.open in this process must then leave the store, the
kernel and the on-disk thin ids in agreement, with no leaked thin id, and
the pool healthy (witness.pool_problems: not suspended, no inactive
table, its table what the store and the files say, every active device
readable).

Which operations the trials reached and which crash points fired are
recorded; those never reached are reported as gaps."""

import os
import random
import signal
import subprocess
import sys

import pytest
from support import reliability, witness

import libdm
from libdm.thin import crash

pytestmark = pytest.mark.kernel

# Every state-changing operation the churn draws from, with its weight.
OPERATIONS = {
    "create_thin": 8,
    "snapshot": 6,
    "delete": 5,
    "resize_thin": 3,
    "activate": 3,
    "deactivate": 3,
    "resize_data": 2,
    "resize_metadata": 2,
    "refresh": 2,
    "set_low_water_mark": 2,
    "monitor": 2,
    "write": 5,
}

CHURN = f"""
import os, random, sys, libdm
directory, seed, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ops = {OPERATIONS!r}
rnd = random.Random(seed)
pool = libdm.Pool.open(directory)
print("ready", flush=True)
n = 0
while True:
    n += 1
    names = [d.name for d in pool.devices()]
    op = rnd.choices(list(ops), weights=list(ops.values()))[0]
    if not names and op in ("snapshot", "delete", "resize_thin", "activate", "deactivate",
                            "write"):
        op = "create_thin"
    if len(names) > 30 and op in ("create_thin", "snapshot"):
        op = "delete"
    if op == "write" and names:
        # Its own writes must not fill the pool: a full pool fails writes,
        # which is the full-pool suites' subject, not a kill's.
        st = pool.status()
        if int(st.used_data) * 4 > int(st.total_data) * 3:
            op = "delete"
    with open(log, "a") as fh:  # reached: about to run it
        fh.write(op + "\\n")
    if op == "create_thin":
        pool.create_thin(f"c{{seed}}-{{n}}", "1M")
    elif op == "snapshot":
        pool.device(rnd.choice(names)).snapshot(f"s{{seed}}-{{n}}")
    elif op == "delete":
        pool.device(rnd.choice(names)).delete()
    elif op == "resize_thin":
        dev = pool.device(rnd.choice(names))
        size = int(dev.size) + rnd.choice([64 << 10, -(64 << 10)])
        if (64 << 10) <= size <= (4 << 20):
            dev.resize(size, force=True)
    elif op == "activate":
        pool.device(rnd.choice(names)).activate()
    elif op == "deactivate":
        pool.device(rnd.choice(names)).deactivate()
    elif op == "resize_data":
        size = os.stat(os.path.join(directory, "data")).st_size
        if size < (512 << 20):
            pool.resize(data_size=size + rnd.choice([64 << 10, (1 << 20) + 4096]))
    elif op == "resize_metadata":
        size = os.stat(os.path.join(directory, "metadata")).st_size
        if size < (32 << 20):
            pool.resize(metadata_size=size + rnd.choice([4096, 512 << 10]))
    elif op == "refresh":
        pool.refresh()
    elif op == "set_low_water_mark":
        pool.set_low_water_mark(rnd.randint(0, 2000))
    elif op == "monitor":
        if os.stat(os.path.join(directory, "data")).st_size < (512 << 20):
            pool.monitor(threshold=rnd.choice([1, 5]), percent=rnd.choice([1, 5]),
                         metadata_threshold=rnd.choice([5, 99]), reserve=512).check()
    elif op == "write":
        dev = pool.device(rnd.choice(names))
        if dev.active:
            fd = os.open(dev.path, os.O_WRONLY)
            try:
                os.pwrite(fd, os.urandom(256 << 10), rnd.randrange(4) << 18)
                os.fsync(fd)
            finally:
                os.close(fd)
"""

CREATE = """
import sys, libdm
libdm.Pool.create_loop(sys.argv[1], sys.argv[2], data_size="64M", min_free_space=0).close()
"""


def recorded_pool(directory):
    """Whether the store in ``directory`` records its pool (read with
    sqlite3, not libdm)."""
    import sqlite3

    db = sqlite3.connect(directory / "state.db")
    try:
        return db.execute("SELECT count(*) FROM pool").fetchone()[0] == 1
    except sqlite3.OperationalError:  # no table yet
        return False
    finally:
        db.close()


def run_killed(argv, env, rnd, ready=True):
    """Run a child, kill it at a random moment unless it dies first.
    Returns (killed by us, its stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if ready:
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.wait()
            raise AssertionError(f"the churn did not start: {proc.stderr.read()}")
    by_us = False
    try:
        proc.wait(timeout=rnd.uniform(0.05, 1.5))
    except subprocess.TimeoutExpired:
        proc.kill()
        by_us = True
    proc.wait()
    return proc.returncode, by_us, proc.stderr.read()


def trial_problems(directory, trial):
    """Pool health and agreement after a trial, as readable strings, and
    whether the pool is wedged."""
    try:
        problems = witness.pool_problems(directory)
    except witness.PoolWedged as exc:
        return [f"{trial}: {exc}"], True
    wedged = any("suspended" in p for p in problems)
    problems += witness.pool_disagreements(directory)
    return [f"{trial}: {p}" for p in problems], wedged


def test_random_kills(dm_name, tmp_path):
    trials = reliability.scale(12, 300)
    rnd = random.Random(20261127)
    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="64M", min_free_space=0).close()
    log = tmp_path / "reached.log"
    problems, leaks, wedged = [], 0, 0
    points_fired, points_armed = set(), set()
    for trial in range(trials):
        env = dict(os.environ)
        env.pop("LIBDM_CRASH_AT", None)
        point = None
        if trial % 25 == 5:
            # Pool creation itself, killed at its crash point or at random.
            target = tmp_path / f"new{trial}"
            new_name = dm_name(f"new{trial}")
            if rnd.random() < 0.5:
                point = "pool:created"
                env["LIBDM_CRASH_AT"] = point
            code, by_us, stderr = run_killed(
                [CREATE, new_name, str(target)], env, rnd, ready=False
            )
            with open(log, "a") as fh:
                fh.write("create_pool\n")
        else:
            target = directory
            if rnd.random() < 0.5:
                point = rnd.choice([p for p in crash.POINTS if p != "pool:created"])
                env["LIBDM_CRASH_AT"] = f"{point}@{rnd.randint(1, 3)}"
            code, by_us, stderr = run_killed(
                [CHURN, str(directory), str(trial), str(log)], env, rnd
            )
            assert code == -signal.SIGKILL, stderr  # killed, never failed
        if point is not None:
            points_armed.add(point)
            if code == -signal.SIGKILL and not by_us:
                points_fired.add(point)
        if not os.path.exists(target / "state.db"):
            continue  # creation killed before the store existed: nothing to open
        how = (
            f"trial {trial} (seed {trial}, "
            + (f"LIBDM_CRASH_AT={env['LIBDM_CRASH_AT']}, " if point else "")
            + ("killed at a random time" if by_us else "killed at the point")
            + ")"
        )
        if target != directory and not recorded_pool(target):
            # Killed before the pool was recorded: open says to run the
            # creation again, which takes back what was left and succeeds.
            with pytest.raises(libdm.StateError, match="creation run again"):
                libdm.Pool.open(target)
            again = subprocess.run(
                [sys.executable, "-c", CREATE, new_name, str(target)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert again.returncode == 0, f"{how}: {again.stderr}"
        pool = libdm.Pool.open(target)
        try:
            found, is_wedged = trial_problems(target, how)
            problems += found
            leaks += sum("leaked thin ids" in p for p in found)
            if is_wedged:
                wedged += 1
                break  # nothing more can be learnt from a wedged pool
            if target != directory:
                pool.destroy(remove_files=True)
            elif len(pool.devices()) > 40:  # keep the pool small
                for dev in pool.devices():
                    if len(pool.devices()) > 20:
                        dev.delete()
        finally:
            pool.close()
    with open(log) as fh:
        reached = set(fh.read().split())
    wanted = set(OPERATIONS) | {"create_pool"}
    gaps = reliability.gaps(wanted, reached) + reliability.gaps(crash.POINTS, points_fired)
    reliability.record(
        "random kills",
        trials=trials,
        crash_points=len(points_fired),
        disagreements=len(problems),
        leaked_ids=leaks,
        wedged=wedged,
        operations=sorted(reached),
        crash_points_reached=sorted(points_fired),
        gaps=gaps,
    )
    print(
        f"\nrandom kills: operations reached {sorted(reached)}; crash points fired "
        f"{sorted(points_fired)}; gaps {gaps}"
    )
    assert problems == []
    assert leaks == 0
