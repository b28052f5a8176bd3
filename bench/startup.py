"""Import and start-up: how long ``import libdm`` and the first operation take.

Runs where device-mapper exists, as root (``python bench/run.py --all`` or
``--suites startup`` runs it in one test kernel).  Every figure comes
from fresh processes, ``--repeats`` of each, taken in turns:

* ``python -c pass`` and ``python -c 'import libdm'``, wall time of the
  whole process: the difference is what importing libdm adds;
* inside a fresh process: ``import libdm`` alone (``perf_counter`` around
  it), then the first operation after it and the same operation again:
  ``libdm.driver_version()`` (the first task opens the control device and
  checks the driver's version), and, in another process,
  ``libdm.info(name)`` of an existing device;
* ``dmsetup info NAME``, one process per operation, for scale;
* one ``python -X importtime -c 'import libdm'``: the modules that cost
  most, for the profile.

libdm's bytecode is compiled first (``compileall``), as an installed
package's is.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402

DEVICE = "bench-startup"

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import libdm
t1 = time.perf_counter()
op = sys.argv[1]
fn = libdm.driver_version if op == "driver_version" else (lambda: libdm.info(sys.argv[2]))
fn()
t2 = time.perf_counter()
fn()
t3 = time.perf_counter()
json.dump({"import_s": t1 - t0, "first_s": t2 - t1, "second_s": t3 - t2}, sys.stdout)
"""


#: Standard-library modules ``import libdm`` pulls in that only some
#: operations need (the state store, thin_check and mkfs, new pool uuids,
#: the report and status classes, type hints): importing them alone, in a
#: fresh process, bounds what importing them lazily would save.
LAZY_CANDIDATES = ("sqlite3", "subprocess", "shutil", "uuid", "dataclasses", "typing", "json")

LAZY_CHILD = r"""
import json, sys, time
before = set(sys.modules)
t0 = time.perf_counter()
for name in sys.argv[1:]:
    __import__(name)
t1 = time.perf_counter()
json.dump({"seconds": t1 - t0, "modules": len(set(sys.modules) - before)}, sys.stdout)
"""


def _wall(argv):
    began = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def importtime(top=10):
    """The ``top`` modules by cumulative import time (µs), from -X importtime."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import libdm"],
        check=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = (p.strip() for p in line[len("import time:") :].split("|"))
        rows.append(
            {"module": name.strip(), "self_us": int(self_us), "cumulative_us": int(cum_us)}
        )
    libdm_total = next((r["cumulative_us"] for r in rows if r["module"] == "libdm"), None)
    rows.sort(key=lambda r: -r["cumulative_us"])
    by_self = sorted(rows, key=lambda r: -r["self_us"])[:top]
    return {
        "libdm_cumulative_us": libdm_total,
        "top_cumulative": rows[:top],
        "top_self": by_self,
        "modules": len(rows),
    }


def run(repeats=10, log=benchlib.log):
    import libdm

    python = sys.executable
    dmsetup = shutil.which("dmsetup")
    # Up-to-date bytecode first, as an installed package has it: with
    # PYTHONDONTWRITEBYTECODE set (the harness passes the environment on)
    # a module edited since its .pyc was written is compiled again at every
    # import, which would be measured as import time.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [python, "-m", "compileall", "-q", os.path.dirname(libdm.__file__)], check=True, env=env
    )
    libdm.create(DEVICE, [libdm.Target(0, 100, "zero")])
    try:
        walls = {"python -c pass": [], "python -c 'import libdm'": [], "dmsetup info": []}
        children = {"driver_version": [], "info": []}
        lazy = []
        # warm the page cache (files come from the host through hostfs)
        _wall([python, "-c", "import libdm"])
        for _ in range(repeats):
            walls["python -c pass"].append(_wall([python, "-c", "pass"]))
            walls["python -c 'import libdm'"].append(_wall([python, "-c", "import libdm"]))
            if dmsetup:
                walls["dmsetup info"].append(_wall([dmsetup, "info", DEVICE]))
            for op in children:
                proc = subprocess.run(
                    [python, "-c", CHILD, op, DEVICE],
                    check=True,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                children[op].append(json.loads(proc.stdout))
            proc = subprocess.run(
                [python, "-c", LAZY_CHILD, *LAZY_CANDIDATES],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            lazy.append(json.loads(proc.stdout))
        prof = importtime()
        proc = subprocess.run(
            [
                python,
                "-c",
                "import sys; b = set(sys.modules); import libdm; print(len(set(sys.modules) - b))",
            ],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        prof["modules_added_by_import_libdm"] = int(proc.stdout)
    finally:
        libdm.remove(DEVICE)
    out = {
        "repeats": repeats,
        "wall_ms": {k: benchlib.median_ms(v) for k, v in walls.items() if v},
        "wall_all_s": walls,
        "children": children,
        "importtime": prof,
    }
    imports = [c["import_s"] for runs in children.values() for c in runs]
    out["import_ms"] = benchlib.median_ms(imports)
    out["import_ms_spread"] = [min(imports) * 1e3, max(imports) * 1e3]
    for op, runs in children.items():
        out[f"first_{op}_ms"] = benchlib.median_ms([c["first_s"] for c in runs])
        out[f"second_{op}_ms"] = benchlib.median_ms([c["second_s"] for c in runs])
    out["lazy_candidates"] = {
        "modules": list(LAZY_CANDIDATES),
        "import_ms": benchlib.median_ms([x["seconds"] for x in lazy]),
        "modules_loaded": lazy[0]["modules"],
    }
    out["import_added_wall_ms"] = (
        out["wall_ms"]["python -c 'import libdm'"] - out["wall_ms"]["python -c pass"]
    )
    log(
        f"startup: import libdm {out['import_ms']:.1f} ms, first driver_version "
        f"{out['first_driver_version_ms']:.2f} ms"
    )
    return out


def table(out):
    w = out["wall_ms"]
    imp = w["python -c 'import libdm'"]
    lines = [
        f"| measure (fresh processes, median of {out['repeats']}) | ms | note |",
        "| --- | ---: | --- |",
        f"| `import libdm`, in-process | {out['import_ms']:.1f} | range "
        f"{out['import_ms_spread'][0]:.1f}-{out['import_ms_spread'][1]:.1f} |",
        f"| `python -c pass`, whole process | {w['python -c pass']:.1f} | |",
        f"| `python -c 'import libdm'`, whole process "
        f"| {imp:.1f} | adds "
        f"{out['import_added_wall_ms']:.1f} |",
    ]
    for op, label in (
        ("driver_version", "`libdm.driver_version()`"),
        ("info", "`libdm.info(name)`"),
    ):
        lines.append(
            f"| first {label} after import | {out[f'first_{op}_ms']:.2f} | "
            f"second call: {out[f'second_{op}_ms']:.2f} |"
        )
    if "dmsetup info" in w:
        lines.append(
            f"| `dmsetup info NAME`, whole process | {w['dmsetup info']:.1f} | "
            f"one process per operation |"
        )
    prof = out["importtime"]
    top = ", ".join(f"{r['module']} {r['self_us'] / 1e3:.1f}" for r in prof["top_self"][:6])
    lazy = out["lazy_candidates"]
    lines.append(
        f"| {', '.join(lazy['modules'])} alone ({lazy['modules_loaded']} modules) "
        f"| {lazy['import_ms']:.1f} | what lazy imports could save at most |"
    )
    lines += [
        "",
        f"`import libdm` adds {prof['modules_added_by_import_libdm']} modules. "
        f"`-X importtime`: libdm {prof['libdm_cumulative_us'] / 1e3:.1f} ms "
        f"cumulative; most self time (ms): {top}",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("startup.py: needs root inside a kernel with device-mapper")
    print(table(run(args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
