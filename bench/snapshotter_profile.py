"""Where the snapshotter's gRPC calls spend their time, in one boot.

    python -m libdm.testing run .venv/bin/python bench/snapshotter_profile.py [--layers 30]

The same chain of calls (``--layers`` Prepare + Commit, then Remove of the
chain from the top) is made four ways, side by side in one kernel:

* ``in-process``: :class:`libdm.snapshotter.core.Snapshotter` called
  directly, no gRPC: the pool's and the snapshotter's own work;
* ``in-thread server``: the libdm server in the benchmark's own process,
  each call timed at the client and inside its handler (``its
  handlers``: the snapshotter's call in grpc's worker thread);
* ``libdm server``: ``libdm snapshotter serve`` on its socket, called with
  :class:`libdm.snapshotter.client.Client`: what containerd's proxy sees;
* ``null server``: the same gRPC server (``grpc.server`` with its thread
  pool, the same handler table) over a snapshotter that does nothing and
  answers at once: gRPC's and Python's own cost per call;
* ``null aio server``: a leaner server, ``grpc.aio`` on one event loop
  (no hand-off from grpc's polling thread to a worker thread), over the
  same do-nothing snapshotter.

Then each server is traced (``strace -f -c -p``, all its threads) over
``--traced`` more calls of each kind: its system calls per call, by name,
and its threads.  Prints tables and writes JSON to
bench/results/snapshotter_profile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import grpc  # noqa: E402

import libdm  # noqa: E402
from libdm.snapshotter import core  # noqa: E402
from libdm.snapshotter.client import Client  # noqa: E402
from libdm.snapshotter.config import load_config  # noqa: E402
from libdm.snapshotter.service import _SIGNATURES, SERVICE, Server, handler_for  # noqa: E402

OPS = ("prepare", "commit", "remove")
CONFIG = 'base_image_size = "64M"\n[monitor]\nenabled = false\n'


class NullSnapshotter:
    """Answers Prepare, Commit and Remove at once, with a mount shaped
    like the real one: what is left is the server's own cost."""

    MOUNT = core.Mount("ext4", "/dev/mapper/ctrd-null", ["rw"])

    def prepare(self, ns: str, key: str, parent: str, labels: dict[str, str]) -> list[core.Mount]:
        return [self.MOUNT]

    def commit(self, ns: str, name: str, key: str, labels: dict[str, str]) -> None:
        return None

    def remove(self, ns: str, key: str) -> None:
        return None


def serve_null(socket_path: str, kind: str) -> None:
    """A server over :class:`NullSnapshotter`, until SIGTERM."""
    handler = handler_for(NullSnapshotter())  # type: ignore[arg-type]
    if kind == "sync":
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
        print("serving on", socket_path, flush=True)
        signal.sigwait({signal.SIGTERM})
        server.stop(0)
        return
    asyncio.run(_serve_aio(socket_path))


async def _serve_aio(socket_path: str) -> None:
    null = NullSnapshotter()
    from google.protobuf import empty_pb2

    from libdm.snapshotter.api import mount_pb2
    from libdm.snapshotter.api import snapshots_pb2 as pb

    async def prepare(req: Any, ctx: Any) -> Any:
        mounts = null.prepare("", req.key, req.parent, dict(req.labels))
        return pb.PrepareSnapshotResponse(
            mounts=[
                mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts
            ]
        )

    async def commit(req: Any, ctx: Any) -> Any:
        null.commit("", req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    async def remove(req: Any, ctx: Any) -> Any:
        null.remove("", req.key)
        return empty_pb2.Empty()

    table = {}
    for name, fn in (("Prepare", prepare), ("Commit", commit), ("Remove", remove)):
        req, resp, _ = _SIGNATURES[name]
        table[name] = grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, table),))
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    print("serving on", socket_path, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


class Calls:
    """Prepare, Commit and Remove, however they are made."""

    def __init__(
        self,
        prepare: Callable[..., object],
        commit: Callable[..., object],
        remove: Callable[..., object],
    ) -> None:
        self.prepare, self.commit, self.remove = prepare, commit, remove


def chain(calls: Calls, tag: str, layers: int, parent: str) -> dict[str, list[float]]:
    """A chain of Prepare + Commit on ``parent``, then its Remove from the
    top; every call timed."""
    out: dict[str, list[float]] = {op: [] for op in OPS}
    names = []
    for i in range(layers):
        key, name = f"{tag}-{i}-active", f"{tag}-{i}"
        t = time.perf_counter()
        calls.prepare(key, parent)
        out["prepare"].append(time.perf_counter() - t)
        t = time.perf_counter()
        calls.commit(name, key)
        out["commit"].append(time.perf_counter() - t)
        names.append(name)
        parent = name
    for name in reversed(names):
        t = time.perf_counter()
        calls.remove(name)
        out["remove"].append(time.perf_counter() - t)
    return out


def in_thread(
    snap: core.Snapshotter, socket_path: str, layers: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The libdm server in this process: each call timed at the client and
    inside the server's handler (the snapshotter's own call, in grpc's
    worker thread)."""
    inside: dict[str, list[float]] = {op: [] for op in OPS}

    def timed(op: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return real(*args)
            finally:
                inside[op].append(time.perf_counter() - t)

        return call

    for op in OPS:
        setattr(snap, op, timed(op, getattr(snap, op)))
    server = Server(snap, socket_path)
    try:
        client = Client(socket_path, "inthread")
        client.wait_ready()
        client.prepare("base-active")
        client.commit("base", "base-active")
        for op in OPS:
            inside[op].clear()
        outside = chain(client_calls(client), "inthread", layers, "base")
        client.close()
    finally:
        server.stop()
    return outside, inside


def client_calls(client: Client) -> Calls:
    return Calls(
        lambda key, parent: client.prepare(key, parent),
        lambda name, key: client.commit(name, key),
        client.remove,
    )


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(re.search(r"^Threads:\s+(\d+)", fh.read(), re.M).group(1))  # type: ignore[union-attr]


def traced(pid: int, work: str, run: Callable[[], int]) -> dict[str, float]:
    """The system calls of every thread of ``pid`` while ``run()`` makes
    calls (it returns how many): a count per call, by name."""
    out = os.path.join(work, f"strace-{pid}-{time.monotonic_ns()}")
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-o", out, "-p", str(pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    # strace says "Process N attached" once per thread; wait for the first.
    assert tracer.stderr is not None
    tracer.stderr.readline()
    time.sleep(0.5)  # the other threads
    n = run()
    time.sleep(0.2)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=60)
    counts: dict[str, float] = {}
    with open(out) as fh:
        for line in fh:
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3]) / n
    return counts


def trace_server(
    pid: int, client: Client, work: str, tag: str, parent: str, rounds: int
) -> dict[str, dict[str, float]]:
    """System calls per Prepare, per Commit and per Remove of the server."""
    keys = [f"{tag}-t{i}" for i in range(rounds)]

    def prepares() -> int:
        for key in keys:
            client.prepare(key + "-active", parent)
        return rounds

    def commits() -> int:
        for key in keys:
            client.commit(key, key + "-active")
        return rounds

    def removes() -> int:
        for key in keys:
            client.remove(key)
        return rounds

    return {
        op: traced(pid, work, fn) for op, fn in zip(OPS, (prepares, commits, removes), strict=True)
    }


def spawn(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving on"):
        proc.kill()
        raise RuntimeError(f"{argv}: did not start ({line!r})")
    return proc


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--traced", type=int, default=10)
    parser.add_argument(
        "--serve-null", nargs=2, metavar=("KIND", "SOCKET"), help=argparse.SUPPRESS
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results", "snapshotter_profile.json"))
    parser.add_argument(
        "--report", metavar="JSON", help="print the tables of an earlier run's results, and stop"
    )
    args = parser.parse_args()
    if args.report:
        with open(args.report) as fh:
            print(report(json.load(fh)))
        return
    if args.serve_null:
        serve_null(args.serve_null[1], args.serve_null[0])
        return
    work = tempfile.mkdtemp(prefix="bench-snapprof-")
    pool_dir = os.path.join(work, "pool")
    config_path = os.path.join(work, "snap.toml")
    with open(config_path, "w") as fh:
        fh.write(CONFIG)
    procs: list[subprocess.Popen[str]] = []
    results: dict[str, Any] = {"layers": args.layers, "traced": args.traced, "times": {}}
    try:
        pool = libdm.Pool.create_loop(f"snapprof{os.getpid()}", pool_dir, data_size="2G")
        snap = core.Snapshotter(pool, load_config(config_path))
        try:
            snap.prepare("inproc", "base-active", "", {})
            snap.commit("inproc", "base", "base-active", {})
            results["times"]["in-process"] = chain(
                Calls(
                    lambda key, parent: snap.prepare("inproc", key, parent, {}),
                    lambda name, key: snap.commit("inproc", name, key, {}),
                    lambda key: snap.remove("inproc", key),
                ),
                "inproc",
                args.layers,
                "base",
            )
            results["times"]["in-thread server"], results["times"]["its handlers"] = in_thread(
                snap, os.path.join(work, "inthread.sock"), args.layers
            )
        finally:
            snap.close()
            pool.close()
        servers = {
            "libdm server": [
                sys.executable,
                "-m",
                "libdm.snapshotter",
                "serve",
                "--pool",
                pool_dir,
                "--socket",
                os.path.join(work, "libdm.sock"),
                "--config",
                config_path,
            ],
            "null server": [
                sys.executable,
                __file__,
                "--serve-null",
                "sync",
                os.path.join(work, "null.sock"),
            ],
            "null aio server": [
                sys.executable,
                __file__,
                "--serve-null",
                "aio",
                os.path.join(work, "aio.sock"),
            ],
        }
        results["syscalls"], results["threads"] = {}, {}
        for n, (name, argv) in enumerate(servers.items()):
            proc = spawn(argv)
            procs.append(proc)
            sock = argv[argv.index("--socket") + 1] if "--socket" in argv else argv[-1]
            client = Client(sock, f"bench{n}")  # a namespace, and so a base, of its own
            client.wait_ready()
            client.prepare("base-active")
            client.commit("base", "base-active")
            print(f"{name}: {args.layers} layers ...", flush=True)
            results["threads"][name] = {"idle": threads(proc.pid)}
            results["times"][name] = chain(client_calls(client), "grpc", args.layers, "base")
            results["threads"][name]["serving"] = threads(proc.pid)
            results["syscalls"][name] = trace_server(
                proc.pid, client, work, "traced", "base", args.traced
            )
            client.close()
            proc.terminate()
            proc.wait(timeout=60)
        tables = report(results)
        print(tables)
        results["tables"] = tables
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if os.path.exists(os.path.join(pool_dir, "state.db")):
            libdm.Pool.open(pool_dir).destroy(remove_files=True)
        subprocess.run(["rm", "-rf", work])


def _groups(counts: dict[str, float]) -> Iterator[tuple[str, float]]:
    """The system calls of a call, grouped as the notes read them."""
    groups = {
        # A system call inside UML; on a real kernel a vDSO call, no system call.
        "clock_gettime": ("clock_gettime",),
        "futex (thread hand-offs, locks)": ("futex",),
        "poll and epoll (grpc's polling)": (
            "poll",
            "ppoll",
            "epoll_wait",
            "epoll_pwait",
            "epoll_ctl",
        ),
        "socket reads and writes": (
            "read",
            "write",
            "recvmsg",
            "sendmsg",
            "readv",
            "writev",
            "recvfrom",
            "sendto",
        ),
        "pwrite64 and fcntl (SQLite's pages and locks)": ("pwrite64", "pread64", "fcntl"),
        "ioctl (device-mapper, loop, block)": ("ioctl",),
        "fsync and fdatasync": ("fsync", "fdatasync"),
    }
    seen: set[str] = set()
    for label, names in groups.items():
        seen.update(names)
        yield label, sum(counts.get(n, 0.0) for n in names)
    yield "everything else", sum(v for k, v in counts.items() if k not in seen)
    yield "total", sum(counts.values())


def report(results: dict[str, Any]) -> str:
    times = results["times"]
    ways = list(times)
    rows = ["| call (median ms) | " + " | ".join(ways) + " |", "| --- |" + " ---: |" * len(ways)]
    for op in OPS:
        rows.append(
            f"| {op} | " + " | ".join(f"{median_ms(times[w][op]):.1f}" for w in ways) + " |"
        )
    rows.append("")
    servers = list(results["syscalls"])
    for op in OPS:
        rows.append(f"| system calls per {op} | " + " | ".join(servers) + " |")
        rows.append("| --- |" + " ---: |" * len(servers))
        by = {s: dict(_groups(results["syscalls"][s][op])) for s in servers}
        for label in by[servers[0]]:
            rows.append(
                f"| {label} | " + " | ".join(f"{by[s][label]:.1f}" for s in servers) + " |"
            )
        rows.append("")
    rows.append("| threads | " + " | ".join(servers) + " |")
    rows.append("| --- |" + " ---: |" * len(servers))
    for when in ("idle", "serving"):
        rows.append(
            f"| {when} | " + " | ".join(str(results["threads"][s][when]) for s in servers) + " |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
