"""The examples run, in a real kernel, and check themselves.

They run twice: in the session's test kernel, and each in a kernel of its
own that loads modules on demand as an ordinary machine does, where
opening a device number can make a device (``9:N`` loads md and makes
``mdN``).  An example must leave no block device behind in either.
"""

import json
import os
import subprocess
import sys

import pytest
from support import witness

kernel = pytest.mark.kernel

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# Run inside an autoloading kernel: the example, with the block devices
# before and after (loop devices by whether they are attached, since
# detached ones stay listed), as one JSON line on stdout.
BLOCK_DEVICES_AROUND = r"""
import json, os, subprocess, sys

def block_devices():
    found = set()
    for name in os.listdir("/sys/block"):
        attached = os.path.exists(f"/sys/block/{name}/loop/backing_file")
        if not name.startswith("loop") or attached:
            found.add(name)
    return sorted(found)

before = block_devices()
proc = subprocess.run([sys.executable, *sys.argv[1:]], capture_output=True, text=True)
print(json.dumps({"before": before, "after": block_devices(), "returncode": proc.returncode,
                  "stdout": proc.stdout, "stderr": proc.stderr}))
"""


def run_example(name, *args):
    return subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@kernel
def test_device_ops_example():
    before = witness.names()
    proc = run_example("device_ops.py")
    assert proc.returncode == 0, proc.stderr
    assert "deferred remove        True" in proc.stdout
    # The missing device is missing: the kernel refuses the table.
    assert "DMError: create on" in proc.stdout and "No such device" in proc.stdout
    assert "clean up: 0 demo devices left" in proc.stdout
    assert witness.names() == before


@kernel
def test_layered_snapshots_example():
    before = witness.names()
    proc = run_example("layered_snapshots.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "all checks passed" in out
    assert out.count(" ok\n") == 6
    assert "0 new data blocks" in out
    assert "Data Space Available" in out
    assert witness.names() == before


@kernel
def test_direct_mode_example():
    before = witness.names()
    proc = run_example("direct_mode.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-tmeta: 0 " in proc.stdout and "-tdata: 0 " in proc.stdout
    assert "Pool Blocksize: 64 KiB" in proc.stdout
    assert witness.names() == before


OPEN_9_99 = r"""
import errno, os, stat
node = "/run/md-probe"  # /run is private to the test kernel
os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(9, 99))
try:
    os.close(os.open(node, os.O_RDONLY))
    print("opened")
except OSError as exc:
    print(errno.errorcode[exc.errno])
print("md99" in os.listdir("/sys/block"))
"""

# -- in a kernel that autoloads modules ----------------------------------------------------


def run_autoloading(run_in_kernel, name, *args):
    """Run an example in a fresh kernel that autoloads modules; its
    result, and the block devices before and after, as a dict."""
    result = run_in_kernel(
        [sys.executable, "-c", BLOCK_DEVICES_AROUND, os.path.join(EXAMPLES, name), *args],
        autoload=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr + result.console[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.host
def test_the_autoloading_kernel_makes_md_devices_on_demand(run_in_kernel):
    # The premise of the tests below: there, opening 9:99 (the device_ops
    # example's "missing device" once) loads md and makes md99, as on an
    # ordinary machine; in the default test kernel it fails.
    open_9_99 = [sys.executable, "-c", OPEN_9_99]
    assert run_in_kernel(open_9_99, autoload=True, timeout=300).stdout.split() == [
        "opened",
        "True",
    ]
    assert run_in_kernel(open_9_99, timeout=300).stdout.split() == ["ENXIO", "False"]


@pytest.mark.host
def test_device_ops_example_leaves_nothing_where_modules_autoload(run_in_kernel):
    run = run_autoloading(run_in_kernel, "device_ops.py")
    made = sorted(set(run["after"]) - set(run["before"]))
    assert made == [], f"left behind: {made}\n" + run["stdout"] + run["stderr"]
    assert run["returncode"] == 0, run["stdout"] + run["stderr"]
    assert "clean up: 0 demo devices left" in run["stdout"]
    assert "DMError: create on" in run["stdout"] and "No such device" in run["stdout"]
    assert run["after"] == run["before"]


@pytest.mark.host
@pytest.mark.parametrize(
    "name, done",
    [
        ("layered_snapshots.py", "all checks passed"),
        ("direct_mode.py", "Pool Blocksize: 64 KiB"),
    ],
)
def test_examples_leave_nothing_where_modules_autoload(run_in_kernel, name, done):
    run = run_autoloading(run_in_kernel, name)
    assert run["returncode"] == 0, run["stdout"] + run["stderr"]
    assert done in run["stdout"]
    assert run["after"] == run["before"]


@pytest.mark.host
def test_reopen_after_reboot_example_where_modules_autoload(run_in_kernel, tmp_path):
    directory = str(tmp_path / "pool")
    first = run_autoloading(run_in_kernel, "reopen_after_reboot.py", "create", directory)
    assert first["returncode"] == 0, first["stderr"]
    second = run_autoloading(run_in_kernel, "reopen_after_reboot.py", "open", directory)
    assert second["returncode"] == 0, second["stdout"] + second["stderr"]
    assert second["stdout"].count("data intact") == 2
    assert second["after"] == first["before"]
