"""Scale: a pool of 10,000 thin devices (1,000 of them active) against one of 100.

Runs where device-mapper exists, as root (``python bench/run.py --all`` or
``--suites scale`` runs it in one test kernel).  Measures:

* **build**: how long libdm takes to make the large pool (``create_thin``
  of every device, then ``deactivate_device`` of all but the first
  1,000), per thousand devices, and how long the C program takes to make
  its twin (``create_thin`` messages, then activating 1,000);
* **per-operation time at size**: the lifecycle of ``thin_lifecycle.py``
  (create + activate, snapshot of an active origin, deactivate + delete)
  run in interleaved blocks on four pools side by side: libdm at 100 and
  at 10,000 devices, C at 100 and at 10,000.  Target: libdm at 10,000 at
  most 1.3x libdm at 100 (median of paired blocks);
* **no scans**: every SQL statement a lifecycle block runs on the large
  pool is put through ``EXPLAIN QUERY PLAN``; a full scan of a table is
  reported (so are the statements of ``devices()`` and ``info()``, which
  may legitimately read every row);
* **listing and info**: ``pool.devices()`` and ``pool.info()`` at 100 and
  at 10,000, warm, in this process;
* **Pool.open**: the large pool's thin devices are removed behind its back
  (the store still says 1,000 are active), then a fresh process opens the
  pool -- re-activating the 1,000 -- lists its devices, reads its info and
  reports its peak RSS (``ru_maxrss``; target at most 100 MB).  Repeated;
  the C program re-activating the same number of devices is the yardstick.
  A last fresh process opens the pool while everything is live.

Nothing here asserts a target; the table says whether each was met.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402
from benchlib import DATA_SIZE, METADATA_SIZE, THIN_SIZE  # noqa: E402

MAX_LARGE_OVER_SMALL = 1.3
MAX_RSS_MB = 100
OPS = ("create", "snapshot", "delete")


def _names(n):
    return [f"d{i:05d}" for i in range(n)]


def build_libdm(pool, n, active, log=benchlib.log):
    """create_thin ``n`` devices; deactivate all but the first ``active``.
    Returns {"seconds", "per_1000_s"}."""
    began = last = time.perf_counter()
    per_1000 = []
    for i, name in enumerate(_names(n)):
        pool.create_thin(name, THIN_SIZE)
        if i >= active:
            pool.deactivate_device(name)
        if (i + 1) % 1000 == 0:
            now = time.perf_counter()
            per_1000.append(now - last)
            last = now
            log(
                f"  {pool.name}: {i + 1} devices, last thousand in {per_1000[-1]:.1f} s, "
                f"kernel MemAvailable {benchlib.meminfo()['MemAvailable'] // 1024} MiB"
            )
    return {"seconds": time.perf_counter() - began, "per_1000_s": per_1000}


def build_c(c, n, active):
    """The C twin: ``n`` create_thin messages, then ``active`` activations."""
    thin = c.run("thin", 0, n)
    act = c.run("activate", "d", 0, active, THIN_SIZE // 512)
    return {"seconds": thin + act, "create_thin_s": thin, "activate_s": act}


def sql_scans(pool, fn):
    """Run ``fn()`` tracing the pool's SQL; return (statements run,
    [(statement, plan) for every statement whose plan scans a table])."""
    db = pool._core.store.db  # internal: for this check only
    seen = []
    db.set_trace_callback(seen.append)
    try:
        fn()
    finally:
        db.set_trace_callback(None)
    scans = []
    for sql in dict.fromkeys(seen):
        head = sql.split(None, 1)[0].upper()
        if head not in ("SELECT", "UPDATE", "DELETE", "INSERT"):
            continue
        plan = [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
        if any(step.startswith("SCAN") for step in plan):
            scans.append((sql, plan))
    return len(seen), scans


def _child_open(directory, repeats=3):
    """In a fresh process: import libdm, open the pool, list, info, RSS."""
    t0 = time.perf_counter()
    import libdm

    out = {"import_s": time.perf_counter() - t0}
    before = {e.name for e in libdm.list_devices()}
    t = time.perf_counter()
    pool = libdm.Pool.open(directory)
    out["open_s"] = time.perf_counter() - t
    prefix = pool.name + "-"
    after = {e.name for e in libdm.list_devices()}
    out["activated"] = len({n for n in after - before if n.startswith(prefix)})
    out["live_thin_devices"] = len({n for n in after if n.startswith(prefix)})
    out["devices_s"], out["info_s"] = [], []
    for _ in range(repeats):
        s, devices = benchlib.timed(pool.devices)
        out["devices_s"].append(s)
        s, info = benchlib.timed(pool.info)
        out["info_s"].append(s)
    out["devices"] = len(devices)
    out["info_devices"] = info.devices
    out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pool.close()
    json.dump(out, sys.stdout)
    return 0


def open_child(directory):
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child-open", directory],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(proc.stdout)


def run(
    thin_ops_binary,
    directory,
    large=10_000,
    small=100,
    active_fraction=0.1,
    n=100,
    rounds=3,
    block=10,
    open_repeats=3,
    log=benchlib.log,
):
    """Build the four pools under ``directory``, measure, tear down."""
    from thin_lifecycle import CPath, LibdmPath

    import libdm

    os.makedirs(directory, exist_ok=True)
    active_large = int(large * active_fraction)
    active_small = int(small * active_fraction)
    out = {
        "large": large,
        "small": small,
        "active_large": active_large,
        "active_small": active_small,
        "n": n,
        "rounds": rounds,
        "block": block,
        "directory": directory,
        "targets": {"large_over_small_max": MAX_LARGE_OVER_SMALL, "rss_mb_max": MAX_RSS_MB},
    }
    pools, raws, cs = {}, {}, {}
    try:
        for key in ("small", "large"):
            raws[key] = benchlib.RawPool(f"bench-c{key[0]}", os.path.join(directory, f"c{key}"))
            cs[key] = benchlib.ThinOps(thin_ops_binary, raws[key].name)
            pools[key] = libdm.Pool.create_loop(
                f"bench-{key[0]}",
                os.path.join(directory, key),
                data_size=DATA_SIZE,
                metadata_size=METADATA_SIZE,
            )
        log(
            f"scale: building pools of {small} and {large} thin devices "
            f"({active_small} and {active_large} active), libdm and C"
        )
        out["build"] = {}
        for key, size, act in (("small", small, active_small), ("large", large, active_large)):
            out["build"][f"c@{size}"] = build_c(cs[key], size, act)
            out["build"][f"libdm@{size}"] = build_libdm(pools[key], size, act, log)
            log(
                f"  built {size}: libdm {out['build'][f'libdm@{size}']['seconds']:.1f} s, "
                f"C {out['build'][f'c@{size}']['seconds']:.1f} s"
            )
        out["meminfo_after_build_kb"] = benchlib.meminfo()

        # -- per-operation time at 100 and at 10,000 ---------------------------
        fns = {
            f"libdm@{small}": LibdmPath(pools["small"], "x").block,
            f"libdm@{large}": LibdmPath(pools["large"], "x").block,
            f"c@{small}": CPath(cs["small"], base=small).block,
            f"c@{large}": CPath(cs["large"], base=large).block,
        }
        log(
            f"scale: lifecycle at {small} and {large} devices, {n} of each operation per "
            f"pool per round, {rounds} rounds, blocks of {block}"
        )
        times = benchlib.interleave(fns, n, rounds, block, log=log)
        ratios = (
            (f"libdm@{large}", f"libdm@{small}"),
            (f"c@{large}", f"c@{small}"),
            (f"libdm@{small}", f"c@{small}"),
            (f"libdm@{large}", f"c@{large}"),
        )
        out["ops"] = benchlib.summarize(times, ratios)

        # -- no scans ------------------------------------------------------------
        big = pools["large"]
        path = LibdmPath(big, "q")
        count, scans = sql_scans(big, lambda: path.block(2))
        out["sql"] = {
            "lifecycle_block_statements": count,
            "lifecycle_scans": [{"sql": s, "plan": p} for s, p in scans],
        }
        for what, fn in (("devices", big.devices), ("info", big.info)):
            _, scans = sql_scans(big, fn)
            out["sql"][f"{what}_scans"] = [{"sql": s, "plan": p} for s, p in scans]

        # -- listing and info, warm ---------------------------------------------
        warm = {}
        for size in (small, large):
            for what in ("devices", "info"):
                warm[f"{what}@{size}"] = []
        for _ in range(5):
            for key, size in (("small", small), ("large", large)):
                warm[f"devices@{size}"].append(benchlib.timed(pools[key].devices)[0])
                warm[f"info@{size}"].append(benchlib.timed(pools[key].info)[0])
        out["warm_ms"] = {k: benchlib.median_ms(v) for k, v in warm.items()}
        out["warm_all_s"] = warm

        # -- Pool.open re-activating the active devices, in a fresh process --------
        log(
            f"scale: Pool.open of the {large}-device pool re-activating {active_large}, "
            f"{open_repeats} times, each in a fresh process; C re-activating as many"
        )
        active_names = [big.device_dm_name(nm) for nm in _names(active_large)]
        opens, c_activate, teardown = [], [], []
        for rep in range(open_repeats):
            began = time.perf_counter()
            for dm_name in active_names:
                libdm.remove(dm_name)
            teardown.append(time.perf_counter() - began)
            opens.append(open_child(big.directory))
            cs["large"].run("deactivate", "d", 0, active_large)
            c_activate.append(cs["large"].run("activate", "d", 0, active_large, THIN_SIZE // 512))
            log(
                f"  open {rep + 1}: Pool.open {opens[-1]['open_s']:.2f} s "
                f"({opens[-1]['activated']} activated), C activate {c_activate[-1]:.2f} s, "
                f"peak RSS {opens[-1]['maxrss_kb'] / 1024:.1f} MiB"
            )
        live = open_child(big.directory)
        log(f"  open with every device live: {live['open_s']:.2f} s")
        out["open"] = {
            "children": opens,
            "c_activate_s": c_activate,
            "libdm_remove_s": teardown,
            "live_child": live,
            "open_s_median": statistics.median(o["open_s"] for o in opens),
            "c_activate_s_median": statistics.median(c_activate),
            "ratios_per_repeat": [o["open_s"] / c for o, c in zip(opens, c_activate, strict=True)],
            "maxrss_mb_max": max(o["maxrss_kb"] for o in [*opens, live]) / 1024,
        }
        out["parent_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        for c in cs.values():
            c.close()
        for raw in raws.values():
            raw.destroy()
        for key, pool in pools.items():
            began = time.perf_counter()
            pool.destroy(remove_files=True)
            out.setdefault("destroy_s", {})[key] = time.perf_counter() - began
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    return out


def _scans_devices(scan):
    return any(step.startswith("SCAN devices") for step in scan["plan"])


def table(out):
    """The results as Markdown."""
    large, small = out["large"], out["small"]
    lines = [
        f"Build ({out['active_large']} of {large} active): "
        + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in out["build"].items()),
        "",
    ]
    lines += [
        "| operation | path | ms per op (median block) | p10-p90 ms |",
        "| --- | --- | ---: | --- |",
    ]
    for op in OPS:
        for path, by_op in out["ops"]["paths"].items():
            row = by_op[op]
            lines.append(
                f"| {op} | {path} | {row['ms_per_op']:.2f} "
                f"| {row['p10_ms']:.2f}-{row['p90_ms']:.2f} |"
            )
    lines += [
        "",
        "| ratio | " + " | ".join(OPS) + " | target |",
        "| --- | " + " | ".join("---:" for _ in OPS) + " | --- |",
    ]
    main_ratio = f"libdm@{large}/libdm@{small}"
    for name, by_op in out["ops"]["ratios"].items():
        cells = []
        for op in OPS:
            x = by_op[op]["median_of_blocks"]
            mark = ""
            if name == main_ratio:
                mark = " ok" if x <= MAX_LARGE_OVER_SMALL else " MISSED"
            cells.append(f"{x:.3f}{mark}")
        target = f"<= {MAX_LARGE_OVER_SMALL:g}" if name == main_ratio else "attribution"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {target} |")
    op = out["open"]
    live = op["live_child"]
    w = out["warm_ms"]
    rss = op["maxrss_mb_max"]
    lines += [
        "",
        "| measure | value | note |",
        "| --- | ---: | --- |",
        f"| Pool.open re-activating {out['active_large']} (fresh process, median) "
        f"| {op['open_s_median']:.2f} s | runs: "
        + ", ".join(f"{o['open_s']:.2f}" for o in op["children"])
        + " |",
        f"| C re-activating {out['active_large']} (median) | {op['c_activate_s_median']:.2f} s "
        f"| runs: " + ", ".join(f"{c:.2f}" for c in op["c_activate_s"]) + " |",
        f"| Pool.open / C | {op['open_s_median'] / op['c_activate_s_median']:.2f} | per run: "
        + ", ".join(f"{r:.2f}" for r in op["ratios_per_repeat"])
        + " |",
        f"| Pool.open with every device live | {live['open_s']:.2f} s | verifies only |",
        f"| devices() at {large}, warm / fresh process | {w[f'devices@{large}']:.1f} ms / "
        f"{statistics.median(live['devices_s']) * 1e3:.1f} ms | at {small}: "
        f"{w[f'devices@{small}']:.2f} ms |",
        f"| info() at {large}, warm / fresh process | {w[f'info@{large}']:.2f} ms / "
        f"{statistics.median(live['info_s']) * 1e3:.2f} ms | at {small}: "
        f"{w[f'info@{small}']:.2f} ms |",
        f"| peak RSS, process with the {large}-device pool open | {rss:.1f} MB "
        f"| {'ok' if rss <= MAX_RSS_MB else 'MISSED'} (<= {MAX_RSS_MB} MB) |",
        f"| SQL statements per lifecycle block of 2 at {large} | "
        f"{out['sql']['lifecycle_block_statements']} | scans of the devices table: "
        f"{sum(_scans_devices(s) for s in out['sql']['lifecycle_scans'])} |",
    ]
    for what in ("lifecycle", "devices", "info"):
        for s in out["sql"][f"{what}_scans"]:
            lines.append(f"| scan in {what} | | `{s['sql'][:70]}`: {'; '.join(s['plan'])} |")
    lines.append("")
    lines.append(
        f"(n={out['n']} per operation per pool per round, {out['rounds']} rounds, "
        f"blocks of {out['block']}; ratios are medians of paired blocks)"
    )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--thin-ops", help="the built C program (default: build it)")
    ap.add_argument(
        "--dir",
        default="/var/tmp/libdm-bench-scale",
        help="where the pools' files go (removed after)",
    )
    ap.add_argument("--large", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("-n", "--count", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--open-repeats", type=int, default=3)
    ap.add_argument("--child-open", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_open:
        return _child_open(args.child_open)
    if os.geteuid() != 0:
        sys.exit("scale.py: needs root inside a kernel with device-mapper")
    binary = args.thin_ops or benchlib.build_c("thin_ops")
    out = run(
        binary,
        args.dir,
        args.large,
        args.small,
        n=args.count,
        rounds=args.rounds,
        block=args.block,
        open_repeats=args.open_repeats,
    )
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
