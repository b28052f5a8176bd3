"""In the installed-package run, libdm is the wheel's, never the source tree's.

``.ci/test.sh`` (the README's test command) installs the wheel it built
from the sdist into a fresh virtualenv, runs the suite with that
virtualenv's Python from an empty working directory with ``python -P``,
and names the wheel in ``LIBDM_TEST_INSTALLED``.  These tests fail if, in
that run, libdm came from anywhere else (the source tree on ``sys.path``,
an editable install), here, inside the test kernel, or in a child Python
started the way tests start them.  Outside that run they are skipped.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig

import pytest

import libdm
import libdm.testing.pytest_plugin
from libdm.testing import kernel

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
WHEEL = os.environ.get("LIBDM_TEST_INSTALLED", "")

pytestmark = pytest.mark.skipif(
    not WHEEL, reason="only in the installed-package run (.ci/test.sh sets LIBDM_TEST_INSTALLED)"
)


def _below(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _problems(libdm_file: str) -> list[str]:
    """What is wrong with libdm having been imported from ``libdm_file``."""
    path = os.path.realpath(libdm_file)
    package = os.path.dirname(path)
    problems = []
    if _below(path, ROOT):
        problems.append(f"libdm was imported from the source tree: {path}")
    site = {os.path.realpath(sysconfig.get_path(k)) for k in ("purelib", "platlib")}
    if not any(_below(path, d) for d in site):
        problems.append(f"libdm ({path}) is not in this venv's site-packages {sorted(site)}")
    dist = importlib.metadata.distribution("libdm")
    recorded = os.path.realpath(str(dist.locate_file("libdm/__init__.py")))
    if recorded != path:
        problems.append(f"the installed distribution's libdm is {recorded}, not {path}")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        problems.append(f"libdm is an editable install of {direct_url.get('url')}")
    url = direct_url.get("url", "")
    if os.path.basename(url) != os.path.basename(WHEEL):
        problems.append(f"libdm was installed from {url or 'an index'}, not from {WHEEL}")
    if not any(
        name.startswith("_libdevmapper") and name.endswith(".so") for name in os.listdir(package)
    ):
        problems.append(f"no compiled binding next to {path}")
    return problems


def _check_this_process() -> None:
    assert sys.flags.safe_path, "the suite must run with python -P (see .ci/test.sh)"
    assert not _problems(libdm.__file__ or ""), _problems(libdm.__file__ or "")
    # The crash-point bootstrap children get is the installed one too.
    boot = libdm.testing.pytest_plugin.BOOT_DIR
    assert not _below(os.path.realpath(boot), ROOT), boot
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == boot


def _check_a_child() -> None:
    # A child started as tests start them (sys.executable, this working
    # directory, -c or -m, which put the working directory on sys.path).
    proc = subprocess.run(
        [sys.executable, "-c", "import libdm; print(libdm.__file__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    child = proc.stdout.strip()
    assert not _problems(child), _problems(child)
    assert os.path.realpath(child) == os.path.realpath(libdm.__file__ or "")


def test_libdm_is_the_installed_wheel() -> None:
    _check_this_process()
    _check_a_child()


@pytest.mark.kernel
def test_libdm_is_the_installed_wheel_inside_the_test_kernel() -> None:
    assert kernel.host_has_device_mapper()
    _check_this_process()
    _check_a_child()
    assert os.path.realpath(os.getcwd()) != ROOT, "the kernel's pytest runs in the source tree"


def test_the_working_directory_is_not_the_source_tree() -> None:
    # A `python -m ...` child inherits it, and puts it first on sys.path.
    assert not _below(os.path.realpath(os.getcwd()), ROOT), os.getcwd()
