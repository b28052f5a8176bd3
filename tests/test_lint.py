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

import pytest

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


#: The last commit made before the commit-message rule (docs/contributing.rst,
#: "Commits"); every commit after it follows the rule.
_RULE_SINCE = "1aec340"


def test_commit_messages() -> None:
    """Each commit since the rule has a subject of at most 72 characters, a
    blank line, and a body; a merge needs only the subject's limit."""
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(
        os.path.join(ROOT, ".git")
    ):
        pytest.skip("not a git checkout: no history to check")
    proc = subprocess.run(
        ["git", "log", "--format=%H%x00%P%x00%B%x01", f"{_RULE_SINCE}..HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    problems = []
    for entry in proc.stdout.split("\x01"):
        entry = entry.strip("\n")
        if not entry:
            continue
        sha, parents, message = entry.split("\x00", 2)
        lines = message.strip("\n").split("\n")
        subject = lines[0]
        if len(subject) > 72:
            problems.append(f"{sha[:10]}: subject of {len(subject)} characters: {subject!r}")
        if len(parents.split()) > 1:
            continue  # a merge: its branch's commits carry the bodies
        if len(lines) < 3 or lines[1] != "" or not "".join(lines[2:]).strip():
            problems.append(f"{sha[:10]}: no blank line and body after {subject!r}")
    assert not problems, "\n".join(problems)
