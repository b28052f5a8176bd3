"""The package builds as a new user would build it: ``python -m build``
makes an sdist, then a wheel from that sdist, and both carry what they
need (the sdist: everything to build; the wheel: the compiled binding and
its data files)."""

import subprocess
import sys
import tarfile
import zipfile

import pytest

import libdm


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    root = __file__.rsplit("/tests/", 1)[0]
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), root],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_the_sdist_holds_what_a_build_needs(dist):
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in (
        "build_ffi.py",
        "setup.py",
        "pyproject.toml",
        "LICENSE",
        "README.md",
        "libdm/_decl/task.h",
        "libdm/testing/xstate_shim.c",
        "tests/conftest.py",
        "tests/witness.py",
        "docs/conf.py",
    ):
        assert needed in names, needed


def test_the_wheel_from_the_sdist_holds_the_binding(dist):
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
