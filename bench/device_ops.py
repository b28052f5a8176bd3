"""Benchmark libdm's device operations against C and against dmsetup.

Runs where device-mapper exists, as root -- in practice inside a test
kernel: ``python bench/run.py`` builds the C program and runs this there.
Two workloads:

* ``pairs``:  create a 100-sector ``zero`` device, then remove it;
* ``cycles``: suspend, resume and status of one existing device;

each through (a) libdm, (b) ``dm_ops``, a C program making the very same
libdevmapper calls (``bench/dm_ops.c``, one process serving the whole
run), and (c) one ``dmsetup`` process per operation.  ``--attribute``
adds two paths that split libdm's overhead (see ``attribution_paths``).

Every path is warmed up first.  Then each of ``--rounds`` rounds runs
``--count`` operations per path in blocks of ``--block``, the paths taking
turns block by block in a rotating order, so that drift in the kernel's
(or the host's) speed hits all paths alike.  A path's figure is its median
block; a ratio is the median of the ratios of blocks run side by side,
which shrugs off the bursts of delay that other processes on the host
cause; the ratios of whole-round totals are printed next to it.  Prints a
table and writes every block's time as JSON to ``bench/results/``.

Targets (from the issue): libdm at most 1.10x the C program's time, and
dmsetup at least 12x libdm's time.  Nothing here asserts them: the table
says whether they were met.
"""

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import time

import libdm
from libdm import Target

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.path.join(HERE, "build")
RESULTS_DIR = os.path.join(HERE, "results")
C_SOURCE = os.path.join(HERE, "dm_ops.c")

TABLE = [Target(0, 100, "zero")]
DMSETUP_TABLE = "0 100 zero"
MAX_LIBDM_OVER_C = 1.10
MIN_DMSETUP_OVER_LIBDM = 12.0


def build_c_program(build_dir=BUILD_DIR, cc=None):
    """Compile ``dm_ops.c`` into ``build_dir`` unless the binary is newer
    than the source; return the binary's path.

    Raises:
        subprocess.CalledProcessError: the compiler failed.
    """
    binary = os.path.join(build_dir, "dm_ops")
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(C_SOURCE):
        return binary
    os.makedirs(build_dir, exist_ok=True)
    cc = cc or os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-Wall", "-o", binary, C_SOURCE, "-ldevmapper"], check=True)
    return binary


# -- the three paths --------------------------------------------------------
# Each path is a function fn(n) doing n operations of a workload and
# returning the elapsed seconds of its loop alone.

PAIRS_NAME = "bench-pairs-{}"
CYCLES_NAME = "bench-cycles"


def libdm_pairs(name, n):
    began = time.perf_counter()
    for _ in range(n):
        libdm.create(name, TABLE)
        libdm.remove(name)
    return time.perf_counter() - began


def libdm_cycles(name, n):
    began = time.perf_counter()
    for _ in range(n):
        libdm.suspend(name)
        libdm.resume(name)
        libdm.status(name)
    return time.perf_counter() - began


def lock_held(fn):
    """``fn`` run with libdm's library lock already held by this thread, so
    each operation's own acquisitions are re-entries, which read no clock.
    Isolates what the lock costs (CPython 3.11 reads CLOCK_MONOTONIC on
    every first acquisition of a lock, a syscall where there is no vDSO)."""
    from libdm.dm.task import LOCK  # internal: for attribution only

    def run(name, n):
        with LOCK:
            return fn(name, n)

    return run


class CProgram:
    """One ``dm_ops serve`` process for the whole run, timing itself."""

    def __init__(self, binary):
        self.proc = subprocess.Popen(
            [binary, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, workload, name, n):
        self.proc.stdin.write(f"{workload} {name} {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"dm_ops exited with status {self.proc.wait()}")
        return json.loads(line)["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def dmsetup_pairs(dmsetup, name, n):
    began = time.perf_counter()
    for _ in range(n):
        subprocess.run([dmsetup, "create", name, "--table", DMSETUP_TABLE], check=True)
        subprocess.run([dmsetup, "remove", name], check=True)
    return time.perf_counter() - began


def dmsetup_cycles(dmsetup, name, n):
    began = time.perf_counter()
    for _ in range(n):
        subprocess.run([dmsetup, "suspend", name], check=True)
        subprocess.run([dmsetup, "resume", name], check=True)
        subprocess.run([dmsetup, "status", name], check=True, stdout=subprocess.PIPE)
    return time.perf_counter() - began


def paths(c, dmsetup):
    """{workload: {path: fn(n) -> seconds}}; ``cycles`` expects the device
    ``CYCLES_NAME`` to exist."""
    return {
        "pairs": {
            "libdm": lambda n: libdm_pairs(PAIRS_NAME.format("libdm"), n),
            "c": lambda n: c.run("pairs", PAIRS_NAME.format("c"), n),
            "dmsetup": lambda n: dmsetup_pairs(dmsetup, PAIRS_NAME.format("dmsetup"), n),
        },
        "cycles": {
            "libdm": lambda n: libdm_cycles(CYCLES_NAME, n),
            "c": lambda n: c.run("cycles", CYCLES_NAME, n),
            "dmsetup": lambda n: dmsetup_cycles(dmsetup, CYCLES_NAME, n),
        },
    }


def cffi_raw():
    """(pairs, cycles): dm_ops.c's calls made from Python through libdm's
    compiled binding but none of libdm's code -- the floor for any Python
    binding making these calls."""
    from libdm.dm._lib import ffi, lib  # internal: for attribution only

    def task(kind, name):
        dmt = lib.dm_task_create(kind)
        lib.dm_task_set_name(dmt, name)
        return dmt

    def run(dmt, udev=False):
        if udev:
            cookie = ffi.new("uint32_t *", 0)
            lib.dm_task_set_cookie(
                dmt,
                cookie,
                lib.DM_UDEV_DISABLE_LIBRARY_FALLBACK if lib.dm_udev_get_sync_support() else 0,
            )
        ok = lib.dm_task_run(dmt)
        if udev:
            lib.dm_udev_wait(cookie[0])
        if not ok:
            raise OSError(lib.dm_task_get_errno(dmt), "dm_task_run failed")

    def resume(name):
        dmt = task(lib.DM_DEVICE_RESUME, name)
        run(dmt, udev=True)
        info = ffi.new("struct dm_info *")
        if lib.dm_task_get_info(dmt, info) and info.exists:
            lib.dm_task_get_name(dmt)
            lib.dm_task_get_uuid(dmt)
        lib.dm_task_destroy(dmt)

    def pairs(name, n):
        name = name.encode()
        began = time.perf_counter()
        for _ in range(n):
            for kind in (lib.DM_DEVICE_CREATE, lib.DM_DEVICE_RELOAD):
                dmt = task(kind, name)
                if kind == lib.DM_DEVICE_RELOAD:
                    lib.dm_task_add_target(dmt, 0, 100, b"zero", b"")
                run(dmt)
                lib.dm_task_destroy(dmt)
            resume(name)
            dmt = task(lib.DM_DEVICE_REMOVE, name)
            run(dmt, udev=True)
            lib.dm_task_destroy(dmt)
        return time.perf_counter() - began

    def cycles(name, n):
        name = name.encode()
        vals = [ffi.new(t) for t in ("uint64_t *", "uint64_t *", "char **", "char **")]
        began = time.perf_counter()
        for _ in range(n):
            dmt = task(lib.DM_DEVICE_SUSPEND, name)
            run(dmt)
            lib.dm_task_destroy(dmt)
            resume(name)
            dmt = task(lib.DM_DEVICE_STATUS, name)
            run(dmt)
            nxt = ffi.NULL
            while True:
                nxt = lib.dm_get_next_target(dmt, nxt, *vals)
                if nxt == ffi.NULL:
                    break
            lib.dm_task_destroy(dmt)
        return time.perf_counter() - began

    return pairs, cycles


def attribution_paths():
    """{workload: {path: fn(n)}} for ``--attribute``.

    ``libdm-lock-held`` is libdm with its library lock held around the
    block, which leaves everything but the lock's cost; ``cffi-raw`` makes
    dm_ops.c's calls from Python with none of libdm's code.  So libdm vs
    libdm-lock-held is the lock, libdm-lock-held vs cffi-raw is the rest of
    libdm's Python, and cffi-raw vs c is the price of Python and cffi.
    """
    raw_pairs, raw_cycles = cffi_raw()
    return {
        "pairs": {
            "libdm-lock-held": lambda n: lock_held(libdm_pairs)(PAIRS_NAME.format("held"), n),
            "cffi-raw": lambda n: raw_pairs(PAIRS_NAME.format("raw"), n),
        },
        "cycles": {
            "libdm-lock-held": lambda n: lock_held(libdm_cycles)(CYCLES_NAME, n),
            "cffi-raw": lambda n: raw_cycles(CYCLES_NAME, n),
        },
    }


# -- measuring ----------------------------------------------------------------


def measure(fns, n, rounds, block, warmup, log=print):
    """Time ``rounds`` rounds of ``n`` operations per path, interleaved.

    Each round is cut into blocks of ``block`` operations, and the paths
    take turns block by block, in an order rotated at every block, so that
    the blocks of one turn ran within a few hundred milliseconds of each
    other and can be compared pairwise.  Every path is warmed up first
    with ``warmup`` operations (dmsetup with a fifth).

    Returns {path: [[seconds of each block] for each round]}.
    """
    for path, fn in fns.items():
        fn(warmup if path != "dmsetup" else max(1, warmup // 5))
    names = list(fns)
    times = {path: [] for path in names}
    for r in range(rounds):
        for path in names:
            times[path].append([])
        for i, start in enumerate(range(0, n, block)):
            turn = (r + i) % len(names)
            for path in names[turn:] + names[:turn]:
                times[path][r].append(fns[path](min(block, n - start)))
        log(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{path} {sum(times[path][r]):.3f} s" for path in names)
        )
    return times


# numerator, denominator, target test (None: attribution only), target text
RATIOS = (
    ("libdm", "c", lambda x: x <= MAX_LIBDM_OVER_C, f"<= {MAX_LIBDM_OVER_C:g}"),
    ("dmsetup", "libdm", lambda x: x >= MIN_DMSETUP_OVER_LIBDM, f">= {MIN_DMSETUP_OVER_LIBDM:g}"),
    ("libdm-lock-held", "c", None, ""),
    ("cffi-raw", "c", None, ""),
    ("libdm", "libdm-lock-held", None, ""),
)


def summarize(times, n, block):
    """Per workload and path: the median block's ms per op, ops/s and the
    round totals; per ratio: the median of the blocks' paired ratios (the
    headline) and the ratio of each round's totals."""
    summary = {}
    for workload, by_path in times.items():
        sizes = [min(block, n - start) for start in range(0, n, block)]
        out = {"n": n, "block": block, "paths": {}, "ratios": {}}
        for path, rounds in by_path.items():
            per_op = statistics.median(
                t / k for r in rounds for t, k in zip(r, sizes, strict=True)
            )
            out["paths"][path] = {
                "ms_per_op": per_op * 1e3,
                "ops_per_s": 1 / per_op,
                "round_totals_s": [sum(r) for r in rounds],
                "blocks_s": rounds,
            }
        for a, b, _, _ in RATIOS:
            if a in by_path and b in by_path:
                pairs = [
                    x / y
                    for ra, rb in zip(by_path[a], by_path[b], strict=True)
                    for x, y in zip(ra, rb, strict=True)
                ]
                out["ratios"][f"{a}/{b}"] = {
                    "median_of_blocks": statistics.median(pairs),
                    "rounds": [
                        sum(ra) / sum(rb) for ra, rb in zip(by_path[a], by_path[b], strict=True)
                    ],
                }
        summary[workload] = out
    return summary


def table(summary):
    """The summary as a Markdown table, then the ratios against the targets."""
    unit = {"pairs": "create+remove pair", "cycles": "suspend+resume+status cycle"}
    lines = [
        "| workload | path | ms per op | ops/s | round totals (s) |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for workload, s in summary.items():
        for path, row in s["paths"].items():
            totals = ", ".join(f"{t:.3f}" for t in row["round_totals_s"])
            lines.append(
                f"| {workload} (n={s['n']}) | {path} | {row['ms_per_op']:.3f} "
                f"| {row['ops_per_s']:.1f} | {totals} |"
            )
    lines.append("")
    for workload, s in summary.items():
        lines.append(
            f"- {workload} (op = {unit[workload]}; ratios are medians of "
            f"paired blocks of {s['block']}):"
        )
        for a, b, ok, target in RATIOS:
            r = s["ratios"].get(f"{a}/{b}")
            if r:
                x = r["median_of_blocks"]
                rounds = ", ".join(f"{y:.2f}" for y in r["rounds"])
                verdict = f"{'meets' if ok(x) else 'MISSES'} {target}" if ok else "attribution"
                lines.append(f"  - {a}/{b} = {x:.3f} ({verdict}); ratio of round totals: {rounds}")
    return "\n".join(lines)


def profile(n, top=25):
    """cProfile n operations of each libdm workload; print the hottest calls."""
    libdm.create(CYCLES_NAME, TABLE)
    try:
        for workload, fn in (
            ("pairs", lambda: libdm_pairs("bench-profile", n)),
            ("cycles", lambda: libdm_cycles(CYCLES_NAME, n)),
        ):
            prof = cProfile.Profile()
            prof.runcall(fn)
            print(f"\n## cProfile: libdm {workload}, n={n}")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top)
    finally:
        libdm.remove(CYCLES_NAME)


def machine():
    """What the figures were measured on."""
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libdevmapper": libdm.library_version(),
        "driver": ".".join(map(str, libdm.driver_version())),
        "dmsetup": subprocess.run(
            ["dmsetup", "--version"], stdout=subprocess.PIPE, text=True
        ).stdout.splitlines(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "-n",
        "--count",
        type=int,
        default=300,
        help="pairs and cycles per path per round (default 300)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument(
        "--block", type=int, default=10, help="operations per interleaved block (default 10)"
    )
    ap.add_argument(
        "--warmup", type=int, default=30, help="warm-up ops per path (dmsetup does a fifth)"
    )
    ap.add_argument("--dm-ops", help="the built C program (default: build it)")
    ap.add_argument("--results", default=RESULTS_DIR, help="JSON output directory")
    ap.add_argument("--host", default="", help="a note on the host, kept in the JSON")
    ap.add_argument(
        "--skip-dmsetup", action="store_true", help="compare libdm with C only (quicker)"
    )
    ap.add_argument(
        "--attribute",
        action="store_true",
        help="add paths 'libdm-lock-held' (libdm with its library lock "
        "held around each block: isolates the lock's cost) and "
        "'cffi-raw' (the C program's calls from Python, no libdm code)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile the libdm paths and print the top calls",
    )
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        sys.exit("device_ops.py: needs root inside a kernel with device-mapper")
    c_binary = args.dm_ops or build_c_program()
    dmsetup_binary = shutil.which("dmsetup")
    if dmsetup_binary is None:
        sys.exit("device_ops.py: dmsetup is not installed")

    info = machine()
    info["host"] = args.host
    print(
        f"# device_ops: {info['kernel']}, {info['cpus']} cpus, libdevmapper "
        f"{info['libdevmapper']}, driver {info['driver']}, python {info['python']}",
        flush=True,
    )

    def log(s):
        return print(s, flush=True)

    c = CProgram(c_binary)
    try:
        fns = paths(c, dmsetup_binary)
        if args.attribute:
            for workload, extra in attribution_paths().items():
                fns[workload].update(extra)
        if args.skip_dmsetup:
            for by_path in fns.values():
                del by_path["dmsetup"]
        times = {}
        log(f"pairs: {args.count} per path per round, blocks of {args.block}")
        times["pairs"] = measure(
            fns["pairs"], args.count, args.rounds, args.block, args.warmup, log
        )
        log(f"cycles: {args.count} per path per round, blocks of {args.block}")
        libdm.create(CYCLES_NAME, TABLE)
        try:
            times["cycles"] = measure(
                fns["cycles"], args.count, args.rounds, args.block, args.warmup, log
            )
        finally:
            libdm.remove(CYCLES_NAME)
    finally:
        c.close()
    summary = summarize(times, args.count, args.block)
    print()
    print(table(summary))

    os.makedirs(args.results, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.results, f"device_ops-{stamp}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "machine": info,
                "rounds": args.rounds,
                "block": args.block,
                "warmup": args.warmup,
                "targets": {
                    "libdm_over_c_max": MAX_LIBDM_OVER_C,
                    "dmsetup_over_libdm_min": MIN_DMSETUP_OVER_LIBDM,
                },
                "results": summary,
            },
            fh,
            indent=2,
        )
    print(f"\nwrote {path}")
    if args.profile:
        profile(args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
