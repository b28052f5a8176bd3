"""Independent witnesses of kernel state: dmsetup and sysfs.

Tests check what libdm did against these, never against libdm itself.
(Tests may run dmsetup; the library never does.)
"""

import os
import subprocess


def dmsetup(*args, check=True):
    """Run dmsetup and return its stdout."""
    proc = subprocess.run(
        ["dmsetup", *args], capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dmsetup {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def table(name):
    """The device's table lines, as dmsetup prints them."""
    return [line.rstrip() for line in dmsetup("table", name).splitlines()]


def status(name):
    return [line.rstrip() for line in dmsetup("status", name).splitlines()]


def info(name):
    """dmsetup's view of one device as a dict, or None if it does not exist."""
    out = dmsetup(
        "info", "-c", "--noheadings", "--separator", "|",
        "-o", "name,uuid,major,minor,attr,open,segments,events", name,
        check=False,
    ).strip()
    if not out or "|" not in out:
        return None
    name_, uuid, major, minor, attr, open_, segments, events = out.split("|")
    return {
        "name": name_,
        "uuid": uuid,
        "major": int(major),
        "minor": int(minor),
        "attr": attr,  # e.g. "L--w": live table, not suspended, writable
        "open": int(open_),
        "segments": int(segments),
        "events": int(events),
    }


def names():
    """Names of all device-mapper devices, per dmsetup."""
    out = dmsetup("ls").strip()
    if not out or out == "No devices found":
        return set()
    return {line.split()[0] for line in out.splitlines()}


def sysfs(name, attr):
    """Read /sys/block/dm-N/dm/<attr> for device ``name`` (found by scanning)."""
    for entry in os.listdir("/sys/block"):
        if not entry.startswith("dm-"):
            continue
        base = f"/sys/block/{entry}/dm"
        with open(f"{base}/name") as fh:
            if fh.read().strip() == name:
                with open(f"{base}/{attr}") as fh2:
                    return fh2.read().strip()
    return None


def sysfs_names():
    out = set()
    for entry in os.listdir("/sys/block"):
        if entry.startswith("dm-"):
            with open(f"/sys/block/{entry}/dm/name") as fh:
                out.add(fh.read().strip())
    return out


def devnode(devno):
    """/dev path of a block device given as 'major:minor' (via sysfs)."""
    with open(f"/sys/dev/block/{devno}/uevent") as fh:
        for line in fh:
            if line.startswith("DEVNAME="):
                return "/dev/" + line.split("=", 1)[1].strip()
    raise AssertionError(f"no device node for {devno}")


def pool_devices(pool_name):
    """(metadata dev path, data dev path) from the pool's live table."""
    params = table(pool_name)[0].split()
    return devnode(params[3]), devnode(params[4])


def thin_ids(pool_name):
    """The thin device ids the pool's metadata holds, read by thin_dump from
    a metadata snapshot reserved here (not by libdm)."""
    import re

    meta, _ = pool_devices(pool_name)
    dmsetup("message", pool_name, "0", "reserve_metadata_snap")
    try:
        out = subprocess.run(["thin_dump", "-m", meta], capture_output=True, text=True,
                             check=True).stdout
    finally:
        dmsetup("message", pool_name, "0", "release_metadata_snap")
    return {int(m) for m in re.findall(r'<device dev_id="(\d+)"', out)}


def pool_status(pool_name):
    """The pool's status fields as dmsetup prints them (after the target type)."""
    return status(pool_name)[0].split()[3:]


def transaction_id(pool_name):
    return int(pool_status(pool_name)[0])


def checksum(path, size=None):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        remaining = size
        while True:
            chunk = fh.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()
