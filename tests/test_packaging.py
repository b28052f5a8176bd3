"""The package builds as a new user would build it: ``python -m build``
makes an sdist, then a wheel from that sdist, and both carry what they
need (the sdist: everything to build and to run the tests, docs and
examples; the wheel: the compiled binding and its data files).

In the installed-package run (.ci/test.sh, which names the wheel it built
and installed in ``LIBDM_TEST_INSTALLED``) the sdist and wheel checked are
that build's, the very wheel the suite runs against; otherwise they are
built here.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

import libdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    installed = os.environ.get("LIBDM_TEST_INSTALLED")
    if installed:
        return pathlib.Path(installed).parent
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def _tree_files(*tops: str, suffixes: tuple[str, ...]) -> set[str]:
    """Files of the source tree below ``tops`` with these suffixes, as
    paths relative to the repository."""
    found = set()
    for top in tops:
        for directory, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            for name in files:
                if name.endswith(suffixes):
                    found.add(os.path.relpath(os.path.join(directory, name), ROOT))
    return found


def test_the_sdist_holds_what_a_build_needs(dist: pathlib.Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {
        "build_ffi.py",
        "setup.py",
        "pyproject.toml",
        "LICENSE",
        "README.md",
        "libdm/_decl/task.h",
        "libdm/testing/xstate_shim.c",
        "libdm/testing/boot/sitecustomize.py",
        "tests/conftest.py",
        "docs/conf.py",
        ".ci/setup.sh",
        ".ci/test.sh",
    }
    # Every module, test and helper, doc page and example of the tree.
    needed |= _tree_files("libdm", "tests", "examples", "bench", suffixes=(".py",))
    needed |= _tree_files("docs", suffixes=(".py", ".rst", ".md"))
    missing = sorted(needed - names)
    assert not missing, f"not in {sdist.name}: {missing}"


def test_the_wheel_from_the_sdist_holds_the_binding(dist: pathlib.Path) -> None:
    (wheel,) = dist.glob("*.whl")
    assert wheel.name.startswith(f"libdm-{libdm.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.startswith("libdm/_libdevmapper") and n.endswith(".so") for n in names)
    for needed in (
        "libdm/_decl/task.h",
        "libdm/testing/boot/sitecustomize.py",
        "libdm/snapshotter/api/snapshots.proto",
    ):
        assert needed in names, needed
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: LGPL-2.1-or-later" in text
    assert "Requires-Dist: cffi>=1.15" in text
    assert f"Version: {libdm.__version__}" in text
