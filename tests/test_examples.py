"""The examples run, in a real kernel, and check themselves."""

import os
import subprocess
import sys

import pytest

import witness

pytestmark = pytest.mark.kernel

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name, *args):
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args],
                          capture_output=True, text=True, timeout=600)


def test_device_ops_example():
    before = witness.names()
    proc = run_example("device_ops.py")
    assert proc.returncode == 0, proc.stderr
    assert "deferred remove        True" in proc.stdout
    assert "clean up: 0 demo devices left" in proc.stdout
    assert witness.names() == before


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


def test_direct_mode_example():
    before = witness.names()
    proc = run_example("direct_mode.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-tmeta: 0 " in proc.stdout and "-tdata: 0 " in proc.stdout
    assert "Pool Blocksize: 64 KiB" in proc.stdout
    assert witness.names() == before

