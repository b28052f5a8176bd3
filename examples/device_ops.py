"""A short tour of libdm's device operations, in a real kernel.

Run it as root on a machine with device-mapper, or on any machine through
the test kernel:

    python -m libdm.testing run python examples/device_ops.py

It stacks a linear device on a zero device, reads tables, status and
info back, sends a message, renames, suspends and resumes, shows how a
busy device is removed (deferred) and what errors look like, and cleans
up everything it made.
"""

import os
import sys

import libdm
from libdm import Target

PREFIX = f"libdm-demo-{os.getpid()}"
# A device number no block device can have: block drivers register majors
# below 512, and 4095 is the largest major a dev_t holds.  (A number like
# 9:99 is not missing everywhere: where modules autoload, opening it loads
# md and makes /dev/md99, and the table loads.)
MISSING_DEVICE = "4095:0"


def show(title, value):
    print(f"  {title:<22} {value}")


def main():
    print(
        f"libdevmapper {libdm.library_version()}, "
        f"driver {'.'.join(map(str, libdm.driver_version()))}"
    )
    print("targets:", ", ".join(t.name for t in libdm.target_versions()))

    base, top = f"{PREFIX}-base", f"{PREFIX}-top"
    made = []
    try:
        # 1 GiB of zeros, then a linear device mapping its second half
        # followed by 8 sectors of error.  Lengths are 512-byte sectors.
        zero = libdm.create(base, [Target(0, 2 * 1024 * 1024, "zero")])
        made.append(base)
        libdm.create(
            top,
            [
                Target(0, 1024 * 1024, "linear", f"{zero.major}:{zero.minor} {1024 * 1024}"),
                Target(1024 * 1024, 8, "error"),
            ],
            uuid=f"DEMO-{PREFIX}",
        )
        made.append(top)

        print(f"\ncreated {top} on {base}")
        info = libdm.info(top)
        show("node", libdm.device_path(top))
        show("dev", f"{info.major}:{info.minor} ({info.devname})")
        show("uuid", info.uuid)
        for t in libdm.table(top):
            show("table", t)
        show("uses", libdm.deps(top))

        # Device-mapper statistics are driven by messages that answer.
        region = libdm.message(top, "@stats_create - /4")
        show("stats region", region)
        libdm.message(top, f"@stats_delete {region}")

        renamed = f"{PREFIX}-renamed"
        libdm.rename(top, renamed)
        made[made.index(top)] = renamed
        show("renamed to", renamed)

        libdm.suspend(renamed)
        show("suspended", libdm.info(renamed).suspended)
        libdm.reload(renamed, [Target(0, 2048, "zero")])
        show("inactive table", libdm.table(renamed, inactive=True)[0])
        libdm.resume(renamed)
        show("after resume", libdm.table(renamed)[0])

        # A device held open cannot be removed at once; a deferred remove
        # makes it go away when its last user closes it.
        fd = os.open(libdm.device_path(renamed), os.O_RDONLY)
        try:
            try:
                libdm.remove(renamed, retries=1, retry_delay=0.05)
            except libdm.DeviceBusyError as exc:
                print(f"\nbusy, as expected:\n  {exc}")
            libdm.remove(renamed, deferred=True)
            show("deferred remove", libdm.info(renamed).deferred_remove)
        finally:
            os.close(fd)
        show("gone after close", not libdm.exists(renamed))

        print("\nerrors name what was wrong:")
        # Recorded before trying, so that one made after all is removed.
        made.append(f"{PREFIX}-x")
        for attempt in (
            lambda: libdm.create("bad name", [Target(0, 8, "zero")]),
            lambda: libdm.info(f"{PREFIX}-missing"),
            lambda: libdm.create(f"{PREFIX}-x", [Target(0, 8, "linear", f"{MISSING_DEVICE} 0")]),
        ):
            try:
                attempt()
            except (ValueError, libdm.DMError) as exc:
                print(f"  {type(exc).__name__}: {str(exc).splitlines()[0]}")
            else:
                print("  no error: this kernel has the device after all")
    finally:
        clean_up(made)
    left = [d.name for d in libdm.list_devices() if d.name.startswith(PREFIX)]
    print(f"\nclean up: {len(left)} demo devices left")
    return 1 if left else 0


def clean_up(names):
    """Remove what the demo made (newest first), going on past a failure:
    a device still open is removed when its last user closes it."""
    for name in reversed(names):
        try:
            if libdm.exists(name):
                libdm.remove(name, deferred=True)
        except libdm.DMError as exc:
            print(f"could not remove {name}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
