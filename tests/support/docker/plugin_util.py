"""The Docker plugin in a child process (as a systemd unit runs it) and
a client that speaks its protocol as Docker's proxy does."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from support.children import start_plugin, stop_process


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class Client:
    """Calls to the plugin on ``socket_path``, one connection each."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def _post(self, url: str, body: Any, headers: Mapping[str, str]) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.socket_path)
        chunked = headers.get("Transfer-Encoding") == "chunked"
        conn.request("POST", url, body=body, headers=dict(headers), encode_chunked=chunked)
        return conn.getresponse()

    def call(self, method: str, **request: Any) -> dict[str, Any]:
        resp = self._post(
            f"/{method}",
            json.dumps(request).encode(),
            {"Content-Type": "application/vnd.docker.plugins.v1+json"},
        )
        data = resp.read()
        assert resp.status == 200, (method, resp.status, data)
        reply: dict[str, Any] = json.loads(data)
        return reply

    def ok(self, method: str, **request: Any) -> dict[str, Any]:
        """A call that must succeed (no ``Err``)."""
        reply = self.call(method, **request)
        assert not reply.get("Err"), (method, request, reply)
        return reply

    def apply_diff(
        self, layer: str, parent: str, chunks: Iterator[bytes] | bytes
    ) -> dict[str, Any]:
        """ApplyDiff with a chunked body, as dockerd sends it."""
        headers = {"Content-Type": "application/x-tar"}
        if not isinstance(chunks, bytes):
            headers["Transfer-Encoding"] = "chunked"
        resp = self._post(f"/GraphDriver.ApplyDiff?id={layer}&parent={parent}", chunks, headers)
        reply: dict[str, Any] = json.loads(resp.read())
        return reply

    def diff(self, layer: str, parent: str) -> bytes:
        resp = self._post(
            "/GraphDriver.Diff", json.dumps({"ID": layer, "Parent": parent}).encode(), {}
        )
        data = resp.read()
        assert resp.status == 200, data
        return data


class DockerPlugin:
    """``python -m libdm.docker serve`` in a child process."""

    def __init__(
        self,
        pool_dir: str,
        socket_path: str,
        options: tuple[str, ...] = ("dm.basesize=64M",),
        env: Mapping[str, str] | None = None,
        log: str | None = None,
    ) -> None:
        self.pool_dir, self.socket_path, self.options = pool_dir, socket_path, options
        self.env = dict(os.environ, **(env or {}))
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DockerPlugin:
        """Start the plugin and wait until it serves.

        Raises:
            PluginDied: it exited instead (with its log's tail).
        """
        argv = [sys.executable, "-m", "libdm.docker", "serve", "--pool", self.pool_dir]
        argv += ["--socket", self.socket_path]
        for option in self.options:
            argv += ["--storage-opt", option]
        self.proc = start_plugin(argv, self.env, self.log)
        return self

    @property
    def client(self) -> Client:
        return Client(self.socket_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        code = stop_process(self.proc, sig, timeout, self.log)
        self.proc = None
        return code

    def kill(self) -> int | None:
        return self.stop(signal.SIGKILL)

    def wait(self, timeout: float = 120) -> int | None:
        """Wait for the plugin to exit by itself (a crash point)."""
        code = stop_process(self.proc, None, timeout, self.log)
        self.proc = None
        return code


def mounts_of(device_path: str) -> list[str]:
    """Where the block device is mounted (from /proc/self/mountinfo)."""
    rdev = os.stat(device_path).st_rdev
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            major, minor = (int(n) for n in fields[2].split(":"))
            if os.makedev(major, minor) == rdev:
                out.append(fields[4])
    return out


def base_device(pool: Any) -> str:
    """The name of the plugin's base device in ``pool``: the one its
    records name (``docker-<token>-base``, or ``docker-base`` for records
    older than the mark)."""
    import sqlite3

    db = sqlite3.connect(
        f"file:{os.path.join(pool.directory, 'docker', 'docker.db')}?mode=ro", uri=True
    )
    try:
        row = db.execute("SELECT value FROM meta WHERE name='base'").fetchone()
    finally:
        db.close()
    assert row is not None, "the plugin has no base device"
    name: str = json.loads(row[0])["device"]
    return name
