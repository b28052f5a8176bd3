"""Every libdm benchmark in one process, in one kernel boot.

``python bench/run.py --all`` builds the C programs on the host and runs
this inside one test kernel; run here directly only where device-mapper
exists, as root.  The suites, in this order:

* ``startup``: ``import libdm`` and the first operation's latency
  (``startup.py``);
* ``device``:  binding overhead, libdm against ``bench/dm_ops.c``, and a
  process per operation, ``dmsetup`` against libdm (``device_ops.py``'s
  paths and method);
* ``thin``:    the thin lifecycle, libdm's Pool against ``bench/thin_ops.c``
  (``thin_lifecycle.py``);
* ``scale``:   a pool of 10,000 thin devices, 1,000 active, against one of
  100; Pool.open, listing, info, peak RSS (``scale.py``).

Each suite's table is printed as it finishes, then all of them together;
everything measured goes to ``bench/results/suite-<UTC time>.json``.
"""

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402
from benchlib import log  # noqa: E402

SUITES = ("startup", "device", "thin", "scale")

TITLES = {
    "startup": "Import and start-up",
    "device": "Device operations: libdm vs C, dmsetup vs libdm",
    "thin": "Thin lifecycle: libdm vs C",
    "scale": "Scale",
}

# Sizes of a full run and of --quick (a smoke run of a few minutes).
FULL = {
    "startup_repeats": 10,
    "device_count": 300,
    "device_rounds": 3,
    "dmsetup_count": 30,
    "dmsetup_rounds": 2,
    "thin_count": 200,
    "thin_rounds": 3,
    "large": 10_000,
    "small": 100,
    "scale_count": 100,
    "scale_rounds": 3,
    "open_repeats": 3,
}
QUICK = {
    "startup_repeats": 3,
    "device_count": 60,
    "device_rounds": 2,
    "dmsetup_count": 10,
    "dmsetup_rounds": 1,
    "thin_count": 30,
    "thin_rounds": 2,
    "large": 1000,
    "small": 100,
    "scale_count": 20,
    "scale_rounds": 2,
    "open_repeats": 1,
}


def device_suite(dm_ops, count, rounds, dmsetup_count, dmsetup_rounds, block=10, warmup=30):
    """device_ops.py's pairs and cycles: libdm against C with ``count`` per
    round, then libdm against dmsetup with ``dmsetup_count`` per round (the
    dmsetup ratio is some 40x; a few hundred processes tell it well)."""
    import device_ops as D

    import libdm

    dmsetup = shutil.which("dmsetup")
    c = D.CProgram(dm_ops)
    times_c, times_d = {}, {}
    try:
        fns = D.paths(c, dmsetup)
        for workload in ("pairs", "cycles"):
            if workload == "cycles":
                libdm.create(D.CYCLES_NAME, D.TABLE)
            try:
                log(f"device {workload}: libdm vs C, {count} per path per round, {rounds} rounds")
                times_c[workload] = D.measure(
                    {p: fns[workload][p] for p in ("libdm", "c")},
                    count,
                    rounds,
                    block,
                    warmup,
                    log,
                )
                if dmsetup:
                    log(
                        f"device {workload}: libdm vs dmsetup, {dmsetup_count} per path "
                        f"per round, {dmsetup_rounds} rounds"
                    )
                    times_d[workload] = D.measure(
                        {p: fns[workload][p] for p in ("libdm", "dmsetup")},
                        dmsetup_count,
                        dmsetup_rounds,
                        block,
                        warmup // 3,
                        log,
                    )
            finally:
                if workload == "cycles":
                    libdm.remove(D.CYCLES_NAME)
    finally:
        c.close()
    out = {"libdm_vs_c": D.summarize(times_c, count, block)}
    if times_d:
        out["libdm_vs_dmsetup"] = D.summarize(times_d, dmsetup_count, block)
    return out


def device_table(out):
    import device_ops as D

    parts = [D.table(out["libdm_vs_c"])]
    if "libdm_vs_dmsetup" in out:
        parts.append(D.table(out["libdm_vs_dmsetup"]))
    return "\n\n".join(parts)


def git_state():
    try:
        head = subprocess.run(
            ["git", "-C", os.path.dirname(HERE), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
        return head.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--suites",
        default=",".join(SUITES),
        help=f"comma-separated, from {','.join(SUITES)} (default: all)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (a pool of 1,000, few rounds): a smoke run",
    )
    ap.add_argument("--dm-ops", help="built bench/dm_ops.c (default: build it)")
    ap.add_argument("--thin-ops", help="built bench/thin_ops.c (default: build it)")
    ap.add_argument(
        "--dir",
        default="/var/tmp/libdm-bench",
        help="where the pools' sparse files and state go (removed after)",
    )
    ap.add_argument("--results", default=benchlib.RESULTS_DIR, help="JSON output directory")
    ap.add_argument("--host", default="", help="a note on the host, kept in the JSON")
    for key, value in FULL.items():
        ap.add_argument(
            "--" + key.replace("_", "-"),
            type=int,
            default=None,
            help=f"(default {value}; --quick: {QUICK[key]})",
        )
    args = ap.parse_args(argv)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        ap.error(f"unknown suite {', '.join(unknown)}; known: {', '.join(SUITES)}")
    if os.geteuid() != 0:
        sys.exit(
            "suite.py: needs root inside a kernel with device-mapper "
            "(run it through bench/run.py --all)"
        )
    sizes = dict(QUICK if args.quick else FULL)
    for key in FULL:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)

    import device_ops

    dm_ops = args.dm_ops or device_ops.build_c_program()
    thin_ops = args.thin_ops or benchlib.build_c("thin_ops")
    info = device_ops.machine()
    info.update(host=args.host, libdm=git_state(), mem_kb=benchlib.meminfo()["MemTotal"])
    log(
        f"# libdm benchmarks ({', '.join(suites)}): {info['kernel']}, libdevmapper "
        f"{info['libdevmapper']}, driver {info['driver']}, python {info['python']}, "
        f"libdm {info['libdm']}; {info['host']}"
    )
    began = time.perf_counter()
    results, tables, seconds = {}, {}, {}
    for suite in suites:
        t0 = time.perf_counter()
        log(f"\n## {TITLES[suite]}")
        if suite == "startup":
            import startup

            results[suite] = startup.run(sizes["startup_repeats"])
            tables[suite] = startup.table(results[suite])
        elif suite == "device":
            results[suite] = device_suite(
                dm_ops,
                sizes["device_count"],
                sizes["device_rounds"],
                sizes["dmsetup_count"],
                sizes["dmsetup_rounds"],
            )
            tables[suite] = device_table(results[suite])
        elif suite == "thin":
            import thin_lifecycle

            results[suite] = thin_lifecycle.run(
                thin_ops, os.path.join(args.dir, "thin"), sizes["thin_count"], sizes["thin_rounds"]
            )
            tables[suite] = thin_lifecycle.table(results[suite])
        elif suite == "scale":
            import scale

            results[suite] = scale.run(
                thin_ops,
                os.path.join(args.dir, "scale"),
                large=sizes["large"],
                small=sizes["small"],
                n=sizes["scale_count"],
                rounds=sizes["scale_rounds"],
                open_repeats=sizes["open_repeats"],
            )
            tables[suite] = scale.table(results[suite])
        seconds[suite] = time.perf_counter() - t0
        log(f"\n{tables[suite]}\n\n({suite}: {seconds[suite]:.0f} s)")
    with contextlib.suppress(OSError):
        os.rmdir(args.dir)
    total = time.perf_counter() - began

    print("\n# Results\n")
    for suite in suites:
        print(f"## {TITLES[suite]} ({seconds[suite]:.0f} s)\n\n{tables[suite]}\n")
    print(f"Total {total:.0f} s inside the kernel.")
    os.makedirs(args.results, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.results, f"suite-{stamp}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "machine": info,
                "sizes": sizes,
                "quick": args.quick,
                "suites": suites,
                "seconds": seconds,
                "total_seconds": total,
                "tables": tables,
                "results": results,
            },
            fh,
            indent=1,
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
