#!/usr/bin/env bash
# Set up a fresh machine, as root: system packages, a virtualenv in .venv,
# and libdm built in place (its cffi module compiled against libdevmapper).
set -euo pipefail
cd "$(dirname "$0")/.."

# Build: libdevmapper-dev, linux-libc-dev (the kernel headers the binding
# takes its block and loop ioctls from), gcc, pkg-config.  The real-kernel harness:
# user-mode-linux (a kernel run as a process) and kmod (modprobe).
# Witnesses and tools the tests use: dmsetup, thin-provisioning-tools,
# e2fsprogs, xfsprogs, util-linux (losetup, unshare), udev (udev-sync tests
# start a udevd inside a test kernel; none is started on this machine), strace
# (the store's system-call count).
packages=(libdevmapper-dev linux-libc-dev gcc pkg-config user-mode-linux kmod dmsetup
          thin-provisioning-tools e2fsprogs xfsprogs util-linux udev strace)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,docs]"
.venv/bin/python -c "import libdm; print('setup: libdm', libdm.__version__, 'built against libdevmapper', libdm.library_version())"

# The containerd snapshotter (libdm.snapshotter): its Python extra, and the
# real containerd, runc, Go and containerd's source (for its snapshotter
# conformance suite) that tests/test_snapshotter*.py drive.
ctd=()
for p in containerd runc golang-go golang-github-containerd-containerd-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || ctd+=("$p")
done
if [ ${#ctd[@]} -gt 0 ]; then
  echo "setup: installing ${ctd[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${ctd[@]}" >/dev/null
fi
.venv/bin/python -m pip install -q -e ".[containerd,containerd-dev]"
.venv/bin/python tests/support/containerd/build_conformance.py >/dev/null  # containerd's conformance suite, cached

# The Docker graph-driver plugin (libdm.docker): Debian's dockerd (20.10,
# which loads graph-driver plugins) with busybox for offline images, and
# what Docker's graphtest builds from: Docker's engine source (fetched by
# build_graphtest.py as Debian's docker.io source package, through a private
# apt configuration; dpkg-dev unpacks it) and its Go dependencies.
dkr=()
for p in docker.io busybox-static dpkg-dev golang-github-docker-docker-dev \
         golang-github-vbatts-tar-split-dev golang-github-gotestyourself-gotest.tools-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || dkr+=("$p")
done
if [ ${#dkr[@]} -gt 0 ]; then
  echo "setup: installing ${dkr[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${dkr[@]}" >/dev/null
fi
.venv/bin/python tests/support/docker/build_graphtest.py >/dev/null  # Docker's graphtest, cached
