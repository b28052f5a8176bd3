"""udev synchronisation: with a real udevd, nodes are udev's symlinks and
every cookie is waited on; without udev, libdevmapper makes real nodes
and no semaphore is ever created.

The udev tests share one kernel of their own (the session's test kernel
runs no udev), booted with udevd to run ``udev_steps.py``; the last test
runs in the ordinary test kernel.
"""

import errno
import json
import os
import shlex
import stat
import sys

import pytest

import libdm
from libdm import Target
from libdm.testing import in_ci

STEPS = os.path.join(os.path.dirname(__file__), "udev_steps.py")
CYCLES = 10

# Debian's udev package (systemd-udevd) and the device-mapper rules that
# dmsetup ships; without 95-dm-notify.rules every udev wait would hang.
UDEVD = next(
    (
        p
        for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")
        if os.access(p, os.X_OK)
    ),
    None,
)
NOTIFY_RULES = next(
    (
        p
        for p in (
            "/usr/lib/udev/rules.d/95-dm-notify.rules",
            "/lib/udev/rules.d/95-dm-notify.rules",
        )
        if os.path.exists(p)
    ),
    None,
)


def semaphores():
    with open("/proc/sysvipc/sem") as fh:
        return len(fh.readlines()) - 1


def points_at(seen, minor):
    """The node is udev's symlink to the right dm-N block device."""
    return (
        seen is not None
        and seen["symlink"]
        and seen["target"] == f"../dm-{minor}"
        and seen["block"]
        and seen["rdev"] is not None
        and seen["rdev"][1] == minor
    )


def boot_with_udevd(run_in_kernel, out):
    """Boot one kernel, start udevd in it, run udev_steps.py; its findings
    and the kernel's result."""
    script = (
        "mkdir -p /run/udev"
        f" && {shlex.quote(UDEVD)} --daemon --resolve-names=never"
        " && udevadm control --ping && udevadm settle"
        f" && exec {shlex.quote(sys.executable)} {shlex.quote(STEPS)}"
        f" {shlex.quote(str(out))} {CYCLES}"
    )
    result = run_in_kernel(["sh", "-c", script], timeout=300)
    assert result.returncode == 0, result.stderr + result.console[-2000:]
    with open(out) as fh:
        found = json.load(fh)
    assert "exception" not in found, found["exception"]
    return found, result


_booted = {}


@pytest.fixture
def udev_findings(run_in_kernel, tmp_path_factory):
    """What udev_steps.py saw in a kernel with udevd, and the kernel's
    result: one boot for the whole module."""
    if "found" not in _booted:
        if UDEVD is None or NOTIFY_RULES is None:
            missing = "needs systemd-udevd and 95-dm-notify.rules (apt-get install udev dmsetup)"
            if in_ci():
                pytest.fail(missing, pytrace=False)  # as the harness does for a missing kernel
            pytest.skip(missing)
        out = tmp_path_factory.mktemp("udev") / "result.json"
        _booted["found"] = boot_with_udevd(run_in_kernel, out)
    return _booted["found"]


@pytest.mark.host
def test_udev_makes_the_nodes_and_every_cookie_is_waited_on(udev_findings):
    found, result = udev_findings
    assert found["udev_sync_supported"] is True
    assert found["warnings"] == []
    assert len(found["cycles"]) == CYCLES
    minors = set()
    for seen in found["cycles"] + [found["last_remove"]]:
        name = seen["name"]
        if name is not None:
            minor = seen["minor"]
            minors.add(minor)
            assert seen["info_minor"] == minor
            # Right after create: udev's symlink to this device's dm-N, not
            # a node libdevmapper made.
            assert points_at(seen["after_create"], minor), seen
            assert f"mapper/{name}" in (seen["udev_links"] or ()), seen
            assert points_at(seen["after_rename"]["new"], minor), seen
            assert seen["after_rename"]["old"] is None, seen
            assert f"mapper/{name}-r" in seen["udev_links_renamed"], seen
            assert f"mapper/{name}" not in seen["udev_links_renamed"], seen
            assert points_at(seen["after_resume"], minor), seen
            assert seen["sems_after_create"] == found["sems_start"], seen
        if seen["removed"] is not None:
            # Right after remove: gone, and udev has forgotten the device.
            assert seen["after_remove"] is None, seen
            assert seen["udev_links_removed"] is None, seen
        assert seen["sems_after_remove"] == found["sems_start"], seen
    assert len(minors) == 2  # the devices of one cycle and the next alternate
    bad = found["failing_create"]
    assert bad["error"] == "DMError" and bad["errno"] == errno.ENXIO, bad  # 9:99 is missing
    assert not bad["exists"] and bad["node"] is None, bad
    # Only the refused load is logged: nothing about nodes, cookies or semaphores.
    assert not [
        w
        for w in bad["warnings"]
        if any(word in w.lower() for word in ("udev", "cookie", "semaphore", "node"))
    ], bad
    assert bad["sems_after"] == bad["sems_before"] == found["sems_start"], bad
    assert found["sems_end"] == found["sems_start"]

    # The witness can fail: a cookie nobody waits on (dm_udev_wait skipped)
    # stays in /proc/sysvipc/sem after udev is done with it.
    leak = found["leak"]
    assert leak["run"] and leak["cookie"] != 0, leak
    assert leak["node"] is not None and leak["node"]["symlink"], leak
    assert leak["sems_leaked"] == leak["sems_before"] + 1, leak
    assert leak["udevcomplete_all"] == 0, leak
    assert leak["sems_cleaned"] == leak["sems_before"], leak
    assert leak["node_removed"] is None and leak["sems_after"] == leak["sems_before"], leak
    assert found["mapper_left"] == ["control"]
    print(
        f"\nudev: semaphores {found['sems_start']} -> {found['sems_end']} "
        f"(leak demo {leak['sems_before']} -> {leak['sems_leaked']} -> {leak['sems_cleaned']}); "
        f"{CYCLES} cycles in {found['cycles_s']:.2f} s; kernel {result.duration:.1f} s"
    )


@pytest.mark.host
def test_an_interrupt_right_after_the_cookie_leaks_no_semaphore(udev_findings):
    seen = udev_findings[0]["interrupted"]
    assert seen["after"] is not None, seen  # the interrupt did happen
    assert seen["sems_after"] == seen["sems_before"], seen
    assert seen["sems_cleaned"] == seen["sems_before"], seen


@pytest.mark.kernel
def test_without_udev_libdevmapper_makes_real_nodes(dm_name):
    if os.path.exists("/run/udev/control"):
        pytest.skip("udev runs here; the host test above covers that case")
    assert libdm.udev_sync_supported() is False
    before = semaphores()
    name, renamed = dm_name(), dm_name()
    got = libdm.create(name, [Target(0, 100, "zero")])
    st = os.lstat(libdm.device_path(name))  # lstat: a node, not a symlink
    assert stat.S_ISBLK(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (got.major, got.minor)
    assert semaphores() == before
    libdm.rename(name, renamed)
    assert stat.S_ISBLK(os.lstat(libdm.device_path(renamed)).st_mode)
    assert not os.path.lexists(libdm.device_path(name))
    libdm.remove(renamed)
    assert not os.path.lexists(libdm.device_path(renamed))
    assert semaphores() == before
