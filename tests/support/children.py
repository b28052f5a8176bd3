"""A provisioning process for crash tests: a fresh Python that opens the
pool and runs some code, optionally armed to SIGKILL itself at a named
crash point (``LIBDM_CRASH_AT``, armed by the testing package's bootstrap;
see libdm.thin.crash); and a plugin's ``serve`` in a child process,
started until it serves and stopped by a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO


def run_child(
    directory: str | os.PathLike[str], code: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``p`` the pool opened from ``directory``.

    Returns:
        The ``CompletedProcess`` (returncode ``-SIGKILL`` if it died at
        ``crash_at``).
    """
    env = dict(os.environ)
    env.pop("LIBDM_CRASH_AT", None)
    if crash_at:
        env["LIBDM_CRASH_AT"] = crash_at
    script = f"import libdm\np = libdm.Pool.open({str(directory)!r})\n{code}"
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )


class PluginDied(RuntimeError):
    """A plugin exited instead of serving; ``code`` is its exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def start_plugin(
    argv: Sequence[str],
    env: Mapping[str, str],
    log: str | os.PathLike[str] | None,
    wait: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a plugin's ``serve`` (its stderr appended to ``log``); with
    ``wait``, until it prints that it is serving.

    Raises:
        PluginDied: it exited instead (with its log's tail, when logged).
    """
    out: IO[bytes] | int = (
        open(log, "ab")  # noqa: SIM115 (closed once the child has it)
        if log
        else subprocess.DEVNULL
    )
    # In the test's working directory (no cwd=): `-m` then finds the libdm
    # the test imported, the installed one in the installed-package run.
    # PYTHONFAULTHANDLER: SIGABRT dumps every thread (see stop_process).
    env = dict(env, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=out)
    if not isinstance(out, int):
        out.close()
    assert proc.stdout is not None  # stdout=PIPE
    if wait:
        line = proc.stdout.readline().decode()
        if not line.startswith("serving on"):
            code = proc.wait(timeout=60)
            proc.stdout.close()
            tail = ""
            if log:
                with open(log, "rb") as fh:
                    tail = fh.read()[-3000:].decode(errors="replace")
            raise PluginDied(code, f"plugin did not start (exit {code}):\n{tail}")
    return proc


def stop_process(
    proc: subprocess.Popen[bytes] | None,
    sig: int | None = signal.SIGTERM,
    timeout: float = 60,
    log: str | os.PathLike[str] | None = None,
) -> int | None:
    """Signal ``proc`` (unless it has exited, or ``sig`` is None) and wait
    for it; its exit status, None for no process.

    Raises:
        AssertionError: it did not exit in ``timeout`` seconds.  It is then
            sent SIGABRT, on which a plugin started by :func:`start_plugin`
            writes every thread's traceback to its log; the error carries
            the log's tail, so that a hang says where it hung.
    """
    if proc is None:
        return None
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        tail = ""
        if log:
            with open(log, "rb") as fh:
                tail = fh.read()[-6000:].decode(errors="replace")
        raise AssertionError(
            f"{proc.args!r} did not exit within {timeout} s of signal {sig}; "
            f"its log's tail (its threads at SIGABRT last):\n{tail}"
        ) from None
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    return code
