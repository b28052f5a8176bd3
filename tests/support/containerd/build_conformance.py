"""Build containerd's snapshotter conformance suite (conformance_test.go
here, against Debian's golang-github-containerd-containerd-dev) in GOPATH
mode, without a module proxy, and cache the binary under .venv/cache by
the hash of the wrapper and the containerd source's version.

Also builds probe/main.go, the static program tests run in a container.

``python tests/support/containerd/build_conformance.py`` prints the suite's path
(.ci/setup.sh runs it, on the host: inside a test kernel the same build
takes minutes)."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
SRC = "/usr/share/gocode/src/github.com/containerd/containerd"
WRAPPER = os.path.join(HERE, "conformance_test.go")
CACHE = os.path.join(ROOT, ".venv", "cache", "libdm-conformance")


def _partial(binary: str) -> str:
    """A name of this build's own for ``binary`` until it is complete:
    test kernels side by side share the host's filesystem, and may build
    the same binary at once (the last rename wins, whole)."""
    return f"{binary}.{secrets.token_hex(4)}.tmp"


def binary_path() -> str:
    """Where the suite built from this wrapper and containerd version is cached."""
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "golang-github-containerd-containerd-dev"],
        capture_output=True,
        text=True,
    ).stdout
    with open(WRAPPER, "rb") as fh:
        key = hashlib.sha256(fh.read() + version.encode()).hexdigest()[:16]
    return os.path.join(CACHE, f"conformance-{key}.test")


def build() -> str:
    """The suite's test binary, built when missing or stale.

    Raises:
        RuntimeError: Go or containerd's source is missing, or the build failed.
    """
    go = shutil.which("go")
    if not go or not os.path.isdir(os.path.join(SRC, "snapshots", "testsuite")):
        raise RuntimeError(
            "containerd's conformance suite needs golang-go and "
            "golang-github-containerd-containerd-dev (bash .ci/setup.sh "
            "installs them)"
        )
    binary = binary_path()
    if os.path.exists(binary):
        return binary
    build_dir = os.path.join(CACHE, "build")
    pkg = os.path.join(build_dir, "src", "libdmconformance")
    os.makedirs(pkg, exist_ok=True)
    shutil.copy(WRAPPER, pkg)
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPATH=f"{build_dir}:/usr/share/gocode",
        CGO_ENABLED="0",
        GOCACHE=os.path.join(build_dir, "gocache"),
        GOFLAGS="",
    )
    partial = _partial(binary)
    proc = subprocess.run(
        [go, "test", "-c", "-o", partial, "libdmconformance"],
        cwd=pkg,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError("building the conformance suite failed:\n" + proc.stdout + proc.stderr)
    os.rename(partial, binary)
    return binary


def build_probe() -> str:
    """probe/main.go, a static program a test runs as a container's
    process; cached like the suite."""
    source = os.path.join(HERE, "probe", "main.go")
    with open(source, "rb") as fh:
        key = hashlib.sha256(fh.read()).hexdigest()[:16]
    binary = os.path.join(CACHE, f"probe-{key}")
    if os.path.exists(binary):
        return binary
    go = shutil.which("go")
    if not go:
        raise RuntimeError("the container probe needs golang-go (bash .ci/setup.sh installs it)")
    build_dir = os.path.join(CACHE, "build")
    os.makedirs(build_dir, exist_ok=True)
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPATH=build_dir,
        CGO_ENABLED="0",
        GOCACHE=os.path.join(build_dir, "gocache"),
        GOFLAGS="",
    )
    partial = _partial(binary)
    proc = subprocess.run(
        [go, "build", "-o", partial, "."],
        cwd=os.path.dirname(source),
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError("building the probe failed:\n" + proc.stdout + proc.stderr)
    os.rename(partial, binary)
    return binary


if __name__ == "__main__":
    try:
        build_probe()
        print(build())
    except RuntimeError as exc:
        sys.exit(str(exc))
