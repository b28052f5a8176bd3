"""Whether the tests run under continuous integration.

One meaning everywhere: the ``CI`` environment variable is ``true``,
``1`` or ``yes`` (in any case), as CI services set it.  Under CI a test
that cannot get what it needs (a kernel, a tool the setup installs)
fails instead of skipping, so that a job cannot pass having tested
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["in_ci"]

_TRUE = ("true", "1", "yes")


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (default: this process's) says CI."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() in _TRUE
