"""What a type checker sees of libdm.

* The unit types are distinct to a checker, not only at run time: mypy
  --strict is run on two small snippets, one with the forms a unit allows
  (a unit plus an int, times an int, a unit over the same unit), which must
  check clean, and one where every line marked ``# error`` mixes units and
  must be reported on exactly that line.
* The binding's stub names what the compiled module has, with the same
  parameter counts.
* The names the packages import lazily are the names they show a checker.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import libdm
import libdm.dm
import libdm.thin

ALLOWED = """
from libdm.thin.units import Bytes, DataBlocks, MetaBlocks, Sectors, parse_size

def takes_sectors(s: Sectors) -> Sectors:
    return s

a: Sectors = Sectors(8) + 8
b: Sectors = 8 + Sectors(8)
c: Sectors = Sectors(8) * 2
d: Sectors = 2 * Sectors(8)
e: int = Sectors(8) // Sectors(2)
f: Sectors = Sectors(8) // 2
g: Sectors = Sectors(8) - Sectors(2) - 1
h: bool = Sectors(1) < Sectors(2) and Sectors(1) <= 2 and Sectors(1) == Sectors(1)
i: int = int(Bytes(512)) + 1
j: Sectors = takes_sectors(Bytes(4096).sectors())
k: DataBlocks = Sectors(1024).data_blocks(Sectors(128))
m: Bytes = MetaBlocks(2).bytes() + parse_size("1M")
n: str = f"{Sectors(8)} {Bytes(512):>6}"
o: list[int] = list(range(Sectors(4)))
p: Sectors = max(Sectors(1), Sectors(2))
q: Sectors = Sectors(Sectors(3)) % 2
"""

REJECTED = """
from libdm.thin.units import Bytes, DataBlocks, Sectors, format_size, parse_size

def takes_sectors(s: Sectors) -> Sectors:
    return s

def takes_int(n: int) -> int:
    return n

Sectors(1) + Bytes(512)  # error
Bytes(512) - Sectors(1)  # error
Sectors(1) < Bytes(512)  # error
Sectors(1) >= DataBlocks(1)  # error
Sectors(1) == Bytes(512)  # error
Sectors(1) != Bytes(512)  # error
Sectors(1) // Bytes(512)  # error
Sectors(1) * Sectors(2)  # error
takes_sectors(Bytes(512))  # error
takes_sectors(512)  # error
takes_int(Sectors(1))  # error
x: int = Bytes(1)  # error
Sectors(Bytes(512))  # error
parse_size(DataBlocks(1))  # error
Sectors(1).data_blocks(Bytes(512))  # error
format_size(Sectors(1))  # error
"""


def _run_mypy(tmp_path: Path, **modules: str) -> list[str]:
    """mypy --strict's error lines for MODULES (name -> source)."""
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    env = dict(os.environ)
    # From a source tree, point mypy at it; an installed libdm is found by
    # --python-executable (it ships py.typed).
    root = Path(libdm.__file__).resolve().parent.parent
    if root != Path(sysconfig.get_paths()["purelib"]).resolve():
        env["MYPYPATH"] = str(root)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--python-executable",
            sys.executable,
            "--no-error-summary",
            "--hide-error-context",
            *(f"{name}.py" for name in modules),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if ": error:" in line]


def test_units_are_distinct_types(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")
    errors = _run_mypy(tmp_path, allowed=ALLOWED, rejected=REJECTED)
    allowed_errors = [e for e in errors if e.startswith("allowed.py:")]
    assert allowed_errors == [], "\n".join(allowed_errors)

    source = textwrap.dedent(REJECTED).splitlines()
    marked = {n for n, line in enumerate(source, 1) if line.endswith("# error")}
    reported: set[int] = set()
    for e in errors:
        m = re.match(r"rejected\.py:(\d+): error:", e)
        if m:
            reported.add(int(m.group(1)))
    unmarked = [
        e for e in errors if e.startswith("rejected.py:") and int(e.split(":")[1]) not in marked
    ]
    assert not unmarked, "\n".join(unmarked)
    missed = sorted(marked - reported)
    assert not missed, "mypy accepted mixed units on: " + "; ".join(source[n - 1] for n in missed)


#: A user's typed monitor code, as it checked before Monitor was generic in
#: its pool: bare ``Monitor`` and ``GrowCallback``, a callback on a Pool.
MONITOR_USER = """
import libdm
from libdm.thin.monitor import GrowCallback, Monitor, Part

def grow(pool: libdm.Pool, part: Part, old: libdm.Bytes, wanted: libdm.Bytes) -> bool:
    return pool.name != "" and wanted > old

callback: GrowCallback = grow

def watch(pool: libdm.Pool) -> Monitor:
    started: Monitor = pool.monitor(80, 20, grow=callback)
    return started

def watch_again(pool: libdm.Pool) -> Monitor | None:
    with Monitor(pool, grow=grow) as running:
        return running
"""


def test_monitor_checks_unparameterised_in_user_code(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")
    assert _run_mypy(tmp_path, monitor_user=MONITOR_USER) == []


# -- the binding's stub, and the names a checker sees in the packages --------

STUB = Path(libdm.__file__).resolve().parent / "_libdevmapper.pyi"


def _stub_lib() -> dict[str, int | None]:
    """The stub's ``_Lib`` members: a function's parameter count, None for a constant."""
    tree = ast.parse(STUB.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib"]
    out: dict[str, int | None] = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = len(node.args.posonlyargs) + len(node.args.args)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = None
    return out


def test_binding_stub_matches_the_compiled_module() -> None:
    from libdm.dm._lib import ffi, lib

    compiled: dict[str, int | None] = {}
    for name in dir(lib):
        value = getattr(lib, name)
        compiled[name] = None if isinstance(value, int) else len(ffi.typeof(value).args)
    assert _stub_lib() == compiled


def _checker_imports(package: str) -> dict[str, str]:
    """{name: module} a package's ``if TYPE_CHECKING:`` block imports."""
    module = importlib.import_module(package)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module is not None
                for alias in imp.names:
                    assert alias.asname == alias.name, "re-export as 'from m import x as x'"
                    out[alias.name] = imp.module
    return out


@pytest.mark.parametrize("package", ["libdm", "libdm.dm", "libdm.thin"])
def test_lazy_names_are_visible_to_a_checker(package: str) -> None:
    # __getattr__ imports the names at run time; a checker reads the
    # TYPE_CHECKING imports instead, so the two must list the same names.
    tables = {
        "libdm.dm": [libdm.dm._TABLE],
        "libdm.thin": [libdm.thin._TABLE],
        "libdm": [libdm.dm._TABLE, libdm.thin._TABLE],
    }
    lazy = {
        name: module
        for table in tables[package]
        for module, names in table.items()
        for name in names
    }
    assert _checker_imports(package) == lazy
