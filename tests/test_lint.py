"""The source tree passes the checks the project requires: ruff's lint
rules, ruff's formatting, and mypy in strict mode (all configured in
pyproject.toml).

They run on the source tree, also when the suite runs against the
installed wheel (.ci/test.sh), with the versions pinned in the ``test``
extra; a missing tool is a failure, not a reason to skip.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _output(proc: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    """The tool's exit status, its last line (the summary) and its first lines."""
    text = (proc.stdout + proc.stderr).rstrip().splitlines()
    shown = (
        text if len(text) <= lines else [*text[:lines], f"... ({len(text) - lines} more lines)"]
    )
    summary = text[-1] if text else "(no output)"
    return f"exit status {proc.returncode}: {summary}\n" + "\n".join(shown)


def test_ruff_check() -> None:
    proc = _run("ruff", "check", "--no-cache", ".")
    status = proc.returncode
    assert status == 0, _output(proc)


def test_ruff_format() -> None:
    proc = _run("ruff", "format", "--check", "--no-cache", ".")
    status = proc.returncode
    assert status == 0, _output(proc)


def test_mypy_strict() -> None:
    # The files and strictness come from [tool.mypy] in pyproject.toml.
    proc = _run("mypy", "--no-incremental")
    status = proc.returncode
    assert status == 0, _output(proc)
    assert "Success: no issues found" in proc.stdout, _output(proc)
