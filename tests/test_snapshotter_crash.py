"""Crash trials for the snapshotter: SIGKILL the plugin in the middle of
Prepare, Commit and Remove (at named crash points of the snapshotter and
of the pool, and at random times), restart it, and check that the two
stores agree: every acknowledged committed layer is there with its data,
every acknowledged removal is gone, the operation in flight either
happened or did not, no thin device is leaked and a new operation never
meets "already exists".  Then power cuts: the whole kernel stopped with
the plugin serving, and the same checks in a new kernel."""

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from support import reliability
from support.children import PluginDied
from support.containerd.snapshotter_util import (
    Plugin,
    base_device,
    make_pool,
    unmount_below,
    write_config,
)

PREFIX = "ctrd-"
POINTS = (
    "snapshotter:prepare:row",
    "snapshotter:prepare:device",
    "snapshotter:commit:flushed",
    "snapshotter:commit:recorded",
    "snapshotter:remove:marked",
    "snapshotter:remove:deleted",
    "create:intent",
    "create:message",
    "create:transaction",
    "create:recorded",
    "delete:deactivated",
    "delete:intent",
    "delete:message",
    "delete:transaction",
)


class Model:
    """What the plugin acknowledged: committed name -> marker text, active keys."""

    def __init__(self):
        self.committed = {}
        self.parents = {}
        self.active = set()
        self.uncertain = None
        self.counter = 0

    def to_json(self):
        return {
            "committed": self.committed,
            "parents": self.parents,
            "active": sorted(self.active),
            "uncertain": self.uncertain,
            "counter": self.counter,
        }

    @classmethod
    def from_json(cls, data):
        m = cls()
        m.committed, m.parents = data["committed"], data["parents"]
        m.active, m.uncertain, m.counter = set(data["active"]), data["uncertain"], data["counter"]
        return m


def leaves(model):
    used = set(model.parents.values())
    return [n for n in model.committed if n not in used]


def mount_and_write(mounts, target, text):
    os.makedirs(target, exist_ok=True)
    m = mounts[0]
    opts = ["-o", ",".join(m.options)] if m.options else []
    subprocess.run(
        ["mount", "-t", m.type, *opts, m.source, target], check=True, capture_output=True
    )
    try:
        with open(os.path.join(target, "marker"), "w") as fh:
            fh.write(text)
    finally:
        subprocess.run(["umount", target], check=True, capture_output=True)


def workload(client, model, rng, mnt, *, max_ops=40, write=True):
    """Prepare / commit / remove until the plugin dies (or max_ops)."""
    import grpc

    for _ in range(max_ops):
        choice = rng.random()
        try:
            if model.active and choice < 0.5:
                key = rng.choice(sorted(model.active))
                name = key.replace("-a", "-c", 1)
                model.uncertain = ["commit", name, key]
                client.commit(name, key)
                model.active.discard(key)
                model.committed[name] = model.parents.pop(key + "!text", "")
                model.parents[name] = model.parents.pop(key)
            elif model.active and choice < 0.58:
                key = rng.choice(sorted(model.active))
                model.uncertain = ["remove", key]
                client.remove(key)
                model.active.discard(key)
                model.parents.pop(key, None)
                model.parents.pop(key + "!text", None)
            elif leaves(model) and 0.58 <= choice < 0.64:
                name = rng.choice(sorted(leaves(model)))
                model.uncertain = ["remove", name]
                client.remove(name)
                del model.committed[name]
                del model.parents[name]
            else:
                model.counter += 1
                key = f"s{model.counter}-a"
                parent = rng.choice(["", *sorted(model.committed)])
                model.uncertain = ["prepare", key, parent]
                mounts = client.prepare(key, parent)
                model.active.add(key)
                model.parents[key] = parent
                text = ""
                if write:
                    text = f"{key} {rng.random()}"
                    mount_and_write(mounts, mnt, text)
                model.parents[key + "!text"] = text
            model.uncertain = None
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                return True  # the plugin died under this call
            raise
        except subprocess.CalledProcessError:
            # The plugin died while we wrote into a prepared layer.
            model.uncertain = None
            return True
    return False


def settle(client, model):
    """After a restart: resolve the call that was in flight, by what the
    plugin now reports (either outcome is allowed, not half of one)."""
    names = {i.name: i for i in client.list()}
    u, model.uncertain = model.uncertain, None
    if u is None:
        return names
    if u[0] == "prepare":
        _, key, parent = u
        if key in names:
            model.active.add(key)
            model.parents[key] = parent
            model.parents[key + "!text"] = ""
    elif u[0] == "commit":
        _, name, key = u
        assert (name in names) != (key in names), f"commit {key}->{name} half done: {names}"
        if name in names:
            model.active.discard(key)
            model.committed[name] = model.parents.pop(key + "!text", "")
            model.parents[name] = model.parents.pop(key)
    elif u[0] == "remove":
        _, key = u
        if key not in names:
            model.active.discard(key)
            model.committed.pop(key, None)
            model.parents.pop(key, None)
            model.parents.pop(key + "!text", None)
    return names


def check_agreement(client, model, pool_dir, pool_name):
    """The plugin's listing is the model, its store agrees with the pool's,
    and the kernel has no thin device the pool does not know."""
    import libdm

    names = {i.name: i for i in client.list()}
    want = set(model.committed) | set(model.active)
    assert set(names) == want, (sorted(names), sorted(want))
    for name in model.committed:
        assert names[name].kind == 3 and names[name].parent == model.parents[name], name
    db = sqlite3.connect(f"file:{pool_dir}/snapshotter.db?mode=ro", uri=True)
    rows = db.execute("SELECT key, state, device, kind FROM snapshots").fetchall()
    db.close()
    assert all(state == "ready" for _, state, _, _ in rows), rows
    pool = libdm.Pool.load(pool_dir)
    try:
        devices = {d.name for d in pool.devices() if d.name.startswith(PREFIX)}
    finally:
        pool.close()
    owned = {device for _, _, device, _ in rows} | {base_device(pool_dir)}
    assert devices == owned, f"leaked {devices - owned}, lost {owned - devices}"
    live = {d for d in os.listdir("/dev/mapper") if d.startswith(f"{pool_name}-{PREFIX}")}
    assert live <= {f"{pool_name}-{d}" for d in devices}, live
    for _, _, device, kind in rows:  # committed layers are left inactive
        if kind == "committed":
            assert f"{pool_name}-{device}" not in live, device
    return len(rows)


def check_contents(client, model, mnt):
    for name, text in model.committed.items():
        if not text:
            continue
        mounts = client.view(f"check-{name}", name)
        os.makedirs(mnt, exist_ok=True)
        m = mounts[0]
        subprocess.run(
            ["mount", "-t", m.type, "-o", ",".join(m.options), m.source, mnt],
            check=True,
            capture_output=True,
        )
        try:
            with open(os.path.join(mnt, "marker")) as fh:
                assert fh.read() == text, name
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True)
        client.remove(f"check-{name}")


@pytest.mark.kernel
def test_kills_during_prepare_commit_and_remove(tmp_path):
    from libdm.snapshotter.client import Client

    rng = random.Random(int(os.environ.get("LIBDM_CRASH_SEED", "11")))
    pool_name = f"libdmtest-crash-{os.getpid()}"
    pool_dir = tmp_path / "pool"
    pool = make_pool(pool_dir, pool_name, "2G")
    pool.close()
    config = write_config(
        tmp_path / "config.toml", base_image_size="32M", monitor={"enabled": False}
    )
    sock = str(tmp_path / "snap.sock")
    mnt = str(tmp_path / "mnt")
    model = Model()
    kills = reliability.scale(14, 60)
    by_point = {}
    try:
        for trial in range(kills):
            armed = POINTS[(trial // 2) % len(POINTS)] if trial % 2 == 0 else None
            env = {"LIBDM_CRASH_AT": f"{armed}@{rng.randint(1, 2)}"} if armed else {}
            plugin = Plugin(pool_dir, sock, config, env=env, log=tmp_path / "plugin.log")
            try:
                plugin.start()
            except PluginDied as exc:  # the armed point was in the startup's recovery
                if exc.code != -9:
                    raise
                by_point[f"{armed} (recovery)"] = by_point.get(f"{armed} (recovery)", 0) + 1
                continue
            client = Client(sock, namespace="crash", timeout=120)
            client.wait_ready()
            settle(client, model)
            check_agreement(client, model, str(pool_dir), pool_name)
            timer = None
            if armed is None:
                timer = threading.Timer(rng.uniform(0.05, 1.5), plugin.proc.kill)
                timer.start()
            died = workload(client, model, rng, mnt, write=trial % 3 == 0)
            if timer is not None:
                timer.cancel()
            if not died:  # the armed point was not reached: kill it now
                armed = None
            plugin.kill()
            client.close()
            by_point[armed or "random"] = by_point.get(armed or "random", 0) + 1
        plugin = Plugin(pool_dir, sock, config, log=tmp_path / "plugin.log").start()
        client = Client(sock, namespace="crash", timeout=120)
        try:
            client.wait_ready()
            settle(client, model)
            rows = check_agreement(client, model, str(pool_dir), pool_name)
            check_contents(client, model, mnt)
            # New work meets no "already exists" and the pool is whole.
            client.prepare("after-a")
            client.commit("after", "after-a")
            client.remove("after")
            client.cleanup()
            check_agreement(client, model, str(pool_dir), pool_name)
        finally:
            client.close()
            plugin.stop()
        reliability.record(
            "snapshotter kills",
            kills=kills,
            snapshots_checked=rows,
            losses=0,
            leaked_devices=0,
            by_point=by_point,
        )
    finally:
        unmount_below(tmp_path)
        import libdm

        libdm.Pool.open(str(pool_dir)).destroy(remove_files=True)


# -- power cuts ---------------------------------------------------------------------------

STEP = os.path.abspath(__file__)


@pytest.mark.host
def test_power_cuts_with_the_plugin_serving(run_in_kernel, tmp_path):
    cuts = reliability.scale(2, 6)
    pool_name = f"libdmtest-snapcut-{os.getpid()}"
    for cycle in range(cuts + 1):
        step = "check" if cycle == cuts else "work"
        result = run_in_kernel(
            [sys.executable, STEP, step, str(tmp_path), pool_name, str(cycle)], timeout=600
        )
        assert result.returncode == 0, result.stderr[-4000:] + result.console[-2000:]
    with open(tmp_path / "state.json") as fh:
        state = json.load(fh)
    assert state["checked"] == cuts + 1
    reliability.record(
        "snapshotter power cuts",
        power_cuts=cuts,
        losses=0,
        leaked_devices=0,
        committed=len(state["model"]["committed"]),
    )


def _step(step, directory, pool_name, cycle):
    """One boot of the power-cut test (run inside a test kernel)."""
    import libdm
    from libdm.snapshotter.client import Client

    directory = os.path.abspath(directory)
    pool_dir = os.path.join(directory, "pool")
    state_path = os.path.join(directory, "state.json")
    if os.path.exists(state_path):
        with open(state_path) as fh:
            state = json.load(fh)
    else:
        libdm.Pool.create_loop(pool_name, pool_dir, data_size="2G").close()
        state = {"model": Model().to_json(), "checked": 0}
    model = Model.from_json(state["model"])
    config = write_config_path(directory)
    sock = os.path.join(directory, "snap.sock")
    mnt = os.path.join(directory, "mnt")
    plugin = Plugin(pool_dir, sock, config, log=os.path.join(directory, "plugin.log")).start()
    client = Client(sock, namespace="cut", timeout=120)
    client.wait_ready()
    settle(client, model)
    check_agreement(client, model, pool_dir, pool_name)
    check_contents(client, model, mnt)
    state["checked"] += 1
    if step == "check":
        _save(state_path, state, model)
        client.close()
        plugin.stop()
        libdm.Pool.open(pool_dir).destroy(remove_files=True)
        return
    rng = random.Random(1000 + int(cycle))
    # Everything acknowledged so far is saved (fsync) before the next call;
    # the call in flight when the kernel stops is the uncertain one.
    _save(state_path, state, model)
    for _ in range(rng.randint(3, 12)):
        workload(client, model, rng, mnt, max_ops=1)
        _save(state_path, state, model)
    model.uncertain = ["prepare", f"s{model.counter + 1}-a", ""]
    model.counter += 1
    _save(state_path, state, model)
    # The power cut: a call in flight, and the kernel stops with nothing synced.
    threading.Thread(target=lambda: client.prepare(model.uncertain[1]), daemon=True).start()
    time.sleep(rng.uniform(0.0, 0.3))
    os._exit(0)


def write_config_path(directory):
    from pathlib import Path

    return write_config(
        Path(directory) / "config.toml", base_image_size="32M", monitor={"enabled": False}
    )


def _save(path, state, model):
    state["model"] = model.to_json()
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


if __name__ == "__main__":
    _step(*sys.argv[1:5])
