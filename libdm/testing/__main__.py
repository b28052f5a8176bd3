"""Command line: ``python -m libdm.testing run|check``.

``run [--uml] [--timeout S] [--] CMD [ARGS...]`` runs CMD directly when this
host has a usable device-mapper and runs as root, else inside a fresh UML
kernel, streaming its output; the exit status is CMD's, or 125 with a
one-line reason on stderr when no kernel could be had.

``check`` prints what was found (UML binary, its modules, host
device-mapper) and exits 0 when device-mapper can be had one way or the
other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from libdm.testing import kernel

#: Exit status when the command could not be run at all (as env(1) and
#: container runners use it).
NO_KERNEL = 125


def _run(args: argparse.Namespace) -> int:
    if not args.command:
        print("libdm.testing run: no command given", file=sys.stderr)
        return 2
    command: list[str] = args.command
    if not args.uml and kernel.host_has_device_mapper():
        try:
            return subprocess.call(command)
        except OSError as exc:
            print(f"libdm.testing run: {command[0]}: {exc.strerror}", file=sys.stderr)
            return 127
    try:
        result = kernel.run(command, stream=True, timeout=args.timeout, mem=args.mem)
    except kernel.KernelError as exc:
        print(f"libdm.testing run: no kernel: {exc.reason}", file=sys.stderr)
        return NO_KERNEL
    return result.returncode


def _check(args: argparse.Namespace) -> int:
    ok = False
    host = kernel.host_has_device_mapper()
    print(
        f"host device-mapper: {'usable' if host else 'not usable'} "
        f"(euid {os.geteuid()}, /dev/mapper/control "
        f"{'present' if os.path.exists('/dev/mapper/control') else 'absent'})"
    )
    ok |= host
    try:
        info = kernel.find_kernel()
    except kernel.KernelUnavailable as exc:
        print(f"UML kernel: unavailable: {exc.reason}")
    else:
        print(f"UML kernel: {info.binary}, release {info.version}")
        print(f"UML modules: {info.modules_dir}")
        found = _present_modules(info.modules_dir)
        for module in kernel.DEFAULT_MODULES:
            print(f"  {module}: {'found' if module.replace('-', '_') in found else 'MISSING'}")
        ok |= all(m.replace("-", "_") in found for m in kernel.DEFAULT_MODULES)
    return 0 if ok else 1


def _present_modules(directory: str) -> set[str]:
    names: set[str] = set()
    for _, _, files in os.walk(directory):
        for file in files:
            if ".ko" in file:
                names.add(file.split(".ko")[0].replace("-", "_"))
    # Built-in modules need no file.
    try:
        with open(os.path.join(directory, "modules.builtin")) as f:
            names |= {
                line.strip().rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_") for line in f
            }
    except OSError:
        pass
    return names


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m libdm.testing``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m libdm.testing", description=(__doc__ or "").split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run a command where device-mapper exists")
    run.add_argument(
        "--uml",
        action="store_true",
        help="always use a UML kernel, even if the host has device-mapper",
    )
    run.add_argument(
        "--timeout", type=float, default=None, help="kill the kernel after this many seconds"
    )
    run.add_argument("--mem", default="1G", help="kernel memory (default 1G)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("check", help="say what device-mapper kernels are available")
    args = parser.parse_args(argv)
    if args.action == "run":
        if args.command[:1] == ["--"]:
            args.command = args.command[1:]
        return _run(args)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
