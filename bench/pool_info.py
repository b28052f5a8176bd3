"""``pool.info()`` of a loop pool: the time of one call and its system
calls, for one or more libdm trees side by side in one kernel boot.

Runs as root where device-mapper exists, for instance in one test kernel::

    python -m libdm.testing run python bench/pool_info.py \\
        --tree before=/path/to/an/older/tree --tree after=.

A tree is a directory holding a ``libdm`` package with its compiled
binding (an export of another commit, with ``_libdevmapper*.so`` copied
in).  The first tree makes a loop pool, and ``--others`` more loop devices
are attached to files of their own, as on a host with other loops (a
search of every loop device costs more there).  Then, for ``--rounds``
rounds in a rotating order, each tree in a fresh process opens the pool,
warms up, and times ``--calls`` calls of ``pool.info()``; a tree's figure
is the median of its rounds' medians.  Last, one process per tree runs
under ``strace -f`` and the system calls of one call (between two marker
``stat`` calls) are counted.  Short by default: the host may be shared.
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BEGIN = "/bench-pool-info-begin"
END = "/bench-pool-info-end"

CHILD = r"""
import json, os, statistics, sys, time
tree, directory, warm, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, tree)
import libdm
assert os.path.dirname(os.path.dirname(os.path.abspath(libdm.__file__))) == tree
pool = libdm.Pool.open(directory)
for _ in range(warm):
    pool.info()
times = []
for _ in range(calls):
    t = time.perf_counter()
    info = pool.info()
    times.append(time.perf_counter() - t)
for mark in (BEGIN, None, END):
    if mark is None:
        pool.info()
        continue
    try:
        os.stat(mark)
    except OSError:
        pass
pool.close()
json.dump(
    {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
     "fields": info.as_dict()},
    sys.stdout,
)
""".replace("BEGIN", repr(BEGIN)).replace("END", repr(END))


def child(tree, directory, warm, calls, strace_out=None):
    cmd = [sys.executable, "-c", CHILD, tree, directory, str(warm), str(calls)]
    if strace_out is not None:
        cmd = ["strace", "-f", "-qq", "-o", strace_out, *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd="/")
    return json.loads(out.stdout)


def count_syscalls(trace):
    """(total, {name: count}) of the system calls between the markers."""
    names = {}
    inside = False
    with open(trace) as fh:
        for line in fh:
            if BEGIN in line:
                inside = True
                continue
            if END in line:
                break
            if inside:
                text = line.split(None, 1)[1] if line[:1].isdigit() else line
                name = text.split("(", 1)[0].strip()
                if name and not name.startswith(("+++", "---", "<...")):
                    names[name] = names.get(name, 0) + 1
    return sum(names.values()), dict(sorted(names.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--others", type=int, default=20, help="other loop devices attached")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    trees = [t.split("=", 1) for t in args.tree] or [["this", ROOT]]
    trees = [(name, os.path.abspath(path)) for name, path in trees]
    sys.path.insert(0, trees[0][1])
    import libdm
    from libdm.dm import loop

    work = tempfile.mkdtemp(prefix="bench-pool-info-")
    others = []
    pool = None
    try:
        for i in range(args.others):
            path = os.path.join(work, f"other{i}")
            with open(path, "wb") as fh:
                fh.truncate(1 << 20)
            others.append(loop.attach(path))
        directory = os.path.join(work, "pool")
        pool = libdm.Pool.create_loop("bench-info", directory, data_size="1G")
        pool.close()
        results = {name: [] for name, _ in trees}
        fields = {}
        for r in range(args.rounds):
            order = trees[r % len(trees) :] + trees[: r % len(trees)]
            for name, tree in order:
                got = child(tree, directory, args.warm, args.calls)
                results[name].append(got["median_ms"])
                fields[name] = got["fields"]
                print(f"round {r + 1} {name}: {got['median_ms']:.2f} ms median", flush=True)
        syscalls = {}
        if shutil.which("strace"):
            for name, tree in trees:
                trace = os.path.join(work, f"strace-{name}")
                child(tree, directory, 1, 1, strace_out=trace)
                syscalls[name] = count_syscalls(trace)
        out = {"others": args.others, "calls": args.calls, "trees": {}}
        for name, _ in trees:
            total, by_name = syscalls.get(name, (None, {}))
            out["trees"][name] = {
                "median_ms": statistics.median(results[name]),
                "rounds_ms": results[name],
                "syscalls": total,
                "syscalls_by_name": by_name,
            }
            print(
                f"{name}: pool.info() {statistics.median(results[name]):.2f} ms "
                f"(rounds {', '.join(f'{v:.2f}' for v in results[name])}), "
                f"{total} system calls: {by_name}"
            )
        # The report itself must not change (the loop numbers may differ
        # between trees only if the pool were attached anew: it is not).
        first = fields[trees[0][0]]
        for name, _ in trees[1:]:
            if fields[name] != first:
                print(f"warning: {name}'s report differs: {fields[name]} != {first}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
    finally:
        if pool is not None:
            with contextlib.suppress(Exception):
                libdm.Pool.open(directory).destroy(remove_files=True)
        for dev in others:
            with contextlib.suppress(OSError):
                loop.detach(dev)
            dev.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
