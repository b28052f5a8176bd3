"""Where the libdm Docker plugin's calls spend their time, in one boot.

    python -m libdm.testing run --mem 2G .venv/bin/python bench/docker_profile.py [--rounds 30]

Two views of the same calls (Create, CreateReadWrite, Get, Put and
Remove of a container layer and of its image layer, ``--rounds`` times):

* the driver in this process, its calls into the pool timed apart: what
  the pool's change costs and what is the plugin's own (its records, its
  mounts);
* the HTTP round trip of a call that does nothing (``Plugin.Activate``)
  and of one that reads the records (``Exists``), over one kept-alive
  connection, as Docker's plugin client keeps its connections.

Count the system calls of each call with ``strace -f -y -p <plugin pid>``
(each call of a client that opens a connection per call runs in a
thread of its own).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libdm
from libdm.docker.driver import Driver, DriverOptions

SOCKET = "/run/docker/plugins/libdmprofile.sock"
POOL_CALLS = ("snapshot_device", "delete_device", "deactivate_device", "activate_device")
POOL_CALLS += ("device", "live_device")


class _Unix(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(SOCKET)


def driver_calls(pool: libdm.Pool, rounds: int, home: str) -> None:
    driver = Driver(pool, DriverOptions.parse(["dm.basesize=256M", "dm.fs=ext4"]))
    driver.init(home, [])
    in_pool = [0.0]
    for name in POOL_CALLS:
        real = getattr(pool, name)

        def timed(*args: Any, _real: Callable[..., Any] = real, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                in_pool[0] += time.perf_counter() - start

        setattr(pool, name, timed)
    times: dict[str, tuple[list[float], list[float]]] = {}

    def call(label: str, fn: Callable[..., object], *args: str) -> None:
        in_pool[0] = 0.0
        start = time.perf_counter()
        fn(*args)
        total = time.perf_counter() - start
        times.setdefault(label, ([], []))[0].append(total)
        times[label][1].append(total - in_pool[0])

    for i in range(rounds):
        call("Create", driver.create, f"l{i}", "")
        call("CreateReadWrite", driver.create, f"c{i}", f"l{i}")
        call("Get", driver.get, f"c{i}")
        call("Put", driver.put, f"c{i}")
        call("Remove (container)", driver.remove, f"c{i}")
        call("Remove (image)", driver.remove, f"l{i}")
    driver.close()
    for name in POOL_CALLS:
        delattr(pool, name)
    print(f"{'driver call':<20} {'total ms':>9} {'not in the pool ms':>19}  (medians of {rounds})")
    for label, (total, own) in times.items():
        print(
            f"{label:<20} {statistics.median(total) * 1e3:>9.2f} "
            f"{statistics.median(own) * 1e3:>19.2f}"
        )


def http_calls(pool: libdm.Pool, rounds: int) -> None:
    os.makedirs(os.path.dirname(SOCKET), exist_ok=True)
    argv = [sys.executable, "-m", "libdm.docker", "serve", "--pool", pool.directory]
    proc = subprocess.Popen([*argv, "--socket", SOCKET], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if not proc.stdout.readline().startswith(b"serving on"):
            raise RuntimeError("the plugin did not start")
        conn = _Unix("localhost")
        for method, request in (("Plugin.Activate", {}), ("GraphDriver.Exists", {"ID": "x"})):
            seconds = []
            for _ in range(3 * rounds):
                start = time.perf_counter()
                conn.request("POST", f"/{method}", body=json.dumps(request).encode())
                conn.getresponse().read()
                seconds.append(time.perf_counter() - start)
            print(
                f"HTTP round trip of {method}, one connection: "
                f"{statistics.median(seconds) * 1e3:.2f} ms median"
            )
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="libdm-bench-dockerprof-", dir="/var/tmp"))
    pool = libdm.Pool.create_loop("benchprof", work / "pool", data_size="4G")
    try:
        driver_calls(pool, args.rounds, str(work / "home"))
        http_calls(pool, args.rounds)
    finally:
        pool.destroy(remove_files=True)


if __name__ == "__main__":
    main()
