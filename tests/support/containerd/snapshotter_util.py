"""Helpers for the snapshotter tests: a loop pool and the plugin served
from it in a child process (the way containerd runs it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import libdm
from support.children import start_plugin, stop_process

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
        self.proc = start_plugin(argv, self.env, self.log, wait)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal the plugin and wait for it; its exit status (None if not running)."""
        code = stop_process(self.proc, sig, timeout, self.log)
        self.proc = None
        return code

    def kill(self) -> int | None:
        """SIGKILL the plugin and wait for it."""
        return self.stop(signal.SIGKILL)


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
