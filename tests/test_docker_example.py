"""examples/docker_layers.py runs in a real kernel and leaves nothing."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "docker_layers.py"
)


def test_docker_layers_example():
    before = sorted(os.listdir("/dev/mapper"))
    proc = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "/app/run: v2" in out and "/etc/motd: hello from layer 3" in out
    assert "app/old there: False" in out
    assert "changes: C /app, A /app/log" in out
    assert out.rstrip().endswith("done")
    assert sorted(os.listdir("/dev/mapper")) == before
