"""Build the C baselines and run the benchmarks in one kernel boot.

From the repository root, with the virtualenv's Python::

    python bench/run.py --all [--quick] [--mem 1G] [suite.py options]
    python bench/run.py --suites thin,scale [suite.py options]
    python bench/run.py [device_ops.py options, e.g. --attribute -n 300]

``--all`` runs every suite (``bench/suite.py``: start-up, device
operations, thin lifecycle, scale) in one kernel and writes one JSON;
``--suites`` picks some.  Without either, as before, it runs
``bench/device_ops.py`` alone with the given options.

The C programs are compiled here on the host (``cc -O2 ... -ldevmapper``
into ``bench/build/``, git-ignored); the benchmark then runs through
``python -m libdm.testing run``, i.e. directly where the host has
device-mapper and root, else inside one fresh User-Mode Linux kernel.
The exit status is the benchmark's.

Other UML kernels running on the host at the same time compete for its
CPUs and make the figures noisy; this warns when it sees any, and with
``--all``/``--suites`` samples the host's load and kernel count every 15 s
during the run and adds them to the JSON (``host_during``).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import device_ops  # noqa: E402


def other_kernels():
    """How many UML kernel processes are running now (threads excluded)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
        except OSError:
            continue
        count += os.path.basename(argv0) in (b"linux.uml", b"linux", b"vmlinux")
    return count


def host_note():
    """The host's CPU count and load, to store with the results."""
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    kernels = other_kernels()
    if kernels:
        print(
            f"bench/run.py: warning: {kernels} UML kernel processes already run on "
            f"this host (load {load}); they compete for its CPUs and make the "
            f"figures noisy",
            file=sys.stderr,
        )
    return f"cpus={os.cpu_count()} load1={load} uml_processes_before={kernels}"


def _load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


class HostSampler(threading.Thread):
    """Every ``period`` seconds: elapsed time, load average, UML processes."""

    def __init__(self, period=15.0):
        super().__init__(daemon=True)
        self.period = period
        self.samples = []
        self.stop = threading.Event()
        self.began = time.monotonic()

    def sample(self):
        self.samples.append(
            {
                "t": round(time.monotonic() - self.began, 1),
                "load1": _load1(),
                "uml_processes": other_kernels(),
            }
        )

    def run(self):
        self.sample()
        while not self.stop.wait(self.period):
            self.sample()


def run_suite(argv):
    """``--all`` / ``--suites``: bench/suite.py in one kernel boot."""
    ap = argparse.ArgumentParser(prog="bench/run.py", add_help=False)
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--mem", default="1G", help="the test kernel's memory (default 1G)")
    known, rest = ap.parse_known_args(argv)
    import benchlib

    dm_ops = device_ops.build_c_program()
    thin_ops = benchlib.build_c("thin_ops")
    command = [
        sys.executable,
        os.path.join(HERE, "suite.py"),
        "--dm-ops",
        dm_ops,
        "--thin-ops",
        thin_ops,
        "--host",
        host_note(),
        *rest,
    ]
    sampler = HostSampler()
    sampler.start()
    began = time.time()
    status = subprocess.call(
        [sys.executable, "-m", "libdm.testing", "run", "--mem", known.mem, "--", *command],
        cwd=os.path.dirname(HERE),
    )
    wall = time.time() - began
    sampler.stop.set()
    sampler.sample()
    loads = [s["load1"] for s in sampler.samples]
    kernels = [s["uml_processes"] for s in sampler.samples]
    print(
        f"bench/run.py: {wall:.0f} s including the kernel's boot; host load "
        f"{min(loads):.2f}-{max(loads):.2f}, other UML processes {min(kernels)}-"
        f"{max(kernels)} (includes this run's kernel)"
    )
    # Add the host's side to the JSON the run wrote (the newest one since we began).
    written = [
        p
        for p in glob.glob(os.path.join(benchlib.RESULTS_DIR, "suite-*.json"))
        if os.path.getmtime(p) >= began
    ]
    if written:
        path = max(written, key=os.path.getmtime)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        data["host_during"] = {"wall_seconds_with_boot": wall, "samples": sampler.samples}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
    return status


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--all" in argv or any(a == "--suites" or a.startswith("--suites=") for a in argv):
        return run_suite(argv)
    binary = device_ops.build_c_program()
    command = [
        sys.executable,
        os.path.join(HERE, "device_ops.py"),
        "--dm-ops",
        binary,
        "--host",
        host_note(),
        *argv,
    ]
    return subprocess.call(
        [sys.executable, "-m", "libdm.testing", "run", "--", *command], cwd=os.path.dirname(HERE)
    )


if __name__ == "__main__":
    sys.exit(main())
