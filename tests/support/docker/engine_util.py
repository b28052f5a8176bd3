"""A real dockerd (Debian's docker.io 20.10) in the test kernel, on a
graph-driver plugin, and the offline images it loads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

from support.poll import wait_for
from support.tarball import MTIME, Entry, Kind, tar_bytes

DOCKER = "/usr/bin/docker"  # another docker CLI may come first in PATH
DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"


def prepare_kernel() -> None:
    """What dockerd and runc need in the test kernel (it boots with none of it)."""

    def mount(kind: str, where: str, options: str = "") -> None:
        os.makedirs(where, exist_ok=True)
        if not os.path.ismount(where):
            argv = ["mount", "-t", kind] + (["-o", options] if options else []) + [kind, where]
            subprocess.run(argv, check=True)

    mount("cgroup2", "/sys/fs/cgroup")
    mount("tmpfs", "/dev/shm")
    mount("devpts", "/dev/pts", "newinstance,ptmxmode=0666")
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
    if not os.path.lexists("/dev/fd"):
        os.symlink("/proc/self/fd", "/dev/fd")
    # dockerd writes key.json there: keep it off the host's /etc/docker.
    mount("tmpfs", "/etc/docker")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def layer_tar(entries: Sequence[tuple]) -> bytes:
    """A layer tar of (path, content, mode[, uid, gid]): content bytes,
    None for a directory, "->target" for a symbolic link, "=>target" for
    a hard link."""

    def entry(path: str, content: bytes | str | None, mode: int, *owner: int) -> Entry:
        uid, gid = owner or (0, 0)
        if content is None:
            return Entry(path, "dir", None, mode, uid, gid)
        if isinstance(content, str):
            kind: Kind = "sym" if content.startswith("->") else "link"
            return Entry(path, kind, content[2:], mode, uid, gid)
        return Entry(path, "file", content, mode, uid, gid)

    return tar_bytes(entry(*e) for e in entries)


def busybox_layer(extra: Sequence[tuple] = ()) -> bytes:
    """/bin/busybox and the applets a test uses, as symbolic links."""
    with open(BUSYBOX, "rb") as fh:
        binary = fh.read()
    entries: list[tuple] = [("bin", None, 0o755), ("bin/busybox", binary, 0o755)]
    for applet in ("sh", "cat", "ls", "echo", "mkdir", "rm", "touch", "sleep", "dd", "sync"):
        entries.append((f"bin/{applet}", "->busybox", 0o777))
    entries += [("etc", None, 0o755), ("tmp", None, 0o1777)]
    return layer_tar([*entries, *extra])


def save_archive(path: Path, tag: str, layers: Sequence[bytes]) -> list[str]:
    """A ``docker load`` archive of ``layers`` tagged ``tag``; returns the
    layers' digests (sha256 of each layer tar, Docker's diff ids)."""
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2023-11-14T22:13:20Z"} for _ in layers],
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    members = [(config_name, config)]
    names = []
    for i, layer in enumerate(layers):
        names.append(f"layer{i}/layer.tar")
        members.append((names[-1], layer))
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": names}])
    members.append(("manifest.json", manifest.encode()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return diff_ids


def saved_layer_digests(path: Path) -> list[str]:
    """The digests of the layers a ``docker save`` archive holds, in order."""
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        out = []
        for name in manifest[0]["Layers"]:
            data = tar.extractfile(name).read()  # type: ignore[union-attr]
            out.append("sha256:" + hashlib.sha256(data).hexdigest())
    return out


class Dockerd:
    """dockerd with a private socket, exec-root, pidfile and data-root,
    without the networking the kernel lacks, on ``driver`` with its
    storage ``options``."""

    def __init__(
        self, workdir: Path, data_root: Path, driver: str, options: Sequence[str] = ()
    ) -> None:
        self.workdir, self.data_root, self.driver = workdir, data_root, driver
        self.options = tuple(options)  # --storage-opt each
        self.sock = f"/run/{driver}-dockerd.sock"
        self.log_path = workdir / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> Dockerd:
        argv = [
            DOCKERD,
            "--experimental",
            "--storage-driver",
            self.driver,
            *(arg for opt in self.options for arg in ("--storage-opt", opt)),
            "-H",
            f"unix://{self.sock}",
            "--exec-root",
            f"/run/{self.driver}-exec",
            "--pidfile",
            f"/run/{self.driver}-dockerd.pid",
            "--data-root",
            str(self.data_root),
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--bridge=none",
            "--userland-proxy=false",
            "--exec-opt",
            "native.cgroupdriver=cgroupfs",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child's)
        env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        log.close()
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError("dockerd exited:\n" + self.log_tail())
            return (
                os.path.exists(self.sock) and self.docker("version", check=False).returncode == 0
            )

        if not wait_for(answers, timeout, interval=0.3):
            raise RuntimeError("dockerd did not answer:\n" + self.log_tail())
        return self

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [DOCKER, "-H", f"unix://{self.sock}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                f"\n--- dockerd:\n{self.log_tail()}"
            )
        return proc

    def docker_async(self, *args: str) -> subprocess.Popen[str]:
        """Start ``docker ARGS`` and return at once (its output piped)."""
        return subprocess.Popen(
            [DOCKER, "-H", f"unix://{self.sock}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def kill(self) -> None:
        """SIGKILL dockerd (its containerd and containers stay, as they would)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float = 60) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None
