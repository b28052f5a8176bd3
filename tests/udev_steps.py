"""Run inside a test kernel with udevd by test_udev.py (not a test module).

usage: python udev_steps.py OUT.json [CYCLES]

Creates, renames, resumes and removes zero devices with libdm while a real
udevd runs, shows that a cookie nobody waits on leaks a semaphore, and
interrupts libdm right after it sets a cookie.
Everything seen is written to OUT.json; test_udev.py makes the assertions
on the host.  The only check made here is the gate: without udev
synchronisation the rest would prove nothing, so the script stops.
"""

import json
import logging
import os
import stat
import subprocess
import sys
import time
import traceback

import libdm
from libdm.dm._lib import ffi, lib
from libdm.dm.task import dm_dir

ZERO = [libdm.Target(0, 100, "zero")]


def semaphores():
    """SysV semaphore sets in the system: one per live udev cookie."""
    with open("/proc/sysvipc/sem") as fh:
        return len(fh.readlines()) - 1


def node(name):
    """What /dev/mapper/<name> is, or None when it is not there."""
    path = libdm.device_path(name)
    if not os.path.lexists(path):
        return None
    link = os.path.islink(path)
    seen = {
        "symlink": link,
        "target": os.readlink(path) if link else None,
        "block": False,
        "rdev": None,
    }
    try:
        st = os.stat(path)  # follows the link
    except FileNotFoundError:
        return seen  # a dangling link
    seen["block"] = stat.S_ISBLK(st.st_mode)
    seen["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    return seen


def udev_links(major, minor):
    """The symlinks udev's database records for a block device."""
    try:
        with open(f"/run/udev/data/b{major}:{minor}") as fh:
            return sorted(line[2:].strip() for line in fh if line.startswith("S:"))
    except FileNotFoundError:
        return None


class Warnings(logging.Handler):
    """Keeps what libdevmapper logs at warning level or above."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def cycle(n, previous):
    """Create, rename and resume device n, then remove ``previous`` (the
    device of cycle n-1, live until now so that two dm-N exist at once
    and a link to the wrong one would show)."""
    name = f"dmtest-{n}"
    renamed = name + "-r"
    seen = {"name": name, "removed": previous}
    t0 = time.monotonic()
    got = libdm.create(name, ZERO)
    seen["create_s"] = time.monotonic() - t0
    seen["minor"] = got.minor
    seen["info_minor"] = libdm.info(name).minor
    seen["after_create"] = node(name)
    seen["udev_links"] = udev_links(got.major, got.minor)
    seen["sems_after_create"] = semaphores()
    libdm.rename(name, renamed)
    seen["after_rename"] = {"old": node(name), "new": node(renamed)}
    seen["udev_links_renamed"] = udev_links(got.major, got.minor)
    libdm.resume(renamed)
    seen["after_resume"] = node(renamed)
    if previous is not None:
        major, minor = libdm.info(previous).major, libdm.info(previous).minor
        t1 = time.monotonic()
        libdm.remove(previous)
        seen["remove_s"] = time.monotonic() - t1
        seen["after_remove"] = node(previous)
        seen["udev_links_removed"] = udev_links(major, minor)
    seen["sems_after_remove"] = semaphores()
    seen["cycle_s"] = time.monotonic() - t0
    return seen, renamed


def cycles(count):
    out, previous = [], None
    for n in range(count):
        seen, previous = cycle(n, previous)
        out.append(seen)
    last = {"name": None, "removed": previous}
    major, minor = libdm.info(previous).major, libdm.info(previous).minor
    libdm.remove(previous)
    last["after_remove"] = node(previous)
    last["udev_links_removed"] = udev_links(major, minor)
    last["sems_after_remove"] = semaphores()
    return out, last


def failing_create():
    name = "dmtest-bad"
    seen = {"sems_before": semaphores()}
    try:
        libdm.create(name, [libdm.Target(0, 100, "linear", "9:99 0")])
    except libdm.DMError as exc:
        seen["error"] = type(exc).__name__
        seen["errno"] = exc.errno
    else:
        seen["error"] = None
    seen["exists"] = libdm.exists(name)
    seen["node"] = node(name)
    seen["sems_after"] = semaphores()
    return seen


def leak():
    """A create whose cookie is never waited on, through the raw binding:
    exactly what Task.run(udev=True) does, minus dm_udev_wait."""
    name = "dmtest-leak"
    seen = {"sems_before": semaphores()}
    dmt = lib.dm_task_create(lib.DM_DEVICE_CREATE)
    cookie = ffi.new("uint32_t *", 0)
    try:
        assert lib.dm_task_set_name(dmt, name.encode())
        assert lib.dm_task_add_target(dmt, 0, 100, b"zero", b"")
        assert lib.dm_task_set_cookie(dmt, cookie, lib.DM_UDEV_DISABLE_LIBRARY_FALLBACK)
        seen["run"] = bool(lib.dm_task_run(dmt))
    finally:
        lib.dm_task_destroy(dmt)
    seen["cookie"] = cookie[0]
    # udev completes the cookie (95-dm-notify.rules) but only the waiter
    # destroys the semaphore: once udev is done it is still there.
    subprocess.run(["udevadm", "settle"], check=True)
    seen["node"] = node(name)
    seen["sems_leaked"] = semaphores()
    proc = subprocess.run(
        ["dmsetup", "udevcomplete_all", "-y", "0"], capture_output=True, text=True
    )
    seen["udevcomplete_all"] = proc.returncode
    seen["sems_cleaned"] = semaphores()
    libdm.remove(name)
    seen["node_removed"] = node(name)
    seen["sems_after"] = semaphores()
    return seen


def interrupted():
    """An exception raised as libdm's first cookie call returns, as a
    Ctrl-C arriving during that call would be: the cookie's semaphore must
    still be waited on, so none is left."""
    name = "dmtest-int"
    libdm.create(name, ZERO)
    seen = {"sems_before": semaphores(), "after": None}

    def hook(frame, event, arg):
        if event == "c_return" and "cookie" in getattr(arg, "__name__", ""):
            sys.setprofile(None)
            seen["after"] = arg.__name__
            raise KeyboardInterrupt(f"right after {arg.__name__}")

    sys.setprofile(hook)
    try:
        libdm.resume(name)
    except KeyboardInterrupt:
        pass
    finally:
        sys.setprofile(None)
    subprocess.run(["udevadm", "settle"], check=True)
    seen["sems_after"] = semaphores()
    # Whatever leaked must not hang or skew what follows.
    subprocess.run(["dmsetup", "udevcomplete_all", "-y", "0"], capture_output=True)
    libdm.remove(name)
    seen["sems_cleaned"] = semaphores()
    return seen


def main(out, count=10):
    supported = libdm.udev_sync_supported()
    if not supported:
        print(
            "udev_steps: udev synchronisation is not supported here "
            f"(/run/udev/control exists: {os.path.exists('/run/udev/control')})",
            file=sys.stderr,
        )
        return 1
    warnings = Warnings()
    logging.getLogger("libdm").addHandler(warnings)
    result = {"udev_sync_supported": supported, "sems_start": semaphores()}
    t0 = time.monotonic()
    try:
        result["cycles"], result["last_remove"] = cycles(int(count))
        result["cycles_s"] = time.monotonic() - t0
        result["warnings"] = list(warnings.lines)
        del warnings.lines[:]
        result["failing_create"] = failing_create()
        result["failing_create"]["warnings"] = list(warnings.lines)
        result["sems_end"] = semaphores()
        result["leak"] = leak()
        result["interrupted"] = interrupted()
        result["mapper_left"] = sorted(os.listdir(dm_dir()))
    except Exception:
        result["exception"] = traceback.format_exc()
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
