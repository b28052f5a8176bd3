"""Helpers for the snapshotter tests: a loop pool and the plugin served
from it in a child process (the way containerd runs it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import libdm

StrPath = str | os.PathLike[str]


def make_pool(directory: StrPath, name: str, data_size: str = "2G") -> libdm.Pool:
    """A loop pool for a plugin to serve (the caller destroys it)."""
    return libdm.Pool.create_loop(name, str(directory), data_size=data_size)


def write_config(path: Path, **settings: object) -> Path:
    """Write the plugin's TOML config: ``settings`` as keys, and a
    ``monitor`` mapping as the ``[monitor]`` table."""
    lines = []
    monitor = settings.pop("monitor", None)
    for k, v in settings.items():
        lines.append(f"{k} = {_toml(v)}")
    if monitor:
        lines.append("[monitor]")
        assert isinstance(monitor, Mapping), monitor
        lines += [f"{k} = {_toml(v)}" for k, v in monitor.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class PluginDied(RuntimeError):
    """The plugin exited instead of serving; ``code`` is its exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Plugin:
    """``python -m libdm.snapshotter serve`` in a child process."""

    def __init__(
        self,
        pool_dir: StrPath,
        socket_path: StrPath,
        config: StrPath | None = None,
        env: Mapping[str, str] | None = None,
        log: StrPath | None = None,
    ) -> None:
        self.pool_dir, self.socket_path, self.config = str(pool_dir), str(socket_path), config
        self.env = dict(os.environ, **(env or {}))
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Plugin:
        """Start the plugin; with ``wait``, until it says it is serving.

        Raises:
            PluginDied: it exited instead (with its log's tail, when logged).
        """
        argv = [
            sys.executable,
            "-m",
            "libdm.snapshotter",
            "serve",
            "--pool",
            self.pool_dir,
            "--socket",
            self.socket_path,
        ]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        out: IO[bytes] | int = (
            open(self.log, "ab")  # noqa: SIM115 (closed once the child has it)
            if self.log
            else subprocess.DEVNULL
        )
        # In the test's working directory (no cwd=): `-m` then finds the libdm
        # the test imported, the installed one in the installed-package run.
        proc = self.proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=out)
        if not isinstance(out, int):
            out.close()
        assert proc.stdout is not None  # stdout=PIPE
        if wait:
            line = proc.stdout.readline().decode()
            if not line.startswith("serving on"):
                code = proc.wait(timeout=60)
                proc.stdout.close()
                self.proc = None
                tail = ""
                if self.log:
                    with open(self.log, "rb") as fh:
                        tail = fh.read()[-3000:].decode(errors="replace")
                raise PluginDied(code, f"plugin did not start (exit {code}):\n{tail}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal the plugin and wait for it; its exit status (None if not running)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
        code = proc.wait(timeout=timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        self.proc = None
        return code

    def kill(self) -> int | None:
        """SIGKILL the plugin and wait for it."""
        return self.stop(signal.SIGKILL)


def wait_for(predicate: Callable[[], object], timeout: float = 30, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed;
    whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def unmount_below(directory: StrPath) -> None:
    """Unmount whatever is mounted below ``directory`` (deepest first)."""
    directory = os.path.realpath(str(directory))
    with open("/proc/self/mounts") as fh:
        points = [line.split()[1].replace("\\040", " ") for line in fh]
    for point in sorted(
        (p for p in points if p.startswith(directory + "/")), key=len, reverse=True
    ):
        subprocess.run(["umount", "-l", point], capture_output=True)


def snapshotter_meta(root: StrPath, name: str) -> object:
    """Meta value ``name`` of the snapshotter database in ``root`` (read-only)."""
    import json
    import sqlite3

    db = sqlite3.connect(f"file:{root}/snapshotter.db?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
    finally:
        db.close()
    return None if row is None else json.loads(row[0])


def base_device(root: StrPath) -> str:
    """The name of the base device the snapshotter in ``root`` made."""
    value = snapshotter_meta(root, "base_ready")
    assert isinstance(value, dict), value
    return str(value["device"])


def owner_token(root: StrPath) -> str:
    """The token the snapshotter in ``root`` marks its devices' names with."""
    return str(snapshotter_meta(root, "owner_token"))
