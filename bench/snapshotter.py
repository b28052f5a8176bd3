"""containerd's devmapper snapshotter against the libdm plugin, in one boot.

    python -m libdm.testing run .venv/bin/python bench/snapshotter.py [--layers 50]

One kernel; one containerd with both snapshotters (its built-in
``devmapper`` on a thin pool of its own, and the libdm plugin as proxy
plugin ``libdm`` on a libdm pool); one gRPC client (libdm's
``libdm.snapshotter.client``) talking to containerd's snapshots service.
For each snapshotter: a chain of ``--layers`` Prepare+Commit, then Remove
of the whole chain from the top, each call timed.  Remove is timed twice:
until the call returns, and until the thin device is gone from the pool
(containerd removes it from the snapshotter in its garbage collector, after
the call returned): polled in the pool's metadata with ``thin_dump`` on a
metadata snapshot, the same way for both.  The libdm plugin is also timed
on its own socket, without containerd in between.

Prints a table of medians and writes JSON to bench/results/snapshotter.json.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import libdm  # noqa: E402
from libdm.snapshotter.client import Client  # noqa: E402

GC_ROOT = {"containerd.io/gc.root": "bench"}


def sh(*argv, env=None):
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout


class ThinIds:
    """The thin device ids a pool's metadata holds, read with thin_dump on
    a metadata snapshot (the same witness for both snapshotters)."""

    def __init__(self, pool_name, meta_dev):
        self.pool, self.meta = pool_name, meta_dev

    def count(self):
        libdm.message(self.pool, "reserve_metadata_snap")
        try:
            out = sh("thin_dump", "-m", self.meta)
        finally:
            libdm.message(self.pool, "release_metadata_snap")
        return len(re.findall(r"<device dev_id=", out))


def wait_count(ids, want, timeout=120):
    deadline = time.monotonic() + timeout
    while ids.count() != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"thin device count did not reach {want}")
    return time.monotonic()


def chain(client, ids, layers, tag):
    out = {"prepare": [], "commit": [], "remove_call": [], "remove_gone": []}
    parent = ""
    for i in range(layers):
        key, name = f"{tag}-{i}-active", f"{tag}-{i}"
        t = time.monotonic()
        client.prepare(key, parent, labels=GC_ROOT)
        out["prepare"].append(time.monotonic() - t)
        t = time.monotonic()
        client.commit(name, key, labels=GC_ROOT)
        out["commit"].append(time.monotonic() - t)
        parent = name
    base = ids.count() - layers
    for i in reversed(range(layers)):
        t = time.monotonic()
        client.remove(f"{tag}-{i}")
        out["remove_call"].append(time.monotonic() - t)
        gone = wait_count(ids, base + i)
        out["remove_gone"].append(gone - t)
    return out


def devmapper_pool(work, name):
    """A thin pool for containerd's devmapper snapshotter: two sparse files
    on loop devices and a thin-pool table (what its docs script does)."""
    data, meta = os.path.join(work, "dm-data"), os.path.join(work, "dm-meta")
    with open(data, "wb") as fh:
        fh.truncate(2 << 30)
    with open(meta, "wb") as fh:
        fh.truncate(64 << 20)
    data_dev = sh("losetup", "--find", "--show", data).strip()
    meta_dev = sh("losetup", "--find", "--show", meta).strip()
    sectors = (2 << 30) // 512
    libdm.create(
        name,
        [
            libdm.Target(
                0, sectors, "thin-pool", f"{meta_dev} {data_dev} 128 32768 1 skip_block_zeroing"
            )
        ],
    )
    return meta_dev, (data_dev, meta_dev)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "snapshotter.json"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-snap-")
    dm_pool = f"benchdm{os.getpid()}"
    ld_pool = f"benchld{os.getpid()}"
    procs, loops, pool = [], [], None
    try:
        dm_meta, loops = devmapper_pool(work, dm_pool)
        pool = libdm.Pool.create_loop(ld_pool, os.path.join(work, "ld"), data_size="2G")
        with open(os.path.join(work, "snap.toml"), "w") as fh:
            fh.write('base_image_size = "64M"\n[monitor]\nenabled = false\n')
        plugin_sock = os.path.join(work, "s.sock")
        plugin = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "libdm.snapshotter",
                "serve",
                "--pool",
                os.path.join(work, "ld"),
                "--socket",
                plugin_sock,
                "--config",
                os.path.join(work, "snap.toml"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(plugin)
        assert plugin.stdout.readline().startswith("serving on")
        address = os.path.join(work, "c.sock")
        with open(os.path.join(work, "containerd.toml"), "w") as fh:
            fh.write(f"""version = 2
root = "{work}/root"
state = "{work}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[plugins."io.containerd.snapshotter.v1.devmapper"]
  root_path = "{work}/devmapper"
  pool_name = "{dm_pool}"
  base_image_size = "64MB"
[proxy_plugins.libdm]
  type = "snapshot"
  address = "{plugin_sock}"
""")
        env = dict(os.environ, DM_DISABLE_UDEV="1")
        log = open(os.path.join(work, "containerd.log"), "wb")  # noqa: SIM115 (containerd's)
        ctd = subprocess.Popen(
            ["containerd", "--config", os.path.join(work, "containerd.toml")],
            stdout=log,
            stderr=log,
            env=env,
        )
        procs.append(ctd)
        deadline = time.monotonic() + 60
        while not os.path.exists(address):
            if time.monotonic() > deadline or ctd.poll() is not None:
                raise RuntimeError("containerd did not start")
            time.sleep(0.05)
        # The libdm pool's metadata device: the loop device over its metadata file.
        ld_meta = next(d for d in _loops() if d[1] == os.path.join(work, "ld", "metadata"))[0]
        results = {}
        runs = [
            ("devmapper", Client(address, "bench", "devmapper"), ThinIds(dm_pool, dm_meta)),
            ("libdm", Client(address, "bench", "libdm"), ThinIds(ld_pool, ld_meta)),
            ("libdm-direct", Client(plugin_sock, "bench", "libdm"), ThinIds(ld_pool, ld_meta)),
        ]
        floors = {}
        for name, client, ids in runs:
            floors[name] = []
            for _ in range(5):  # one poll of the witness: the resolution of "gone"
                t = time.monotonic()
                ids.count()
                floors[name].append(time.monotonic() - t)
            client.wait_ready()
            client.prepare("warmup-active", labels=GC_ROOT)  # the base device, made once
            client.commit("warmup", "warmup-active", labels=GC_ROOT)
            print(f"{name}: {args.layers} layers ...", flush=True)
            results[name] = chain(client, ids, args.layers, name)
            client.remove("warmup")
            client.close()
        table = report(results, floors)
        print(table)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(
                {"layers": args.layers, "times": results, "witness_poll": floors, "table": table},
                fh,
                indent=1,
            )
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        if pool is not None:
            pool = libdm.Pool.open(os.path.join(work, "ld"))
            pool.destroy(remove_files=True)
        for dev in libdm.list_devices() if hasattr(libdm, "list_devices") else []:
            name = dev if isinstance(dev, str) else getattr(dev, "name", "")
            if name.startswith(dm_pool):
                subprocess.run(["dmsetup", "remove", "--force", name], capture_output=True)
        subprocess.run(["dmsetup", "remove", dm_pool], capture_output=True)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        subprocess.run(["rm", "-rf", work])


def _loops():
    out = sh("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE")
    return [tuple(line.split(None, 1)) for line in out.splitlines() if len(line.split()) == 2]


def report(results, floors):
    def med(name, op):
        return statistics.median(results[name][op]) * 1000

    rows = [
        "| operation | devmapper (ms) | libdm via containerd (ms) | devmapper / libdm | "
        "libdm direct (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for op, label in (
        ("prepare", "Prepare"),
        ("commit", "Commit"),
        ("remove_call", "Remove, until the call returns"),
        ("remove_gone", "Remove, until the thin device is gone"),
    ):
        dm, ld, direct = med("devmapper", op), med("libdm", op), med("libdm-direct", op)
        rows.append(f"| {label} | {dm:.1f} | {ld:.1f} | {dm / ld:.1f} | {direct:.1f} |")
    polls = {n: statistics.median(v) * 1000 for n, v in floors.items()}
    rows.append(
        f"| one poll of the witness (thin_dump) | {polls['devmapper']:.1f} | "
        f"{polls['libdm']:.1f} | | {polls['libdm-direct']:.1f} |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
