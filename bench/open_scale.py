"""Pool.open of a pool whose devices are all recorded active, against C.

Issue 19's target: ``Pool.open`` of a pool with 10,000 recorded-active
thin devices at most 1.5x what the same device-mapper calls cost in C
(``bench/thin_ops.c`` activating the same number of existing thin ids:
create, load and resume each), and lazy activation (``lazy=True``), as
Docker's driver does it, to make such an open cheap.

Run in one test kernel (the C program is built on the host first)::

    python -m libdm.testing run --mem 3G -- \\
        python bench/open_scale.py --thin-ops bench/build/thin_ops [--devices 10000]

Each repeat, side by side in the same boot:

* **eager**: every thin device of the libdm pool is removed behind its
  back (its store still says all are active), then a fresh process runs
  ``Pool.open`` and re-activates them all;
* **C**: the C program activates as many existing thin ids of its own
  pool (then removes them again, untimed);
* **lazy**: the libdm devices are removed again and a fresh process runs
  ``Pool.open(lazy=True)``, which brings the pool up and leaves them down.

Nothing here asserts a target; the table says whether it was met.
"""

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402
from benchlib import DATA_SIZE, METADATA_SIZE, THIN_SIZE  # noqa: E402

MAX_OPEN_OVER_C = 1.5


def _child(directory, lazy):
    """In a fresh process: import libdm, open the pool, time it."""
    import libdm

    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    pool = libdm.Pool.open(directory, lazy=lazy)
    seconds = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    prefix = pool.name + "-"
    live = sum(1 for entry in libdm.list_devices() if entry.name.startswith(prefix))
    pool.close()
    json.dump(
        {
            "open_s": seconds,
            "live": live,
            "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime,
        },
        sys.stdout,
    )
    return 0


def open_child(directory, lazy, trace=None):
    """``Pool.open`` in a fresh process; with ``trace`` (a file), under
    ``strace -f -c -w``, which writes its summary there."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", directory]
    if lazy:
        argv.append("--lazy")
    if trace:
        argv = ["strace", "-f", "-c", "-w", "-o", trace, *argv]
    proc = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(proc.stdout)


def strace_summary(path, per):
    """``strace -c``'s summary in ``path``: {syscall: (calls, seconds)},
    each divided by ``per``."""
    out = {}
    with open(path) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                out[parts[-1]] = (int(parts[3]) / per, float(parts[1]) / per)
    return out


def traced(thin_ops, c, names, directory_of_pool, devices, work):
    """System calls per device: a fresh process's eager ``Pool.open``, and
    the C program's activation of as many (its process attached by strace
    for that request alone)."""
    _remove_all(names)
    libdm_trace = os.path.join(work, "strace-open")
    open_child(directory_of_pool, lazy=False, trace=libdm_trace)
    _remove_all(names)
    c_trace = os.path.join(work, "strace-c")
    tracer = subprocess.Popen(
        ["strace", "-c", "-w", "-o", c_trace, "-p", str(c.proc.pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    tracer.stderr.readline()  # "Process N attached"
    c.run("activate", "d", 0, devices, THIN_SIZE // 512)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=600)
    c.run("deactivate", "d", 0, devices)
    return {
        "libdm": strace_summary(libdm_trace, devices),
        "c": strace_summary(c_trace, devices),
    }


def _cpu_times(pid):
    """(user, system) CPU seconds of process ``pid`` so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return [int(fields[11]) / tick, int(fields[12]) / tick]


def _remove_all(names):
    import libdm

    for name in names:
        if libdm.exists(name):
            libdm.remove(name)


def run(thin_ops, directory, devices, repeats, log=benchlib.log, trace=False):
    import libdm

    os.makedirs(directory, exist_ok=True)
    out = {"devices": devices, "repeats": repeats, "target_open_over_c": MAX_OPEN_OVER_C}
    raw = benchlib.RawPool("bench-oc", os.path.join(directory, "c"))
    c = benchlib.ThinOps(thin_ops, raw.name)
    pool = libdm.Pool.create_loop(
        "bench-o",
        os.path.join(directory, "libdm"),
        data_size=DATA_SIZE,
        metadata_size=METADATA_SIZE,
    )
    try:
        log(f"open_scale: {devices} thin devices in each pool, all recorded active")
        began = time.perf_counter()
        names = []
        for i in range(devices):
            pool.create_thin(f"d{i:05d}", THIN_SIZE)
            names.append(pool.device_dm_name(f"d{i:05d}"))
            if (i + 1) % 1000 == 0:
                log(f"  libdm: {i + 1} devices, {time.perf_counter() - began:.0f} s")
        out["build_libdm_s"] = time.perf_counter() - began
        out["build_c_s"] = c.run("thin", 0, devices)
        directory_of_pool = pool.directory
        pool.close()
        eager, lazy, c_activate, c_cpu = [], [], [], []
        for rep in range(repeats):
            _remove_all(names)
            eager.append(open_child(directory_of_pool, lazy=False))
            _remove_all(names)
            cpu = _cpu_times(c.proc.pid)
            c_activate.append(c.run("activate", "d", 0, devices, THIN_SIZE // 512))
            c_cpu.append([b - a for a, b in zip(cpu, _cpu_times(c.proc.pid), strict=True)])
            c.run("deactivate", "d", 0, devices)
            lazy.append(open_child(directory_of_pool, lazy=True))
            log(
                f"  repeat {rep + 1}: Pool.open {eager[-1]['open_s']:.2f} s "
                f"({eager[-1]['live']} live), C {c_activate[-1]:.2f} s, "
                f"lazy Pool.open {lazy[-1]['open_s']:.2f} s ({lazy[-1]['live']} live)"
            )
        out["eager"] = eager
        out["lazy"] = lazy
        out["c_activate_s"] = c_activate
        out["c_cpu_s"] = c_cpu
        out["ratios"] = [e["open_s"] / s for e, s in zip(eager, c_activate, strict=True)]
        out["lazy_ratios"] = [z["open_s"] / s for z, s in zip(lazy, c_activate, strict=True)]
        if trace:
            log("  traced: Pool.open and C under strace")
            out["syscalls_per_device"] = traced(
                thin_ops, c, names, directory_of_pool, devices, directory
            )
        _remove_all(names)
    finally:
        c.close()
        raw.destroy()
        libdm.Pool.open(os.path.join(directory, "libdm"), lazy=True).destroy(remove_files=True)
    return out


def table(out):
    ratio = statistics.median(out["ratios"])
    lazy = statistics.median(out["lazy_ratios"])
    n = out["devices"]
    eager_s = statistics.median(e["open_s"] for e in out["eager"])
    lazy_s = statistics.median(z["open_s"] for z in out["lazy"])
    c_s = statistics.median(out["c_activate_s"])
    verdict = "met" if ratio <= MAX_OPEN_OVER_C else f"missed by {ratio / MAX_OPEN_OVER_C:.2f}x"
    return "\n".join(
        [
            f"| measure ({n} devices recorded active, median of {out['repeats']}) "
            "| seconds | / C | target |",
            "| --- | ---: | ---: | --- |",
            f"| Pool.open, re-activating all | {eager_s:.2f} | {ratio:.2f} "
            f"| <= {MAX_OPEN_OVER_C}: {verdict} |",
            f"| C activating as many | {c_s:.2f} | 1.00 | - |",
            f"| Pool.open(lazy=True) | {lazy_s:.2f} | {lazy:.2f} | - |",
            "",
            "CPU per device (ms), user / system: Pool.open "
            f"{_per_device(out['eager'], 'user_s', n)} / {_per_device(out['eager'], 'sys_s', n)}, "
            f"C {statistics.median(c[0] for c in out['c_cpu_s']) * 1000 / n:.2f} / "
            f"{statistics.median(c[1] for c in out['c_cpu_s']) * 1000 / n:.2f}.",
            "",
            f"Ratios per repeat: {', '.join(f'{r:.2f}' for r in out['ratios'])}; "
            f"building the pools: libdm {out['build_libdm_s']:.0f} s, "
            f"C {out['build_c_s']:.0f} s.",
        ]
    )


def syscall_table(out):
    """System calls per device (and their seconds, per device), libdm
    against C, the busiest first."""
    per = out["syscalls_per_device"]
    names = sorted(
        set(per["libdm"]) | set(per["c"]), key=lambda n: -per["libdm"].get(n, (0, 0))[1]
    )
    rows = [
        f"| per device, {out['devices']} devices | libdm calls | libdm us | C calls | C us |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    totals = [0.0, 0.0, 0.0, 0.0]
    for name in names:
        lc, ls = per["libdm"].get(name, (0, 0))
        cc, cs = per["c"].get(name, (0, 0))
        totals = [totals[0] + lc, totals[1] + ls, totals[2] + cc, totals[3] + cs]
        if lc >= 0.05 or cc >= 0.05:
            rows.append(f"| {name} | {lc:.2f} | {ls * 1e6:.0f} | {cc:.2f} | {cs * 1e6:.0f} |")
    rows.append(
        f"| total | {totals[0]:.2f} | {totals[1] * 1e6:.0f} | {totals[2]:.2f} | "
        f"{totals[3] * 1e6:.0f} |"
    )
    return "\n".join(rows)


def _per_device(runs, key, n):
    return f"{statistics.median(r[key] for r in runs) * 1000 / n:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--thin-ops", help="the built C program (default: build it)")
    ap.add_argument("--dir", default="/var/tmp/libdm-bench-open")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--strace",
        action="store_true",
        help="then count the system calls per device of one more eager open and C activation",
    )
    ap.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--lazy", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child, args.lazy)
    if os.geteuid() != 0:
        sys.exit("open_scale.py: needs root inside a kernel with device-mapper")
    binary = args.thin_ops or benchlib.build_c("thin_ops")
    out = run(binary, args.dir, args.devices, args.repeats, trace=args.strace)
    os.makedirs(benchlib.RESULTS_DIR, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with open(os.path.join(benchlib.RESULTS_DIR, f"open-scale-{stamp}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(table(out))
    if args.strace:
        print()
        print(syscall_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
