"""A provisioning process for crash tests: a fresh Python that opens the
pool and runs some code, optionally armed to SIGKILL itself at a named
crash point (``LIBDM_CRASH_AT``, armed by the testing package's bootstrap;
see libdm.thin.crash)."""

from __future__ import annotations

import os
import subprocess
import sys


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
