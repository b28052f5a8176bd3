"""System calls and time per thin operation through ``Pool``, for the
state store's part of docs/performance.md.

Runs where device-mapper exists, as root (``python -m libdm.testing run
python bench/store_ops.py`` runs it in a test kernel).  For each of
create (and activate), snapshot of an active origin, and deactivate +
delete, it counts the system calls of 1 and of ``n + 1`` operations with
``strace -f -c`` in a child process (the difference divided by ``n``:
the cost of one operation, start-up excluded), and times ``n`` more
without strace.  Small counts only: the machine may be shared.

    python bench/store_ops.py [-n 20] [--dir /var/tmp]

With ``--tree DIR`` (twice or more: checkouts of libdm, each with its
binding built) it only times, in rounds that take the trees in turn, so
that a busy host slows each alike: per round and tree, ``n`` creates,
``n`` snapshots and ``2n`` deletes on a pool of that tree's own, in a
process started in that tree.  It prints each tree's median time per
operation over the rounds.
"""

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# The store's own calls (the rest are the pool's ioctls, its lock, the
# device node, Python's allocator).
STORE = ("fcntl", "pwrite64", "pread64", "fdatasync", "fsync", "stat", "newfstatat", "lseek")


def child(directory, op, count):
    import libdm

    pool = libdm.Pool.open(directory)
    try:
        pool.configure(discard_on_delete=False)
        start = time.perf_counter()
        for i in range(count):
            if op == "create":
                pool.create_thin(f"c{i}", "64M")
            elif op == "snapshot":
                pool.snapshot_device("origin", f"s{i}")
            else:
                pool.delete_device(f"d{i}")
        return (time.perf_counter() - start) / max(count, 1)
    finally:
        pool.close()


def prepare(base, name, count):
    import libdm

    directory = os.path.join(base, name)
    pool = libdm.Pool.create_loop(name, directory, data_size="4G", metadata_size="64M")
    try:
        pool.configure(discard_on_delete=False)
        pool.create_thin("origin", "64M")
        for i in range(count):
            pool.create_thin(f"d{i}", "64M")
    finally:
        pool.close()
    return directory


def teardown(directory):
    import libdm

    pool = libdm.Pool.open(directory)
    pool.destroy(remove_files=True)


def counted(base, op, count):
    directory = prepare(base, f"libdm-storeops-{op}-{count}", count)
    out = os.path.join(base, "strace.txt")
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import store_ops; "
        f"store_ops.child({directory!r}, {op!r}, {count})"
    )
    try:
        subprocess.run(["strace", "-f", "-c", "-o", out, sys.executable, "-c", code], check=True)
        calls = collections.Counter()
        with open(out) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
                    calls[fields[-1]] += int(fields[3])
        return calls
    finally:
        teardown(directory)


def timed(base, op, count):
    directory = prepare(base, f"libdm-storeops-t{op}", count)
    try:
        return child(directory, op, count)
    finally:
        teardown(directory)


def round_child(directory, tag, count):
    """One round in one tree: its times per operation, in ms (JSON)."""
    import libdm

    pool = libdm.Pool.open(directory)
    out = {}
    try:
        start = time.perf_counter()
        for i in range(count):
            pool.create_thin(f"{tag}c{i}", "64M")
        out["create"] = (time.perf_counter() - start) / count * 1000
        start = time.perf_counter()
        for i in range(count):
            pool.snapshot_device(f"{tag}c{i}", f"{tag}s{i}")
        out["snapshot"] = (time.perf_counter() - start) / count * 1000
        start = time.perf_counter()
        for i in range(count):
            pool.delete_device(f"{tag}s{i}")
            pool.delete_device(f"{tag}c{i}")
        out["delete"] = (time.perf_counter() - start) / (2 * count) * 1000
    finally:
        pool.close()
    print(json.dumps(out))


def in_tree(tree, code):
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{tree}: {proc.stderr}")
    return proc.stdout


def compare(base, trees, count, rounds):
    here = os.path.dirname(os.path.abspath(__file__))
    bench = f"import sys; sys.path.append({here!r}); import store_ops; "
    pools = {}
    for n, tree in enumerate(trees):
        directory = os.path.join(base, f"tree{n}")
        code = (
            "import libdm; p = libdm.Pool.create_loop("
            f"'libdm-storeops-tree{n}', {directory!r}, data_size='4G', metadata_size='64M'); "
            "p.configure(discard_on_delete=False); p.close()"
        )
        in_tree(tree, code)
        pools[tree] = directory
    times = {tree: collections.defaultdict(list) for tree in trees}
    try:
        for r in range(rounds):
            for tree in trees[r % len(trees) :] + trees[: r % len(trees)]:
                code = bench + f"store_ops.round_child({pools[tree]!r}, 'r{r}', {count})"
                for op, ms in json.loads(in_tree(tree, code)).items():
                    times[tree][op].append(ms)
    finally:
        for tree, directory in pools.items():
            code = f"import libdm; libdm.Pool.open({directory!r}).destroy(remove_files=True)"
            in_tree(tree, code)
    for tree in trees:
        line = ", ".join(
            f"{op} {statistics.median(v):.2f} ms ({min(v):.2f}-{max(v):.2f})"
            for op, v in times[tree].items()
        )
        print(f"{tree}: {line}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--count", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--tree", action="append", help="time these checkouts in turn")
    args = ap.parse_args(argv)
    base = tempfile.mkdtemp(prefix="libdm-store-ops-", dir=args.dir)
    if args.tree:
        try:
            compare(base, [os.path.abspath(t) for t in args.tree], args.count, args.rounds)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    try:
        head = ("operation", "all calls", "store", "fsync", "ms")
        print(f"{head[0]:10} {head[1]:>9} {head[2]:>6} {head[3]:>6} {head[4]:>7}  store calls")
        for op in ("create", "snapshot", "delete"):
            one, many = counted(base, op, 1), counted(base, op, args.count + 1)
            per = {k: (many[k] - one[k]) / args.count for k in many if many[k] > one[k]}
            store = {k: v for k, v in per.items() if k in STORE}
            syncs = per.get("fdatasync", 0) + per.get("fsync", 0)
            ms = timed(base, op, args.count) * 1000
            detail = ", ".join(f"{k} {v:g}" for k, v in sorted(store.items(), key=lambda x: -x[1]))
            print(
                f"{op:10} {sum(per.values()):9.1f} {sum(store.values()):6.1f} {syncs:6.1f} "
                f"{ms:7.2f}  {detail}"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
