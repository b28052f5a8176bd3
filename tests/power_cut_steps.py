"""Steps run inside test kernels by test_power_cut.py (not a test module).

usage: python power_cut_steps.py build|check|mutate DIR POOLNAME

Each step writes its findings as JSON to DIR/result.json and exits without
tearing anything down; the kernel then stops without syncing, like a
power cut.
"""

import hashlib
import json
import os
import random
import sys

import libdm

CHUNK = 64 * 1024


def write_random(path, seed, chunks=8):
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(chunks):
            offset = rnd.randrange(0, 64) * CHUNK
            os.pwrite(fd, rnd.randbytes(CHUNK), offset)
        os.fsync(fd)  # synced before the cut: must survive it
    finally:
        os.close(fd)


def digest(path, size):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(size))
    return h.hexdigest()


def snapshot_of(pool):
    return {
        d.name: {
            "thin_id": d.thin_id,
            "parent": d.parent.name if d.parent else None,
            "active": d.active,
            "sha256": digest(d.path, 4 << 20) if d.active else None,
        }
        for d in pool.devices()
    }


def main(step, directory, name):
    if step == "build":
        pool = libdm.Pool.create_loop(name, directory, data_size="128M")
        base = pool.create_thin("base", "8M")
        write_random(base.path, 1)
        layer = base.snapshot("layer1")
        write_random(layer.path, 2)
        top = layer.snapshot("layer2")
        write_random(top.path, 3)
        cold = pool.create_thin("cold", "4M")
        write_random(cold.path, 4)
        cold.deactivate()
    else:
        pool = libdm.Pool.open(directory)
    if step == "mutate":
        rnd = random.Random(len(pool.devices()))
        victim = pool.device("layer2")
        write_random(victim.path, rnd.randrange(1 << 30))
        extra = victim.snapshot(f"extra{len(pool.devices())}")
        write_random(extra.path, rnd.randrange(1 << 30))
        pool.device("cold").activate()
    result = {"devices": snapshot_of(pool), "transaction_id": pool.status().transaction_id}
    with open(os.path.join(directory, "result.json"), "w") as fh:
        json.dump(result, fh)
        fh.flush()
        os.fsync(fh.fileno())


if __name__ == "__main__":
    main(*sys.argv[1:4])
