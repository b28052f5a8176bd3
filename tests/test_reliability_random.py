"""Randomized crash trials: a process doing random changes is killed at a
random moment (or at a random named crash point); Pool.open in a fresh
process must leave the store, the kernel and the on-disk thin ids in
agreement, with no leaked thin id."""

import os
import random
import signal
import subprocess
import sys

import pytest

import libdm
from libdm.thin import crash
from libdm.thin.store import Store

import reliability
import witness

pytestmark = pytest.mark.kernel

CHURN = """
import random, sys, libdm
directory, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
pool = libdm.Pool.open(directory)
print("ready", flush=True)
n = 0
while True:
    n += 1
    names = [d.name for d in pool.devices()]
    leaves = [d for d in names if not pool.device(d).children()]
    op = rnd.random()
    if op < 0.4 or not names:
        pool.create_thin(f"c{seed}-{n}", "1M")
    elif op < 0.7:
        pool.device(rnd.choice(names)).snapshot(f"s{seed}-{n}")
    elif op < 0.85 and leaves:
        pool.device(rnd.choice(leaves)).delete()
    else:
        dev = pool.device(rnd.choice(names))
        dev.deactivate() if dev.active else dev.activate()
"""


def disagreements(pool):
    """Every way the three views disagree, as readable strings."""
    found = []
    store = Store(pool.directory)
    try:
        if store.intents():
            found.append(f"intents left: {store.intents()}")
        if store.transaction_id() != witness.transaction_id(pool.name):
            found.append(f"transaction id: store {store.transaction_id()}, "
                         f"kernel {witness.transaction_id(pool.name)}")
        recorded = {r["thin_id"] for r in store.devices()}
        queued = {r["thin_id"] for r in store.deferred_deletes()}
        on_disk = witness.thin_ids(pool.name)
        leaked = on_disk - recorded - queued - set(store.foreign_ids())
        phantom = (recorded | queued) - on_disk
        if leaked:
            found.append(f"leaked thin ids {sorted(leaked)}")
        if phantom:
            found.append(f"records without a thin id {sorted(phantom)}")
        live = witness.names()
        for row in store.devices():
            dm_name = pool.device_dm_name(row["name"])
            if bool(row["active"]) != (dm_name in live):
                found.append(f"{row['name']}: active={row['active']} but "
                             f"{'present' if dm_name in live else 'absent'}")
            elif row["active"] and witness.sysfs(dm_name, "suspended") != "0":
                found.append(f"{row['name']} left suspended")
        return found, len(leaked)
    finally:
        store.close()


def test_random_kills(dm_name, tmp_path):
    trials = reliability.scale(12, 300)
    rnd = random.Random(20261127)
    directory = tmp_path / "pool"
    libdm.Pool.create_loop(dm_name("pool"), directory, data_size="512M",
                           min_free_space=0).close()
    problems, leaks, points_hit = [], 0, set()
    for trial in range(trials):
        env = dict(os.environ)
        env.pop("LIBDM_CRASH_AT", None)
        point = None
        if rnd.random() < 0.5:
            point = rnd.choice([p for p in crash.POINTS if p != "pool:created"])
            env["LIBDM_CRASH_AT"] = f"{point}@{rnd.randint(1, 3)}"
        proc = subprocess.Popen([sys.executable, "-c", CHURN, str(directory), str(trial)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        try:
            proc.wait(timeout=rnd.uniform(0.05, 1.5))
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.wait()
        stderr = proc.stderr.read()
        assert proc.returncode == -signal.SIGKILL, stderr  # killed, never failed
        if point is not None:
            points_hit.add(point)
        pool = libdm.Pool.open(directory)
        try:
            found, leaked = disagreements(pool)
            problems += [f"trial {trial}: {p}" for p in found]
            leaks += leaked
            if len(pool.devices()) > 40:  # keep the pool small: delete leaves
                for dev in pool.devices():
                    if not dev.children() and len(pool.devices()) > 20:
                        dev.delete()
        finally:
            pool.close()
    reliability.record("random kills", trials=trials, crash_points=len(points_hit),
                       disagreements=len(problems), leaked_ids=leaks)
    assert problems == []
    assert leaks == 0
