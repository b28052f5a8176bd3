"""Thin lifecycle: libdm's Pool against a C program making the same calls.

Runs where device-mapper exists, as root (``python bench/run.py --all`` or
``--suites thin`` runs it in one test kernel).  Three operations, each
timed on its own:

* ``create``:   create a thin device and activate it;
* ``snapshot``: snapshot an active origin (suspended around the message)
  and activate the snapshot;
* ``delete``:   deactivate a device and delete it from the pool;

through three paths, each on its own pool of the same make (sparse files
on loop devices, 100 GiB data, 256 MiB metadata, 64 KiB blocks):

* ``libdm``:     ``Pool.create_thin``, ``Pool.snapshot_device``,
  ``Pool.delete_device`` -- with the state store, its journal, the lock
  file and the guards;
* ``c``:         ``bench/thin_ops.c``: the libdevmapper calls and pool
  messages those operations need, no state kept (see its header);
* ``libdm-ops``: the C program's calls made from Python through libdm's
  device functions (``libdm.message``, ``libdm.status``, ``libdm.create``,
  ``libdm.remove``, ``libdm.suspend``, ``libdm.resume``) with no ``Pool``:
  splits libdm's extra time into the Pool layer (libdm / libdm-ops) and
  Python with the binding (libdm-ops / c).

A block of ``k`` is k creates, k snapshots of them, then 2k deletes
(snapshots first), so every path ends a block with the pool it began it
with.  Blocks are interleaved as in ``device_ops.py``.

Target (from the issue): libdm at most 1.25x the C program's time for
each operation.  Nothing here asserts it; the table says whether it is met.
"""

import argparse
import contextlib
import os
import sys

import libdm
from libdm import Target

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402
from benchlib import DATA_SIZE, METADATA_SIZE, THIN_SIZE  # noqa: E402

MAX_LIBDM_OVER_C = 1.25
OPS = ("create", "snapshot", "delete")
RATIOS = (("libdm", "c"), ("libdm", "libdm-ops"), ("libdm-ops", "c"))
TARGETS = {"libdm/c": MAX_LIBDM_OVER_C}


class LibdmPath:
    """Blocks of the lifecycle through a libdm ``Pool``."""

    def __init__(self, pool, prefix=""):
        self.pool = pool
        self.prefix = prefix
        self.counter = 0

    def names(self, k):
        first = self.counter
        self.counter += k
        return [f"{self.prefix}{i}" for i in range(first, first + k)]

    def block(self, k):
        names = self.names(k)
        pool = self.pool
        t, out = benchlib.timed, {}
        out["create"] = (t(lambda: [pool.create_thin("t" + n, THIN_SIZE) for n in names])[0], k)
        out["snapshot"] = (
            t(lambda: [pool.snapshot_device("t" + n, "s" + n) for n in names])[0],
            k,
        )
        out["delete"] = (
            t(lambda: [pool.delete_device(p + n) for p in "st" for n in names])[0],
            2 * k,
        )
        return out


class CPath:
    """Blocks of the lifecycle through ``thin_ops``; thin ids ``base`` ..
    ``base + 2k - 1`` (free again at the end of every block)."""

    def __init__(self, thin_ops, base=0):
        self.c = thin_ops
        self.base = base

    def block(self, k):
        sectors, b = THIN_SIZE // 512, self.base
        return {
            "create": (self.c.run("create", "t", b, k, sectors), k),
            "snapshot": (self.c.run("snap", "s", b + k, k, "t", b, sectors), k),
            "delete": (
                self.c.run("delete", "s", b + k, k) + self.c.run("delete", "t", b, k),
                2 * k,
            ),
        }


class OpsPath:
    """The C program's calls, made through libdm's device functions."""

    def __init__(self, raw, base=0):
        self.pool = raw.name
        self.devno = raw.devno
        self.base = base
        self.txid = int(libdm.status(self.pool)[0].params.split()[0])

    def _set_transaction(self):
        libdm.message(self.pool, f"set_transaction_id {self.txid} {self.txid + 1}")
        self.txid += 1
        libdm.status(self.pool)

    def _name(self, prefix, thin_id):
        return f"{self.pool}-{prefix}{thin_id}"

    def _activate(self, prefix, thin_id):
        libdm.create(
            self._name(prefix, thin_id),
            [Target(0, THIN_SIZE // 512, "thin", f"{self.devno} {thin_id}")],
            uuid=f"BENCH-THIN-{self.pool}-{thin_id}",
        )

    def create(self, thin_id):
        libdm.message(self.pool, f"create_thin {thin_id}")
        self._set_transaction()
        self._activate("t", thin_id)

    def snapshot(self, thin_id, origin_id):
        origin = self._name("t", origin_id)
        libdm.suspend(origin)
        libdm.message(self.pool, f"create_snap {thin_id} {origin_id}")
        libdm.resume(origin)
        self._set_transaction()
        self._activate("s", thin_id)

    def delete(self, prefix, thin_id):
        libdm.remove(self._name(prefix, thin_id), deferred=True)
        libdm.message(self.pool, f"delete {thin_id}")
        self._set_transaction()

    def block(self, k):
        b, t = self.base, benchlib.timed
        ids = range(b, b + k)
        return {
            "create": (t(lambda: [self.create(i) for i in ids])[0], k),
            "snapshot": (t(lambda: [self.snapshot(i + k, i) for i in ids])[0], k),
            "delete": (
                t(
                    lambda: (
                        [self.delete("s", i + k) for i in ids],
                        [self.delete("t", i) for i in ids],
                    )
                )[0],
                2 * k,
            ),
        }


def run(thin_ops_binary, directory, n=200, rounds=3, block=10, paths=None):
    """Set up the three pools under ``directory``, measure, tear down.

    Returns the summary (see :func:`benchlib.summarize`) plus the setup.
    """
    os.makedirs(directory, exist_ok=True)
    pool = raw_c = raw_ops = c = None
    try:
        pool = libdm.Pool.create_loop(
            "bench-lp",
            os.path.join(directory, "libdm"),
            data_size=DATA_SIZE,
            metadata_size=METADATA_SIZE,
        )
        # Like for like: the C program and libdm-ops delete without first
        # discarding the device's blocks, which libdm does by default on
        # loop pools (discard_on_delete).
        pool.configure(discard_on_delete=False)
        raw_c = benchlib.RawPool("bench-cp", os.path.join(directory, "c"))
        raw_ops = benchlib.RawPool("bench-op", os.path.join(directory, "ops"))
        c = benchlib.ThinOps(thin_ops_binary, raw_c.name)
        fns = {
            "libdm": LibdmPath(pool).block,
            "c": CPath(c).block,
            "libdm-ops": OpsPath(raw_ops).block,
        }
        if paths:
            fns = {p: fns[p] for p in paths}
        benchlib.log(
            f"thin lifecycle: {n} of each operation per path per round, "
            f"{rounds} rounds, blocks of {block}; pools in {directory}"
        )
        times = benchlib.interleave(fns, n, rounds, block)
    finally:
        if c is not None:
            c.close()
        for raw in (raw_c, raw_ops):
            if raw is not None:
                raw.destroy()
        if pool is not None:
            pool.destroy(remove_files=True)
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    summary = benchlib.summarize(times, RATIOS)
    summary.update(
        n=n,
        rounds=rounds,
        block=block,
        directory=directory,
        targets=TARGETS,
        libdm_path=os.path.dirname(libdm.__file__),
    )
    return summary


def table(summary):
    """The summary as Markdown: a row per path and operation, then the
    ratios per operation against the target."""
    lines = [
        "| operation | path | ms per op (median block) | ops/s | p10-p90 ms |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for op in OPS:
        for path, by_op in summary["paths"].items():
            row = by_op[op]
            lines.append(
                f"| {op} | {path} | {row['ms_per_op']:.2f} | {row['ops_per_s']:.0f} "
                f"| {row['p10_ms']:.2f}-{row['p90_ms']:.2f} |"
            )
    lines += [
        "",
        "| ratio | " + " | ".join(OPS) + " | target |",
        "| --- | " + " | ".join("---:" for _ in OPS) + " | --- |",
    ]
    for name, by_op in summary["ratios"].items():
        target = TARGETS.get(name)
        cells = []
        for op in OPS:
            x = by_op[op]["median_of_blocks"]
            mark = "" if target is None else (" ok" if x <= target else " MISSED")
            cells.append(f"{x:.3f}{mark}")
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + " | "
            + (f"<= {target:g}" if target else "attribution")
            + " |"
        )
    lines.append("")
    lines.append(
        f"(n={summary['n']} per operation per path per round, {summary['rounds']} "
        f"rounds, blocks of {summary['block']}; ratios are medians of paired "
        f"blocks; ratio of round totals in the JSON; libdm from "
        f"{summary['libdm_path']})"
    )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--thin-ops", help="the built C program (default: build it)")
    ap.add_argument(
        "--dir",
        default="/var/tmp/libdm-bench-thin",
        help="where the pools' files go (removed after)",
    )
    ap.add_argument("-n", "--count", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--paths", help="comma-separated subset of libdm,c,libdm-ops")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("thin_lifecycle.py: needs root inside a kernel with device-mapper")
    binary = args.thin_ops or benchlib.build_c("thin_ops")
    summary = run(
        binary,
        args.dir,
        args.count,
        args.rounds,
        args.block,
        args.paths.split(",") if args.paths else None,
    )
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
