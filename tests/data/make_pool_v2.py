"""Write ``pool-v2.tar.gz``: a loop pool as libdm wrote it with the log in
front of SQLite (schema 2): its state directory (``state.db``, a
``state.db-log`` holding the changes of a process killed with the pool
open, the lock) and its ``data`` and ``metadata`` files, the kernel's
devices removed as a reboot removes them.

It was run once, as root where device-mapper exists, with the libdm of
that release, and its output is committed; ``tests/test_store_kernel.py``
opens a copy with the current code.  It refuses to run unless the Store
it imports still says schema 2.

    python -m libdm.testing run python tests/data/make_pool_v2.py

``expected.json`` inside the archive holds each device's thin id, size
and the sha256 of its whole contents.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "pool-v2.tar.gz")
NAME = "libdm-fixture-v2"
MiB = 1 << 20


def pattern(seed, size):
    return bytes((seed * 7 + i) % 251 for i in range(256)) * (size // 256)


def write(path, offset, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


LATE = """
import os, sys
import libdm
sys.path.insert(0, {here!r})
from make_pool_v2 import pattern
pool = libdm.Pool.open({directory!r})
late = pool.create_thin("late", "2M")
fd = os.open(late.path, os.O_WRONLY)
os.pwrite(fd, pattern(4, 512 * 1024), 0)
os.fsync(fd)
os.close(fd)
pool.snapshot_device("base", "late-snap")
pool.delete_device("other")
os._exit(0)  # killed: no close, the log unfolded
"""


def main():
    import libdm
    from libdm.thin.store import SCHEMA_VERSION

    if SCHEMA_VERSION != 2:
        sys.exit(f"this writes a schema 2 pool; the Store here is schema {SCHEMA_VERSION}")
    work = tempfile.mkdtemp(prefix="pool-v2-", dir="/var/tmp")
    directory = os.path.join(work, "pool")
    try:
        pool = libdm.Pool.create_loop(NAME, directory, data_size="8M", metadata_size="2M")
        base = pool.create_thin("base", "2M")
        write(base.path, 0, pattern(1, MiB))
        pool.snapshot_device("base", "snap")
        write(pool.device("snap").path, 256 * 1024, pattern(2, 256 * 1024))
        other = pool.create_thin("other", "2M")
        write(other.path, 0, pattern(3, 512 * 1024))
        pool.close()
        code = LATE.format(directory=directory, here=HERE)
        subprocess.run([sys.executable, "-c", code], check=True)
        with open(os.path.join(directory, "state.db-log"), "rb") as fh:
            assert len(fh.read()) > 64, "the log holds no change"
        # What each device holds, read through the kernel.
        expected = {}
        out = subprocess.run(
            ["dmsetup", "ls", "--target", "thin"], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines():
            dm = line.split()[0]
            if dm.startswith(NAME + "-"):
                device = dm[len(NAME) + 1 :]
                table = subprocess.run(
                    ["dmsetup", "table", dm], capture_output=True, text=True, check=True
                ).stdout.split()
                expected[device] = {
                    "thin_id": int(table[4]),
                    "sectors": int(table[1]),
                    "sha256": digest(f"/dev/mapper/{dm}")
                    if os.path.exists(f"/dev/mapper/{dm}")
                    else None,
                }
        # A reboot: the kernel's devices go, the files stay.
        for dm in [f"{NAME}-{d}" for d in expected] + [NAME]:
            subprocess.run(["dmsetup", "remove", "--retry", dm], check=True)
        loops = (
            subprocess.run(
                ["losetup", "-j", os.path.join(directory, "data")], capture_output=True, text=True
            ).stdout
            + subprocess.run(
                ["losetup", "-j", os.path.join(directory, "metadata")],
                capture_output=True,
                text=True,
            ).stdout
        )
        for line in loops.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=True)
        with open(os.path.join(directory, "expected.json"), "w") as fh:
            json.dump(expected, fh, indent=1, sort_keys=True)
            fh.write("\n")
        with tarfile.open(OUT, "w:gz") as tar:
            for name in sorted(os.listdir(directory)):
                tar.add(os.path.join(directory, name), arcname=f"pool/{name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
