"""A pool on a block device, split like the guide's direct-lvm mode.

    python examples/direct_mode.py /dev/xvdf        # a real, blank disk
    python -m libdm.testing run python examples/direct_mode.py

Given a block device, it is split into ``<pool>-tmeta`` (1%) and
``<pool>-tdata`` (95%) linear devices and a pool is built on them.  With
no argument, a 1 GiB sparse file on a loop device stands in for the disk.
The pool is destroyed at the end; the device's contents are not restored.
"""

import os
import sys
import tempfile

import libdm
from libdm.dm import loop


def demo(device, state_dir):
    name = f"libdm-direct-{os.getpid()}"
    pool = libdm.Pool.create_on_device(
        name, device, thinp_percent=95, thinp_metapercent=1, state_dir=state_dir
    )
    try:
        for piece in (f"{name}-tmeta", f"{name}-tdata"):
            print(f"{piece}: {libdm.table(piece)[0]}")
        print(f"{name}: {libdm.table(name)[0]}")
        vol = pool.create_thin("vol", "512M").format("xfs")
        with vol.mount() as root, open(os.path.join(root, "hello"), "w") as fh:
            fh.write("direct mode\n")
        print(
            f"\n{vol.name} at {vol.path}, {libdm.format_size(vol.size)}, "
            f"{int(vol.status().mapped) // 2} KiB mapped"
        )
        print(pool.info())
    finally:
        pool.destroy(remove_files=True)


def main(argv):
    if argv:
        demo(argv[0], tempfile.mkdtemp(prefix="libdm-direct-state-"))
        return 0
    with tempfile.TemporaryDirectory(prefix="libdm-direct-") as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as fh:
            fh.truncate(1 << 30)
        with loop.attach(disk) as dev:
            print(f"stand-in disk: {dev.path} over a sparse file\n")
            demo(dev.path, os.path.join(tmp, "state"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
