"""Build Docker's graph-driver conformance functions (graphtest) with the
wrapper graphtest_test.go here, offline, in GOPATH mode, and cache the
binary under .venv/cache by the hash of the wrapper and Docker's version.

Docker's engine tree comes from Debian's docker.io source package
(``apt-get source``, through a private apt configuration with ``deb-src``
lines made from the system's own ``deb`` sources, so that the system's
lists stay as they are); its dependencies from Debian's Go packages under
/usr/share/gocode (golang-github-docker-docker-dev's dependencies,
golang-github-vbatts-tar-split-dev, golang-github-gotestyourself-gotest.tools-dev).

``python tests/support/docker/build_graphtest.py`` prints the binary's
path (.ci/setup.sh runs it on the host).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
WRAPPER = os.path.join(HERE, "graphtest_test.go")
CACHE = os.path.join(ROOT, ".venv", "cache", "libdm-graphtest")
GOCODE = "/usr/share/gocode/src"
PACKAGE = "docker.io"


def _partial(path: str) -> str:
    """A name of this build's own for ``path`` until it is complete: test
    kernels side by side share the host's filesystem and may build at once."""
    return f"{path}.{secrets.token_hex(4)}.tmp"


def _source_version() -> str:
    """The docker.io source version of the installed package (a binNMU's
    ``+bN`` dropped), or of the candidate when it is not installed."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${source:Version}", PACKAGE], capture_output=True, text=True
    ).stdout.strip()
    return out


def binary_path() -> str:
    """Where the suite built from this wrapper and Docker's version is cached."""
    with open(WRAPPER, "rb") as fh:
        key = hashlib.sha256(fh.read() + _source_version().encode()).hexdigest()[:16]
    return os.path.join(CACHE, f"graphtest-{key}.test")


def _apt_config(where: str) -> list[str]:
    """apt options for a private configuration whose sources are the
    system's ``deb`` sources as ``deb-src``."""
    parts = os.path.join(where, "sources.list.d")
    lists = os.path.join(where, "lists")
    os.makedirs(os.path.join(lists, "partial"), exist_ok=True)
    os.makedirs(parts, exist_ok=True)
    one_line: list[str] = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    if line.startswith("deb "):
                        one_line.append("deb-src " + line[4:])
    with open(os.path.join(where, "sources.list"), "w") as fh:
        fh.writelines(one_line)
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as fh:
            text = fh.read()
        text = re.sub(r"(?m)^Types:\s*deb\s*$", "Types: deb-src", text)
        with open(os.path.join(parts, os.path.basename(path)), "w") as fh:
            fh.write(text)
    return [
        "-o",
        f"Dir::Etc::SourceList={os.path.join(where, 'sources.list')}",
        "-o",
        f"Dir::Etc::SourceParts={parts}",
        "-o",
        f"Dir::State::Lists={lists}",
    ]


def _run(argv: list[str], **kwargs: object) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")


def engine_source() -> str:
    """Docker's engine tree from the docker.io source package (fetched
    once, Debian's patches applied), cached by its version."""
    version = _source_version()
    if not version:
        raise RuntimeError(
            "docker.io is not installed (bash .ci/setup.sh installs it); graphtest is built "
            "from the source of the installed version"
        )
    upstream = version.split(":")[-1].rsplit("-", 1)[0]
    src = os.path.join(CACHE, "source", version)
    engine = os.path.join(src, f"{PACKAGE}-{upstream}", "engine")
    if os.path.isdir(os.path.join(engine, "daemon", "graphdriver", "graphtest")):
        return engine
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    apt = _apt_config(os.path.join(CACHE, "apt"))
    _run(["apt-get", "-q", *apt, "update"], timeout=600)
    # Unpacked with Debian's patches (dpkg-source -x): they make the engine
    # build against Debian's runc and containerd.
    _run(["apt-get", "-q", *apt, "source", f"{PACKAGE}={version}"], cwd=src, timeout=600)
    if not os.path.isdir(engine):
        raise RuntimeError(f"apt-get source {PACKAGE}={version} gave no {engine}")
    return engine


def build() -> str:
    """The graphtest binary, built when missing or stale.

    Raises:
        RuntimeError: Go, Docker's source or a dependency is missing, or
            the build failed.
    """
    binary = binary_path()
    if os.path.exists(binary):
        return binary
    go = shutil.which("go")
    if not go or not os.path.isdir(os.path.join(GOCODE, "github.com", "vbatts", "tar-split")):
        raise RuntimeError(
            "graphtest needs golang-go, golang-github-docker-docker-dev and "
            "golang-github-vbatts-tar-split-dev (bash .ci/setup.sh installs them)"
        )
    engine = engine_source()
    gopath = os.path.join(CACHE, "build")
    links = {
        os.path.join(gopath, "src", "github.com", "docker", "docker"): engine,
        # Debian ships gotest.tools v3 at the module's root; GOPATH mode
        # looks for it under its major version.
        os.path.join(gopath, "src", "gotest.tools", "v3"): os.path.join(GOCODE, "gotest.tools"),
    }
    for link, target in links.items():
        os.makedirs(os.path.dirname(link), exist_ok=True)
        # Made aside and renamed over: another kernel may build at once.
        made = _partial(link)
        os.symlink(target, made)
        os.replace(made, link)
    pkg = os.path.join(gopath, "src", "libdmgraphtest")
    os.makedirs(pkg, exist_ok=True)
    shutil.copy(WRAPPER, pkg)
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPATH=f"{gopath}:/usr/share/gocode",
        # Docker's devicemapper driver, the second column, links libdevmapper.
        CGO_ENABLED="1",
        GOCACHE=os.path.join(gopath, "gocache"),
        GOFLAGS="",
    )
    partial = _partial(binary)
    _run([go, "test", "-c", "-o", partial, "."], cwd=pkg, env=env, timeout=1800)
    os.rename(partial, binary)
    return binary


if __name__ == "__main__":
    try:
        print(build())
    except RuntimeError as exc:
        sys.exit(str(exc))
