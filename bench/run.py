"""Build the C baseline and run ``bench/device_ops.py`` in one kernel boot.

From the repository root, with the virtualenv's Python::

    python bench/run.py [device_ops.py options, e.g. --attribute -n 300]

The C program is compiled here on the host (``cc -O2 ... -ldevmapper``
into ``bench/build/``, git-ignored); the benchmark then runs through
``python -m libdm.testing run``, i.e. directly where the host has
device-mapper and root, else inside one fresh User-Mode Linux kernel.
The exit status is the benchmark's.

Other UML kernels running on the host at the same time compete for its
CPUs and make the figures noisy; this warns when it sees any.
"""

import os
import subprocess
import sys

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
        print(f"bench/run.py: warning: {kernels} UML kernel processes already run on "
              f"this host (load {load}); they compete for its CPUs and make the "
              f"figures noisy", file=sys.stderr)
    return f"cpus={os.cpu_count()} load1={load} uml_processes_before={kernels}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    binary = device_ops.build_c_program()
    command = [sys.executable, os.path.join(HERE, "device_ops.py"),
               "--dm-ops", binary, "--host", host_note(), *argv]
    return subprocess.call([sys.executable, "-m", "libdm.testing", "run", "--", *command],
                           cwd=os.path.dirname(HERE))


if __name__ == "__main__":
    sys.exit(main())
