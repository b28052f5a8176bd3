"""Bring a pool back after a reboot.

Run the two steps in two kernels; each ``libdm.testing run`` boots a new
one and stops it without tearing anything down, like a power cut::

    python -m libdm.testing run python examples/reopen_after_reboot.py create DIR
    python -m libdm.testing run python examples/reopen_after_reboot.py open DIR

``create`` makes a loop pool in DIR with a device and a snapshot, writes
data and syncs it.  ``open`` calls ``Pool.open(DIR)``, which re-attaches
the files, reloads the pool from its stored configuration and re-activates
the devices, then checks the data and removes everything (DIR included).
"""

import hashlib
import json
import os
import shutil
import sys

import libdm


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(1 << 20)).hexdigest()


def create(directory):
    pool = libdm.Pool.create_loop(f"libdm-reboot-{os.getpid()}", directory, data_size="256M")
    vol = pool.create_thin("vol", "16M")
    with open(vol.path, "r+b") as fh:
        fh.write(os.urandom(1 << 20))
        fh.flush()
        os.fsync(fh.fileno())
    snap = vol.snapshot("snap")
    sums = {d.name: digest(d.path) for d in (vol, snap)}
    with open(os.path.join(directory, "expected.json"), "w") as fh:
        json.dump(sums, fh)
    print(f"pool {pool.name} in {directory}: {sorted(sums)} written and synced")
    return 0


def reopen(directory):
    pool = libdm.Pool.open(directory)
    with open(os.path.join(directory, "expected.json")) as fh:
        expected = json.load(fh)
    bad = []
    for name, want in expected.items():
        dev = pool.device(name)
        parent = dev.parent.name if dev.parent else "-"
        same = digest(dev.path) == want
        print(
            f"{name}: active at {dev.path}, parent {parent}, data "
            f"{'intact' if same else 'DIFFERENT'}"
        )
        if not same:
            bad.append(name)
    pool.destroy(remove_files=True)
    shutil.rmtree(directory, ignore_errors=True)
    return 1 if bad else 0


def main(argv):
    if len(argv) != 2 or argv[0] not in ("create", "open"):
        print(__doc__, file=sys.stderr)
        return 2
    return (create if argv[0] == "create" else reopen)(os.path.abspath(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
