"""Helpers for the snapshotter tests: a loop pool and the plugin served
from it in a child process (the way containerd runs it)."""

import os
import signal
import subprocess
import sys
import time

import libdm

# The repository: the tests directory's parent.
ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)


def make_pool(directory, name, data_size="2G"):
    return libdm.Pool.create_loop(name, str(directory), data_size=data_size)


def write_config(path, **settings):
    lines = []
    monitor = settings.pop("monitor", None)
    for k, v in settings.items():
        lines.append(f"{k} = {_toml(v)}")
    if monitor:
        lines.append("[monitor]")
        lines += [f"{k} = {_toml(v)}" for k, v in monitor.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class PluginDied(RuntimeError):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Plugin:
    """``python -m libdm.snapshotter serve`` in a child process."""

    def __init__(self, pool_dir, socket_path, config=None, env=None, log=None):
        self.pool_dir, self.socket_path, self.config = str(pool_dir), str(socket_path), config
        self.env = dict(os.environ, **(env or {}))
        self.log = log
        self.proc = None

    def start(self, wait=True):
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
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=out
        )
        if out is not subprocess.DEVNULL:
            out.close()
        if wait:
            line = self.proc.stdout.readline().decode()
            if not line.startswith("serving on"):
                code = self.proc.wait(timeout=60)
                self.proc.stdout.close()
                self.proc = None
                tail = ""
                if self.log:
                    with open(self.log, "rb") as fh:
                        tail = fh.read()[-3000:].decode(errors="replace")
                raise PluginDied(code, f"plugin did not start (exit {code}):\n{tail}")
        return self

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.proc.stdout.close()
        self.proc = None
        return code

    def kill(self):
        return self.stop(signal.SIGKILL)


def wait_for(predicate, timeout=30, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def unmount_below(directory):
    """Unmount whatever is mounted below ``directory`` (deepest first)."""
    directory = os.path.realpath(str(directory))
    with open("/proc/self/mounts") as fh:
        points = [line.split()[1].replace("\\040", " ") for line in fh]
    for point in sorted(
        (p for p in points if p.startswith(directory + "/")), key=len, reverse=True
    ):
        subprocess.run(["umount", "-l", point], capture_output=True)
