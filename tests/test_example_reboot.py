"""The reopen-after-reboot example, across two real kernel boots."""

import os
import sys

import pytest

pytestmark = pytest.mark.host

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "examples",
    "reopen_after_reboot.py",
)


def test_reopen_after_reboot_example(run_in_kernel, tmp_path):
    directory = tmp_path / "pool"
    first = run_in_kernel([sys.executable, EXAMPLE, "create", str(directory)], timeout=300)
    assert first.returncode == 0, first.stderr
    assert (directory / "expected.json").exists()
    second = run_in_kernel([sys.executable, EXAMPLE, "open", str(directory)], timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("data intact") == 2
    assert "parent vol" in second.stdout
    assert not directory.exists()
