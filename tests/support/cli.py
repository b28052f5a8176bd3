"""The ``libdm`` command, run in this process (:func:`run`) or as a
process of its own (:func:`sh`, :func:`run_cli`), checks of its exit
status and output, and the monitor service (``libdm monitor serve``) run
the way systemd runs it.  The fixtures ``cli_run`` (each of the two ways)
and ``no_libdm_pool`` are in conftest.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple


def libdm_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``LIBDM_POOL`` (a command names
    its pool), with ``env`` on top."""
    environ = {k: v for k, v in os.environ.items() if k != "LIBDM_POOL"}
    environ.update(env or {})
    return environ


def run_cli(
    *args: object,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``python -m libdm ARGS`` (each argument as ``str``), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "libdm", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        env=libdm_env(env),
        timeout=timeout,
    )


def start_monitor(env: Mapping[str, str], *options: object) -> subprocess.Popen[str]:
    """``libdm monitor serve OPTIONS`` in the background, its stderr piped
    (the journal lines); stop it with :func:`stop_monitor`."""
    return subprocess.Popen(
        [sys.executable, "-m", "libdm", "monitor", "serve", *map(str, options)],
        env=libdm_env(env),
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_monitor(service: subprocess.Popen[str]) -> str:
    """SIGTERM the service and wait for it (its exit status is then
    ``service.returncode``); what it wrote on stderr."""
    service.send_signal(signal.SIGTERM)
    _, err = service.communicate(timeout=60)
    return err


def monitor_status(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The pools of the service's status file in ``run_dir`` (each pool's
    path mapped to what the service says of it); empty while there is none."""
    try:
        with open(os.path.join(run_dir, "monitor.json")) as fh:
            pools: dict[str, Any] = json.load(fh)["pools"]
    except (OSError, ValueError, KeyError):
        return {}
    return pools


class Result(NamedTuple):
    """A command's exit status and output."""

    code: int | None
    out: str
    err: str


def run(*args: object, stdin: str | None = None) -> Result:
    """``libdm ARGS`` in this process (so coverage sees it)."""
    from libdm import cli

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        sys.stdin = saved
    return Result(code, out.getvalue(), err.getvalue())


def sh(*args: object, stdin: str | None = None, env: Mapping[str, str] | None = None) -> Result:
    """``python -m libdm ARGS`` as a process of its own."""
    proc = run_cli(*args, env=env, stdin=stdin)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(result: Result) -> Result:
    """The command succeeded; returns ``result``."""
    assert result.code == 0, f"exit {result.code}: {result.err}"
    return result


def failed(result: Result, code: int, *words: str) -> str:
    """The command failed with ``code``, one line on stderr naming ``words``,
    no traceback and nothing on stdout; returns the line."""
    assert result.code == code, result
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("libdm: "), lines[0]
    assert "Traceback" not in result.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.out == ""
    return lines[0]


def as_json(result: Result) -> Any:
    """The command's JSON output (it must have succeeded)."""
    return json.loads(ok(result).out)
